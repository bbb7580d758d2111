"""Ground-truth masks for a data folder: a CSV of per-image mask images or boxes, checked row by row.

Every row is checked when the CSV is read, before any analysis: a path that is not an image of
the data folder (or lies outside it), a box that is not four finite numbers, an unreadable mask
image or one of another size than its image is an error naming the CSV line. Rows whose object
is empty in the analysed image (a box outside the image or of zero area, an all-zero mask, or an
object the resize/crop cuts away) are left out together with their image, and counted.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DataFolderError", "MaskSet", "load_masks"]


class DataFolderError(ValueError):
    """A data folder (or masks CSV) that cannot be used, with what to do about it."""


def mask_geometry(transform: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The geometric part of a torchvision ``ImageClassification`` preset (resize shorter side, centre crop)
    applied to a mask, or None for transforms whose geometry is unknown."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    resize, crop = getattr(transform, "resize_size", None), getattr(transform, "crop_size", None)
    if resize is None or crop is None:
        return None

    def mask(m: torch.Tensor) -> torch.Tensor:
        t = TF.resize(m[None].float(), list(resize), interpolation=InterpolationMode.NEAREST)
        return TF.center_crop(t, list(crop))[0] > 0.5

    return mask


def _read_masks(csv_path: Path, root: Path, wanted: list[Path]) -> dict[Path, tuple]:
    """``{image path: (bool array (H, W) or box (x0, y0, x1, y1), mask name, CSV line)}`` of the wanted images.

    Every row is checked, wanted or not: its path must be an image inside the data folder and its
    box four finite numbers (a mask file must exist; only the wanted ones are decoded).
    """
    from PIL import Image

    if not csv_path.is_file():
        raise DataFolderError(f"masks CSV {csv_path} does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataFolderError(f"masks CSV {csv_path} cannot be read: {e}") from None
    if not rows:
        raise DataFolderError(f"masks CSV {csv_path} has no rows (expected a header path,mask or path,x0,y0,x1,y1)")
    cols = set(rows[0])
    box_cols = ("x0", "y0", "x1", "y1")
    if "path" not in cols or not ("mask" in cols or all(c in cols for c in box_cols)):
        raise DataFolderError(
            f"masks CSV {csv_path} needs the columns path and mask, or path,x0,y0,x1,y1; it has "
            f"{', '.join(sorted(c for c in cols if c)) or 'none'}"
        )
    wanted_set = {p.resolve() for p in wanted}
    real_root = root.resolve()
    out: dict[Path, tuple] = {}
    for i, row in enumerate(rows, start=2):
        where = f"masks CSV {csv_path} line {i}"
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DataFolderError(f"{where}: empty path")
        img_path = (root / rel).resolve()
        if not img_path.is_relative_to(real_root):
            raise DataFolderError(
                f"{where}: {rel!r} lies outside the data folder {root}; paths are relative to the data folder "
                "(e.g. cat/001.png)"
            )
        if not img_path.is_file():
            raise DataFolderError(f"{where}: {rel!r} is not an image of the data folder {root}")
        mval = (row.get("mask") or "").strip() if "mask" in cols else ""
        if mval:
            mp = Path(mval) if Path(mval).is_absolute() else csv_path.parent / mval
            if not mp.is_file() and (root / mval).is_file():
                mp = root / mval
            if not mp.is_file():
                raise DataFolderError(f"{where}: mask {mval!r} does not exist (relative to the CSV's folder)")
            if img_path not in wanted_set:
                continue  # not selected (--limit) or unreadable
            try:
                with Image.open(mp) as im:
                    arr = np.asarray(im.convert("L")) > 0
            except Exception as e:
                raise DataFolderError(f"{where}: mask {mval!r} cannot be read ({type(e).__name__}: {e})") from None
            entry: tuple = (arr, mval, i)
        else:
            try:
                x0, y0, x1, y1 = (float(row[c]) for c in box_cols)
            except (TypeError, ValueError, KeyError):
                raise DataFolderError(
                    f"{where}: the box x0,y0,x1,y1 of {rel!r} must be four numbers (pixels of the original image)"
                ) from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise DataFolderError(
                    f"{where}: the box of {rel!r} has a coordinate that is not a finite number "
                    f"({row['x0']},{row['y0']},{row['x1']},{row['y1']}); give pixels of the original image"
                )
            if not (x1 > x0 and y1 > y0):
                raise DataFolderError(
                    f"{where}: box of {rel!r} is empty (need x1 > x0 and y1 > y0, got {x0:g},{y0:g},{x1:g},{y1:g})"
                )
            entry = ((x0, y0, x1, y1), None, i)
        if img_path in wanted_set:
            out[img_path] = entry
    return out


def _mask_maker(entry: tuple, path: Path, csv_path: Path) -> Callable[[int, int], torch.Tensor]:
    val, name, line = entry
    if isinstance(val, tuple):
        x0, y0, x1, y1 = val

        def box(w: int, h: int) -> torch.Tensor:
            m = torch.zeros(h, w, dtype=torch.bool)
            m[max(0, int(round(y0))) : min(h, int(round(y1))), max(0, int(round(x0))) : min(w, int(round(x1)))] = True
            return m

        box.where = f"masks CSV {csv_path} line {line}"  # type: ignore[attr-defined]
        return box

    def mask(w: int, h: int) -> torch.Tensor:
        if val.shape != (h, w):
            raise DataFolderError(
                f"mask {name!r} (from {csv_path}) is {val.shape[1]}x{val.shape[0]} but its image {path} is {w}x{h}"
            )
        return torch.from_numpy(val.copy())

    mask.where = f"masks CSV {csv_path} line {line}"  # type: ignore[attr-defined]
    return mask


class MaskSet:
    """The masks of the selected images: ``makers`` (``{path: (w, h) -> bool mask}``) and ``dropped``
    (``[(path, reason)]``: images left out because their object is empty in the analysed image)."""

    def __init__(self, makers: dict[Path, Callable], dropped: list[tuple[Path, str]]) -> None:
        self.makers, self.dropped = makers, dropped


def load_masks(csv_path: Path, root: Path, images: list[Path], geometry: Callable) -> MaskSet:
    """Read and check the masks of ``images`` (every one needs a row); ``geometry`` maps an original-size
    mask to the analysed one. Images whose object is empty there are dropped (see :class:`MaskSet`)."""
    from PIL import Image

    entries = _read_masks(csv_path, root, images)
    lacking = [p for p in images if p.resolve() not in entries]
    if lacking:
        raise DataFolderError(
            f"masks CSV {csv_path} has no row for {lacking[0].relative_to(root)} ({len(lacking)} of "
            f"{len(images)} selected images lack one): give every image a mask or a box, or "
            "leave the masks out"
        )
    makers: dict[Path, Callable] = {}
    dropped: list[tuple[Path, str]] = []
    for p in images:
        entry = entries[p.resolve()]
        val, name, line = entry
        with Image.open(p) as im:
            w, h = im.size
        if not isinstance(val, tuple) and val.shape != (h, w):
            raise DataFolderError(
                f"masks CSV {csv_path} line {line}: mask {name!r} is {val.shape[1]}x{val.shape[0]} pixels "
                f"but its image {p.relative_to(root)} is {w}x{h}"
            )
        make = _mask_maker(entry, p, csv_path)
        m = make(w, h)
        if not bool(m.any()):
            why = "its box lies outside the image or covers no pixel" if name is None else "its mask is all zero"
        elif not bool(geometry(m).any()):
            why = "its object vanishes in the resized/cropped image"
        else:
            makers[p] = make
            continue
        dropped.append((p, f"line {line}: {why}"))
    return MaskSet(makers, dropped)
