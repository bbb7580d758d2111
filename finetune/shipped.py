"""The default run's pretrained base, shipped with tunelens: the stand-in for the pretrained checkpoint a user
starts from, so that ``make report`` spends its minutes on fine-tuning and analysis, not on pretraining.

The file ``finetune/shipped/base_tiny_resnet.safetensors`` is exactly what this project's pretraining stage
writes for the default configuration (tiny_resnet on the 8 source shapes, seed 0, 15 epochs: about 150 s on
2 CPU cores); pretraining is deterministic on a CPU (the same sha256 in every session so far), so the copy is
bit-identical to a fresh run. Its manifest records two keys:

* ``shipped_key``: the hash of the architecture, seed, source data and pretraining settings. The copy is used
  only when the run's settings give the same key; any other configuration pretrains as before.
* ``pretrain_code``: the hash of the modules that decide the pretrained weights (:data:`PRETRAIN_CODE`).
  ``tests/test_shipped_base.py`` fails when they changed since the copy was made: then
  ``make base-weights`` makes it again (``python -m tunelens.base_weights``).

``--set pretrain.use_shipped=false`` pretrains the base again in any run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "shipped" / "base_tiny_resnet.safetensors"

#: The sources that decide the pretrained weights (relative to the tunelens package folders).
PRETRAIN_CODE = (
    ("tunelens.finetune", "train.py"),
    ("tunelens.finetune", "data.py"),
    ("tunelens.finetune", "models.py"),
    ("tunelens.finetune", "strategies.py"),
    ("tunelens.finetune", "feature_cache.py"),
    ("tunelens.core", "architectures.py"),
    ("tunelens.core", "evaluation.py"),
)

__all__ = ["PRETRAIN_CODE", "SHIPPED", "pretrain_code_hash", "shipped_base", "shipped_key"]


def pretrain_code_hash() -> str:
    """sha256 (16 hex digits) of the sources in :data:`PRETRAIN_CODE`."""
    import importlib

    h = hashlib.sha256()
    for package, name in PRETRAIN_CODE:
        root = Path(str(importlib.import_module(package).__file__)).parent
        h.update(f"{package}/{name}".encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def shipped_key(arch: str, seed: int, source_spec: dict, pretrain: dict) -> str:
    """What the shipped base must have been made with: architecture, seed, source data, pretraining settings."""
    from tunelens.core.hashing import config_hash

    settings = {k: v for k, v in pretrain.items() if k != "use_shipped"}
    return config_hash("shipped-base", arch, seed, source_spec, settings)


def shipped_base(key: str) -> tuple[dict, dict] | None:
    """``(state_dict, manifest)`` of the shipped base when it was made with ``key`` (:func:`shipped_key`) by
    the current pretraining code, else None. The weights are checked against the manifest's sha256."""
    from .checkpoints import load_checkpoint

    man_path = SHIPPED.with_suffix(".json")
    if not SHIPPED.is_file() or not man_path.is_file():
        return None
    man = json.loads(man_path.read_text())
    if man.get("shipped_key") != key or man.get("pretrain_code") != pretrain_code_hash():
        return None
    return load_checkpoint(SHIPPED)
