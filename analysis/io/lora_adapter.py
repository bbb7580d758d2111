"""A PEFT LoRA adapter folder read as weight updates, module by module, without merging the model.

For a LoRA module with down-projection ``A`` (``r x in``) and up-projection ``B`` (``out x r``) the update of
its base weight is (Hu et al. 2022; PEFT's ``get_delta_weight``)::

    dW = scale * B @ A,   scale = lora_alpha / r        (lora_alpha / sqrt(r) with use_rslora; Kalajdzievski 2023)

``r`` and ``lora_alpha`` come from ``adapter_config.json`` (``rank_pattern``/``alpha_pattern`` override them per
module, matched as PEFT does: the pattern is a suffix of the module name). ``fan_in_fan_out`` (GPT-2's Conv1D)
transposes ``dW``; convolutions use ``A`` and ``B`` flattened to matrices and ``dW`` reshaped to the kernel;
embeddings (``lora_embedding_A``: ``r x num_embeddings``, ``lora_embedding_B``: ``dim x r``) get
``dW = scale * (B @ A)^T``. Tensors saved whole (``modules_to_save``: a new head) replace the base tensor.

DoRA adapters (``use_dora``) rescale the merged weight by a learned magnitude and are not supported.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .tensor_stream import ADAPTER_CONFIG, CheckpointInputError, TensorSource, open_checkpoint

__all__ = ["MAX_SCALE", "LoraAdapter", "LoraModule", "is_adapter_folder", "lora_scale", "open_adapter"]

MAX_SCALE = 1e4  # |lora_alpha / r| beyond this is no trained adapter: its merged activations overflow


def lora_scale(r: object, alpha: object, rslora: bool = False) -> float:
    """The LoRA update's scale, ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), once ``r`` is checked to be a
    positive integer and ``alpha`` a positive finite number, and the scale to lie within :data:`MAX_SCALE`;
    ValueError naming the offending value otherwise (checked before anything is allocated: an ``r`` of 1e12
    would exhaust memory)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive integer (the LoRA rank), got {json.dumps(r)}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive finite number, got {json.dumps(alpha)}")
    scale = alpha / (math.sqrt(r) if rslora else r)
    if scale > MAX_SCALE:
        raise ValueError(
            f"the LoRA scale lora_alpha / r = {scale:.3g} is beyond {MAX_SCALE:g}; no trained adapter uses such a "
            "scale (its merged activations overflow): check lora_alpha"
        )
    return scale


_PREFIX = "base_model.model."
_LORA = re.compile(r"(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?(?:\.weight)?")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: the names of its ``A`` and ``B`` tensors in the adapter file, and its ``scale``."""

    module: str
    a: str
    b: str
    scale: float
    embedding: bool = False

    @property
    def target(self) -> str:
        """The name of the base tensor it updates (``<module>.weight``)."""
        return f"{self.module}.weight"


class LoraAdapter:
    """The updates of a PEFT LoRA adapter: :meth:`delta` per adapted module, :meth:`replacement` per saved tensor."""

    def __init__(self, path: Path, tensors: TensorSource, modules: dict[str, LoraModule], fan_in_fan_out: bool):
        self.path = path
        self.tensors = tensors
        self.modules = modules  # by target tensor name (without the base_model.model. prefix)
        self.fan_in_fan_out = fan_in_fan_out
        used = {n for m in modules.values() for n in (m.a, m.b)}
        self.replacements = {
            _strip(n): n for n in tensors.names() if n not in used and not _LORA.fullmatch(_strip(n))
        }  # whole tensors saved with the adapter (modules_to_save), by target name

    def targets(self) -> list[str]:
        """Every base tensor name the adapter changes (updated or replaced)."""
        return [*self.modules, *(t for t in self.replacements if t not in self.modules)]

    def delta(self, target: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """``dW`` (float32, on ``device``) for the base tensor ``target`` of shape ``shape``."""
        m = self.modules[target]
        a = self.tensors.read(m.a).to(device, torch.float32)
        b = self.tensors.read(m.b).to(device, torch.float32)
        d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        if m.embedding or self.fan_in_fan_out:
            d = d.T
        d = d.mul_(m.scale)
        if d.numel() != math.prod(shape):
            raise CheckpointInputError(
                f"{self.path}: the LoRA update of {m.module} has {tuple(d.shape)} entries but the base tensor is "
                f"{tuple(shape)}: the adapter was trained on another model; give its base model as --base"
            )
        return d.reshape(shape).contiguous()

    def replacement(self, target: str) -> torch.Tensor:
        """The whole tensor the adapter saved for ``target`` (stored dtype)."""
        return self.tensors.read(self.replacements[target])


def _strip(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that is a suffix (at a dot) of ``module``."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def is_adapter_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def open_adapter(path: str | Path, flag: str = "--tuned") -> LoraAdapter:
    """The LoRA adapter in folder ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    p = Path(path)
    try:
        cfg = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointInputError(
            f"{flag} {p}: {ADAPTER_CONFIG} cannot be read ({e}); save the adapter again"
        ) from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointInputError(
            f"{flag} {p} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be audited (merge it and give "
            "the merged model)"
        )
    if cfg.get("use_dora"):
        raise CheckpointInputError(
            f"{flag} {p} is a DoRA adapter (use_dora), whose update is not B@A; merge it with merge_and_unload() "
            "and give the merged model"
        )
    weights = p / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointInputError(
            f"{flag} {p} has no adapter_model.safetensors; save the adapter with save_pretrained(..., "
            "safe_serialization=True)"
        )
    tensors = open_checkpoint(weights, flag)
    r0, alpha0, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
    parts: dict[tuple[str, bool], dict[str, str]] = {}
    for name in tensors.names():
        m = _LORA.fullmatch(_strip(name))
        if m:
            parts.setdefault((m["module"], bool(m["emb"])), {})[m["ab"]] = name
    modules: dict[str, LoraModule] = {}
    for (module, emb), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointInputError(
                f"{flag} {p}: module {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair; the adapter is "
                "incomplete: save it again"
            )
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, r0)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
        try:
            scale = lora_scale(r, alpha, rslora)
        except ValueError as e:
            raise CheckpointInputError(f"{flag} {p}: {ADAPTER_CONFIG}: {e}") from None
        stored_r = tensors.infos[ab["A"]].shape[0]
        if r != stored_r:
            raise CheckpointInputError(
                f"{flag} {p}: {module}'s lora_A has rank {stored_r} but the config says r={r}; the config and "
                "weights do not belong together"
            )
        lm = LoraModule(module, ab["A"], ab["B"], float(scale), emb)
        modules[lm.target] = lm
    if not modules:
        raise CheckpointInputError(f"{flag} {p}: adapter_model.safetensors holds no lora_A/lora_B tensors")
    return LoraAdapter(p, tensors, modules, bool(cfg.get("fan_in_fan_out")))
