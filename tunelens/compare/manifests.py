"""``tunelens compare``'s description of what it validated: one manifest per model (role, head, classes, file
and sha256) and the notes the report shows about the images and the base model."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["external_manifests", "image_notes", "sha256"]


def sha256(path: str) -> str:
    """The sha256 of the file at ``path`` (hex)."""
    from tunelens.core.files import sha256_file

    return sha256_file(path)


def external_manifests(
    args: argparse.Namespace, models: dict[str, Any], files: dict[str, str], classes: list[str], n_out
) -> dict[str, dict]:
    """The manifest of each model given to ``compare`` (image or text): role, head, classes (the data's when the
    head has one output per class, else output indices), the file and its sha256."""
    from tunelens.core.naming import head_name

    out: dict[str, dict] = {}
    for name, m in models.items():
        k = n_out(m)
        out[name] = {
            "role": "base" if name == "base" else "tuned",
            "strategy": "external",
            "arch": args.arch,
            "num_classes": k,
            "head": head_name(m),
            "classes": classes if k == len(classes) else [str(i) for i in range(k)],
            "seconds": None,
            "seed": None,
            "file": files[name],
            "sha256": sha256(files[name]),
            "external": True,
            "source": args.base if name == "base" else files[name],
        }
    return out


def image_notes(ds: Any, head: str, base_k: int, n_train: int, limit: int | None, weights: Any) -> list[str]:
    """What the report says about the inputs: a base head of another task, converted or skipped images,
    images without a usable mask, ``--limit``, the torchvision transform."""
    notes = []
    n_cls = len(ds.classes)
    if base_k != n_cls:
        notes.append(
            f"The base model's head ({head}, {base_k} outputs) answers another task than your {n_cls} "
            f"classes: weight deltas list it as replaced, CKA compares the backbones, rewind and "
            f"interpolation put the tuned head on the base backbone, and attribution runs the base model "
            f"through a linear-probe head fitted on your {n_train} training images."
        )
    if ds.modes and set(ds.modes) != {"RGB"}:
        conv = ", ".join(f"{c} {m}" for m, c in sorted(ds.modes.items()) if m != "RGB")
        notes.append(f"Images of other modes were converted to RGB ({conv}).")
    if ds.skipped:
        notes.append(
            f"{len(ds.skipped)} file(s) of the data folder could not be decoded and were skipped "
            f"(first: {ds.skipped[0][0]}: {ds.skipped[0][1]})."
        )
    if getattr(ds, "masks_dropped", 0):
        first, why = ds.masks_dropped_files[0]
        notes.append(
            f"{ds.masks_dropped} image(s) were left out because their ground-truth mask is empty in the "
            f"analysed image (first: {first}, {why}): localisation is scored on the {len(ds)} others."
        )
    if limit is not None:
        notes.append(f"--limit {limit}: {len(ds)} images used, spread over the classes.")
    if weights is not None:
        notes.append(f"Images were prepared with the torchvision weights' own transform ({weights}).")
    return notes
