"""PEFT LoRA adapters as tuned models: an adapter folder merged onto a base model.

A folder as ``peft`` saves it (``PeftModel.save_pretrained``): ``adapter_config.json`` and
``adapter_model.safetensors``. The merged model is ``W0 + (alpha / r) B A`` in every adapted layer
(Hu et al. 2021, arXiv:2106.09685), computed by ``peft`` itself (``merge_and_unload``), with the
``modules_to_save`` (typically the new head) taken from the adapter.

Safety: only safetensors weights are read (an ``adapter_model.bin`` is refused: it is a pickle);
the JSON configuration is read locally, never resolved on the Hub (``base_model_name_or_path`` is
ignored: the base is the one given). An adapter that does not fit the base (a target module
the base lacks, tensors of other shapes, keys left over) raises :class:`AdapterError` with one line
naming the problem.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tunelens.core.files import CheckpointError

from .lora_adapter import lora_scale
from .tensor_stream import ADAPTER_CONFIG

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "is_adapter_dir", "load_adapter", "merge_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterError(CheckpointError):
    """An adapter folder that cannot be read, or does not fit the base model."""


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A folder (tunelens reads a PEFT adapter from folders only)."""
    return Path(path).is_dir()


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise AdapterError(
            f"{folder} is a folder without {ADAPTER_CONFIG}: give a PEFT adapter folder (as "
            "PeftModel.save_pretrained writes it) or a checkpoint file"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise AdapterError(f"{cfg_path}: peft_type {got!r} is not supported; tunelens merges LoRA adapters only")
    if not w_path.is_file():
        extra = " (adapter_model.bin is a pickle and is not loaded: save with safe_serialization=True)"
        raise AdapterError(
            f"{folder} has no {ADAPTER_WEIGHTS}"
            + (extra if (folder / "adapter_model.bin").exists() else "")
            + "; save the adapter with peft's save_pretrained"
        )
    from safetensors.torch import load_file

    try:
        sd = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"cannot read {w_path} as safetensors: {' '.join(str(e).split())}") from None
    return cfg, sd


def _check_lora_numbers(cfg: dict, sd: dict[str, torch.Tensor], folder: Path) -> None:
    """``r`` and ``lora_alpha`` valid and their scale bounded (:func:`~.lora_adapter.lora_scale`), and ``r`` equal
    to the rank of the saved ``lora_A`` tensors: checked before peft allocates anything."""
    where = folder / ADAPTER_CONFIG
    r = cfg.get("r", 8)
    try:
        lora_scale(r, cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora")))
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    ranks = {int(t.shape[0]) for k, t in sd.items() if ".lora_A." in k and t.ndim >= 2}
    if not cfg.get("rank_pattern") and ranks and ranks != {r}:
        raise AdapterError(
            f"{where}: r is {r} but the saved lora_A tensors have rank {', '.join(map(str, sorted(ranks)))}; "
            "re-save the adapter with peft's save_pretrained"
        )


def _fit_saved_modules(model: nn.Module, cfg: dict, sd: dict[str, torch.Tensor], folder: Path) -> None:
    """A ``modules_to_save`` Linear head of another output size (a new task's head) replaces the base's."""
    for name in cfg.get("modules_to_save") or []:
        w = sd.get(f"{_PREFIX}{name}.weight")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f"{folder}: the adapter saves the module {name!r}, which the base model does not have: it was "
                "trained on another architecture (check --arch and --base)"
            ) from None
        if w is None or not isinstance(mod, nn.Linear) or tuple(w.shape) == tuple(mod.weight.shape):
            continue
        if w.ndim != 2 or w.shape[1] != mod.in_features:
            raise AdapterError(
                f"{folder}: the adapter's {name}.weight is {tuple(w.shape)} but the base's {name} takes "
                f"{mod.in_features} inputs: the adapter does not fit this base (check --arch and --base)"
            )
        new = nn.Linear(mod.in_features, int(w.shape[0]), bias=mod.bias is not None)
        parent, _, leaf = name.rpartition(".")
        (model.get_submodule(parent) if parent else model).add_module(leaf, new)


def _renamed(raw: dict, sd: dict[str, torch.Tensor], rename: Callable[[str], str]) -> tuple[dict, dict]:
    """The adapter with its module names as ``rename`` maps them (a wrapper's names for the Hugging Face
    model's: ``bert.encoder.layer.0...`` -> ``encoder.layer.0...``, ``classifier`` -> ``fc``)."""
    sd = {(_PREFIX + rename(k[len(_PREFIX) :]) if k.startswith(_PREFIX) else rename(k)): v for k, v in sd.items()}
    raw = dict(raw)
    if raw.get("modules_to_save"):
        raw["modules_to_save"] = list(dict.fromkeys(rename(m) for m in raw["modules_to_save"]))
    return raw, sd


def merge_adapter(base: nn.Module, folder: str | os.PathLike, rename: Callable[[str], str] | None = None) -> nn.Module:
    """A copy of ``base`` with the LoRA adapter in ``folder`` merged in (``base`` is not changed).

    ``rename`` maps the adapter's module names onto ``base``'s where ``base`` wraps the model the adapter was
    trained on under other names. ``modules_to_save`` entries without saved tensors (peft lists ``score`` for
    every sequence-classification task) are ignored."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    folder = Path(folder)
    raw, sd = _read(folder)
    if rename is not None:
        raw, sd = _renamed(raw, sd, rename)
    saved = {k[len(_PREFIX) :].rsplit(".", 1)[0] for k in sd if k.startswith(_PREFIX)}
    if raw.get("modules_to_save"):
        raw = dict(raw, modules_to_save=[m for m in raw["modules_to_save"] if m in saved])
    _check_lora_numbers(raw, sd, folder)
    known = set(LoraConfig.__dataclass_fields__)
    opts = {k: v for k, v in raw.items() if k in known and k not in ("base_model_name_or_path", "revision")}
    try:
        cfg = LoraConfig(**opts)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: not a valid LoRA configuration ({e})") from None
    model = copy.deepcopy(base).cpu()
    _fit_saved_modules(model, raw, sd, folder)
    try:
        pm = get_peft_model(model, cfg)
    except (ValueError, KeyError) as e:
        raise AdapterError(
            f"{folder}: the adapter does not fit the base model ({' '.join(str(e).split())[:300]}); check --arch and --base"
        ) from None
    try:
        loaded = set_peft_model_state_dict(pm, sd)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise AdapterError(
            f"{folder}: the adapter's tensors do not fit the base model ({msg[:300]}); check --arch and --base"
        ) from None
    unexpected = list(getattr(loaded, "unexpected_keys", []) or [])
    missing = [k for k in getattr(loaded, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        which = unexpected or missing
        raise AdapterError(
            f"{folder}: the adapter does not fit the base model: {len(which)} adapter tensor(s) "
            f"{'left over' if unexpected else 'missing'} (first: {which[0]}); check --arch and --base"
        )
    merged = pm.merge_and_unload()
    return merged.eval()


def load_adapter(arch: str, base_spec: str, folder: str | os.PathLike, load_model=None) -> nn.Module:
    """The model ``--arch`` with the ``--base`` weights and the adapter in ``folder`` merged in.

    ``load_model(arch, spec)`` loads the base (default :func:`tunelens.analysis.io.loading.load_model`)."""
    if load_model is None:
        from tunelens.analysis.io.loading import load_model
    return merge_adapter(load_model(arch, base_spec), folder)
