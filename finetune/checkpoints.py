"""Checkpoints: safetensors weights + a JSON manifest, written atomically, loaded safely.

Layout: ``NAME.safetensors`` and ``NAME.json`` (the manifest, which carries the
sha256 of the weights file). The weights are written first, the manifest last,
each to a temporary file renamed into place, so a killed run leaves either no
checkpoint or one whose manifest does not vouch for it; :func:`load_checkpoint`
refuses the latter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelens.core.files import (
    CheckpointError,
    atomic_replace,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
    versions,
)

__all__ = [
    "CheckpointError",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_file",
    "versions",
]


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict:
    """Save ``state_dict`` to ``path`` (``.safetensors``) and its manifest beside it (``.json``).

    Returns the manifest as written (with ``sha256``, ``file`` and ``versions`` added).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_replace(path, lambda tmp: save_file(tensors, tmp))
    man = dict(manifest)
    man.update(file=path.name, sha256=sha256_file(path), versions=versions())
    atomic_write_text(path.with_suffix(".json"), json.dumps(man, indent=2, sort_keys=True, default=str))
    return man


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a tunelens checkpoint written by :func:`save_checkpoint`: ``(state_dict, manifest)``.

    The sha256 in the manifest must match the weights file (``verify=True``).
    """
    path = Path(path)
    man_path = path.with_suffix(".json")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not man_path.exists():
        raise CheckpointError(
            f"checkpoint {path} has no manifest {man_path.name}: it is incomplete "
            "(a run was probably interrupted while saving); re-run the stage that writes it"
        )
    try:
        man = json.loads(man_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"manifest {man_path} is not valid JSON ({e}); re-run the stage that writes it") from e
    if verify and man.get("sha256") != sha256_file(path):
        raise CheckpointError(
            f"checkpoint {path} does not match the sha256 in its manifest: the file is "
            "truncated or was changed; re-run the stage that writes it"
        )
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    return sd, man
