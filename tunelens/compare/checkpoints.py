"""``tunelens compare``'s models: the architecture builds, every checkpoint (or PEFT adapter folder) loads into it,
and tuned files that hold exactly the base model's weights are told apart."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tunelens.compare.plan import CompareError, finding, tuned_names

__all__ = ["Checkpoints", "check_architecture", "load_checkpoints", "n_out", "same_weights", "unchanged_findings"]


def check_architecture(arch: str) -> None:
    """``arch`` builds (without allocating its weights where possible); CompareError otherwise."""
    from tunelens.analysis.io.architectures import skeleton

    try:
        skeleton(arch)
    except ValueError as e:
        raise CompareError(f"--arch {arch}: {e}") from None
    except Exception as e:  # a user factory that fails
        raise CompareError(f"--arch {arch}: building the model failed: {type(e).__name__}: {e}") from None


def n_out(m: Any) -> int:
    """The number of outputs of the model's classification head."""
    from tunelens.core.naming import head_name

    w = m.get_submodule(head_name(m)).weight
    return int(w.shape[0])


class Checkpoints:
    """The loaded models (``base`` first), the file each came from, the tuned names, and which were adapters."""

    def __init__(self, names: list[str], models: dict[str, Any], files: dict[str, str], adapters: set[str]):
        self.names, self.models, self.files, self.adapters = names, models, files, adapters


def load_checkpoints(args: argparse.Namespace, log=print) -> Checkpoints:
    """Every --base / --tuned checkpoint loaded into ``--arch`` (input files first: a missing file is the most
    likely mistake); a tuned PEFT adapter folder is merged onto the base. CompareError on the first bad one."""
    from tunelens.analysis.io.adapters import ADAPTER_WEIGHTS, AdapterError, is_adapter_dir, merge_adapter
    from tunelens.analysis.io.loading import (
        CheckpointLoadError,
        is_torchvision_spec,
        load_model,
        torchvision_weights_file,
    )

    for flag, p in [("--base", args.base)] + [("--tuned", t) for t in args.tuned]:
        if not is_torchvision_spec(p) and not Path(p).exists():
            raise CompareError(f"{flag} {p}: no such file")
    names = tuned_names(args.tuned)
    models: dict[str, Any] = {}
    files: dict[str, str] = {}
    adapters: set[str] = set()
    t = time.perf_counter()
    for name, flag, spec in [("base", "--base", args.base)] + [
        (n, "--tuned", p) for n, p in zip(names, args.tuned, strict=False)
    ]:
        try:
            if flag == "--tuned" and is_adapter_dir(spec):
                models[name] = merge_adapter(models["base"], spec)
                adapters.add(name)
                spec = str(Path(spec) / ADAPTER_WEIGHTS)
            else:
                models[name] = load_model(args.arch, spec)
            files[name] = str(torchvision_weights_file(args.arch, spec)) if is_torchvision_spec(spec) else str(spec)
        except (CheckpointLoadError, AdapterError) as e:
            raise CompareError(f"{flag} {spec}: {e}") from None
        except ValueError as e:
            raise CompareError(f"{flag} {spec}: {e}") from None
    log(f"[compare] loaded {len(models)} checkpoints in {time.perf_counter() - t:.1f}s")
    return Checkpoints(names, models, files, adapters)


def same_weights(a: dict, b: dict) -> bool:
    """Whether two state dicts hold the same tensors: names, shapes, dtypes and every value."""
    import torch

    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def unchanged_findings(models: dict, specs: dict[str, str]) -> tuple[list[str], list[dict]]:
    """Notes and top findings for the tuned models whose weights are exactly the base model's."""
    base = models["base"].state_dict()
    notes, found = [], []
    for name, spec in specs.items():
        if not same_weights(models[name].state_dict(), base):
            continue
        text = (
            f"{spec} has exactly the base model's weights: nothing changed. Every tensor equals the base "
            "model's, so the weight deltas are zero and any difference below is noise of the method; check "
            "that you passed the fine-tuned file (and that the fine-tuning run saved its result)."
        )
        notes.append(text)
        found.append(
            finding(f"identical_{name}", text, "accuracy", score=110, uncertainty="exact (read from the weights)")
        )
    return notes, found
