"""``tunelens compare``'s configuration: the defaults with the --set overrides, checked (before anything is
loaded), then completed from what the validation found (seed, device, data, the primary tuned model)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from tunelens.compare.plan import CompareError

__all__ = ["complete_configuration", "configuration", "resolve_device"]


def resolve_device(args: argparse.Namespace) -> Any:
    """The device of ``--device`` (CompareError for a bad one)."""
    from tunelens.core import runtime

    try:
        return runtime.resolve_device(args.device)
    except ValueError as e:
        raise CompareError(str(e)) from None


def configuration(args: argparse.Namespace) -> dict:
    """The default configuration with every ``--set`` applied and checked (CompareError on a bad one)."""
    from tunelens.config import DEFAULT_CONFIG, set_dotted
    from tunelens.config_validation import validate_config

    cfg = copy.deepcopy(DEFAULT_CONFIG)
    try:
        for s in args.set:
            set_dotted(cfg, s)
        validate_config(cfg, DEFAULT_CONFIG)
    except ValueError as e:
        raise CompareError(str(e)) from None
    return cfg


def complete_configuration(
    cfg: dict, args: argparse.Namespace, ds: Any, names: list[str], tuned_ok: list[str], n_test: int
) -> None:
    """Fill ``cfg`` (in place) from the validated inputs: seed, device, architecture, the primary tuned model
    (``tuned_ok[0]``), batch size, budget, attribution images (at most the test images), the data facts; the
    training sections go (nothing is trained)."""
    cfg["seed"] = args.seed
    cfg["device"] = args.device
    cfg["arch"] = args.arch
    a = cfg["analysis"]
    a["primary"] = tuned_ok[0] if tuned_ok else names[0]
    if args.batch_size:
        a["batch_size"] = args.batch_size
    if getattr(args, "budget", None) is not None:
        a["budget"] = args.budget
    if not any(s.startswith("analysis.attribution_images=") for s in args.set):
        a["attribution_images"] = min(a["attribution_images"], n_test)
    cfg["data"] = {
        "folder": str(Path(args.data)),
        "image_size": list(ds.image_size),
        "limit": args.limit,
        "test_fraction": args.test_fraction,
        "masks": args.masks,
        "transform": ds.transform_description,
    }
    for section in ("pretrain", "finetune"):
        cfg.pop(section, None)
    cfg["compare"] = {"arch": args.arch, "base": args.base, "tuned": list(args.tuned)}
