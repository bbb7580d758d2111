"""Your own images as the target task: an ImageFolder (one sub-folder per class), optionally with masks.

``image_folder(path)`` returns a dataset of ``(image, label)`` -- or ``(image, label, mask)``
with a masks CSV -- that every analysis accepts. Classes are the sub-folder names in
sorted order (as ``torchvision.datasets.ImageFolder``), so class ``i`` is the ``i``-th output
of a head trained with torchvision's ImageFolder. Every image is converted to RGB
(grayscale, palette, 16-bit, and transparent images composited on white); images that
cannot be decoded are skipped and listed in ``dataset.skipped``.

The default transform resizes each image to ``image_size x image_size`` (no crop, so
nothing outside the analysed square is lost) and normalises with the ImageNet mean and
standard deviation (``normalize="imagenet"``) or not at all (``"none"``: values in [0, 1]).
``transform=`` takes any callable from a PIL image to a tensor instead, e.g. a torchvision
weights' own ``weights.transforms()``.

Masks CSV (optional): a header row with ``path`` (the image's path relative to the data
folder, e.g. ``cat/001.png``) and either ``mask`` (a mask image, relative to the CSV's folder
or absolute; nonzero pixels are the object) or ``x0,y0,x1,y1`` (a bounding box in the
original image's pixel coordinates, corners inclusive-exclusive). Masks are resized and
cropped exactly like their image. Every selected image needs a row; every row is checked up
front (see :mod:`.masks`), and images whose object is empty in the analysed image are left out
and counted in ``dataset.masks_dropped``.

Folders and files are found exactly as ``torchvision.datasets.ImageFolder`` finds them: every
sub-folder is a class, including one whose name starts with ``.`` (``torchvision``'s
``find_classes`` lists every directory), and hidden files and sub-folders inside a class are
read too (an undecodable one, such as a macOS ``._x.jpg``, is skipped and listed).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tunelens.analysis.io.masks import DataFolderError, load_masks, mask_geometry
from tunelens.analysis.io.splits import split_train_test

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataFolderError",
    "ImageFolderData",
    "image_folder",
    "split_train_test",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Decoded images are kept in memory up to this many bytes (float32 tensors); beyond it they are
#: decoded again on every access.
CACHE_BYTES = 2 * 1024**3


def _to_rgb(img) -> tuple[Any, str]:
    """``(RGB image, original mode)``: transparency composited on white, 16-bit scaled to 8 bits."""
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - arr.min()) / (np.ptp(arr) or 1.0)
        img = Image.fromarray((arr * 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB"), mode


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return _to_rgb(im)


def _resize_square(size: int):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    def image(img):
        return TF.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)

    def mask(m: torch.Tensor) -> torch.Tensor:
        return TF.resize(m[None].float(), [size, size], interpolation=InterpolationMode.NEAREST)[0] > 0.5

    return image, mask


class ImageFolderData(Dataset):
    """Images of a class-per-sub-folder tree. Items ``(x, y)`` or ``(x, y, mask)``.

    Attributes: ``classes`` (sorted sub-folder names), ``samples`` (``[(path, label)]``),
    ``targets``, ``root``, ``image_size`` (the side of ``x``), ``modes`` (a Counter of the
    original image modes, e.g. ``{"RGB": 60, "L": 3, "RGBA": 1}``), ``skipped``
    (``[(path, reason)]`` for undecodable files), ``has_masks``, ``transform_description``.
    """

    def __init__(
        self,
        root: Path,
        classes: list[str],
        samples: list[tuple[Path, int]],
        image_fn: Callable,
        mask_fn: Callable | None,
        masks: dict[Path, Any] | None,
        description: str,
        skipped: list[tuple[Path, str]],
        cache: bool | str = "auto",
    ) -> None:
        self.root, self.classes, self.samples = root, list(classes), list(samples)
        self.targets = [y for _, y in self.samples]
        self._image_fn, self._mask_fn, self._masks = image_fn, mask_fn, masks
        self.transform_description = description
        self.skipped = list(skipped)
        self.has_masks = masks is not None
        self.masks_dropped = 0  # images left out because their ground truth is empty (see image_folder)
        self.masks_dropped_files: list[tuple[Path, str]] = []
        self.modes: Counter = Counter()
        self._cache: dict[int, tuple] = {}
        self._use_cache = cache is True
        try:
            first = self._load(0)
        except DataFolderError:
            raise
        except Exception as e:
            raise DataFolderError(
                f"the image transform fails on {self.samples[0][0]}: {type(e).__name__}: {e}"
            ) from None
        self.image_size = tuple(first[0].shape[-2:])
        if cache == "auto":
            self._use_cache = first[0].numel() * 4 * len(self.samples) <= CACHE_BYTES
        if self._use_cache:
            self._cache[0] = first

    def _load(self, i: int) -> tuple:
        path, y = self.samples[i]
        img, _ = _open_rgb(path)
        w, h = img.size
        x = self._image_fn(img)
        if not isinstance(x, torch.Tensor):
            raise DataFolderError(f"the transform returned {type(x).__name__} for {path}, expected a tensor")
        if self._masks is None:
            return x, y
        make = self._masks[path]
        mask_fn = self._mask_fn if self._mask_fn is not None else (lambda m: m)
        try:
            return x, y, mask_fn(make(w, h) if callable(make) else make)
        except DataFolderError:
            raise
        except Exception as e:
            where = getattr(make, "where", "the masks CSV")
            raise DataFolderError(
                f"the ground-truth mask of {path} ({where}) cannot be built: {type(e).__name__}: {e}"
            ) from None

    def reorder_classes(self, order: list[str]) -> None:
        """Relabel in place: class ``order[j]`` becomes label ``j`` (e.g. a head's output order); the samples keep
        their order. ``order`` must name every class once (ValueError otherwise)."""
        if sorted(order) != sorted(self.classes) or len(set(order)) != len(order):
            raise ValueError(f"the class order {order} is not a permutation of {self.classes}")
        new = [order.index(c) for c in self.classes]
        self.samples = [(p, new[y]) for p, y in self.samples]
        self.targets = [y for _, y in self.samples]
        self._cache = {i: (t[0], new[t[1]], *t[2:]) for i, t in self._cache.items()}
        self.classes = list(order)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._use_cache:
            hit = self._cache.get(i)
            if hit is None:
                hit = self._cache[i] = self._load(i)
            return hit
        return self._load(i)

    def describe(self) -> str:
        conv = {m: n for m, n in self.modes.items() if m != "RGB"}
        s = f"{len(self)} images of {len(self.classes)} classes from {self.root}; {self.transform_description}"
        if conv:
            s += "; converted to RGB: " + ", ".join(f"{n} {m}" for m, n in sorted(conv.items()))
        if self.masks_dropped:
            s += f"; {self.masks_dropped} image(s) with an empty ground-truth mask left out"
        if self.skipped:
            s += f"; {len(self.skipped)} unreadable file(s) skipped (first: {self.skipped[0][0]})"
        return s


def _class_dirs(root: Path) -> list[Path]:
    """Every sub-folder, dot folders included, sorted by name: ``torchvision.datasets.folder.find_classes``."""
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if e.is_dir())
    return [root / n for n in names]


def _images_in(d: Path) -> list[Path]:
    out = []
    for dirpath, _, filenames in sorted(os.walk(d, followlinks=True)):  # as torchvision's make_dataset
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath) / f)
    return out


def image_folder(
    path: str | os.PathLike,
    image_size: int = 224,
    normalize: str = "imagenet",
    limit: int | None = None,
    masks_csv: str | os.PathLike | None = None,
    transform: Callable | None = None,
    seed: int = 0,
    cache: bool | str = "auto",
) -> ImageFolderData:
    """A dataset of the images under ``path`` (one sub-folder per class); see the module docstring.

    ``limit``: keep at most that many images, spread evenly over the classes (chosen with
    ``seed``). ``transform``: a callable from a PIL RGB image to a tensor, replacing the
    default resize + normalise. Every image is decoded once here (unreadable ones are
    skipped); :class:`DataFolderError` when the folder is missing or empty, has no class
    sub-folders, a class without readable images, or a bad masks CSV.
    """
    root = Path(path)
    if not root.exists():
        raise DataFolderError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataFolderError(
            f"data folder {root} is a file; expected a folder with one sub-folder of images per class"
        )
    try:
        dirs = _class_dirs(root)
    except PermissionError as e:
        raise DataFolderError(f"data folder {root} cannot be read: {e.strerror}") from None
    if not dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (
            f" (it holds {len(loose)} image(s) directly: move them into one sub-folder per class)"
            if loose
            else " (it is empty)"
            if not any(root.iterdir())
            else ""
        )
        raise DataFolderError(f"data folder {root} has no class sub-folders{hint}; expected ROOT/CLASS/IMAGE files")
    classes = [d.name for d in dirs]
    per_class = [_images_in(d) for d in dirs]
    if not any(per_class):
        raise DataFolderError(
            f"data folder {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} in "
            f"{len(dirs)} class folders)"
        )
    empty = [c for c, ps in zip(classes, per_class, strict=False) if not ps]
    if empty:
        raise DataFolderError(
            f"class folder {root / empty[0]} has no images"
            + (f" (nor {', '.join(empty[1:4])})" if len(empty) > 1 else "")
            + "; remove it or add images: every sub-folder is a class"
            + (
                " (as in torchvision's ImageFolder, folders whose names start with '.' are classes too)"
                if empty[0].startswith(".")
                else ""
            )
        )
    if limit is not None:
        if int(limit) < 1:
            raise DataFolderError(f"limit must be at least 1, got {limit}")
        limit = int(limit)
    if normalize not in ("imagenet", "none"):
        raise DataFolderError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
    if transform is None and (not isinstance(image_size, int) or image_size < 8):
        raise DataFolderError(f"image size must be an integer of at least 8 pixels, got {image_size!r}")

    # decode every candidate once, in round-robin order over the classes: an unreadable file is skipped
    # (and, under a limit, replaced by the next one)
    order = _select_order(per_class, seed)
    target = len(order) if limit is None else min(limit, len(order))
    skipped: list[tuple[Path, str]] = []
    mode_of: dict[Path, str] = {}
    kept: list[tuple[Path, int]] = []
    tried: set[Path] = set()

    def decode(p: Path) -> bool:
        tried.add(p)
        try:
            _, mode = _open_rgb(p)
        except Exception as e:  # PIL raises many types for bad files
            skipped.append((p, f"{type(e).__name__}: {_short(e)}"))
            return False
        mode_of[p] = mode
        return True

    for p, c in order:
        if len(kept) >= target:
            break
        if decode(p):
            kept.append((p, c))
    if not kept:
        raise DataFolderError(
            f"data folder {root} has no readable images: the first, {skipped[0][0]}, cannot be "
            f"decoded ({skipped[0][1]})"
        )
    if limit is None or limit >= len(classes):
        for c, name in enumerate(classes):
            if any(k == c for _, k in kept):
                continue
            found = next((p for p in per_class[c] if p not in tried and decode(p)), None)
            if found is None:
                first = next(p for p, _ in skipped if p in per_class[c])
                raise DataFolderError(
                    f"class folder {root / name} has no readable image (the first, {first}, "
                    f"cannot be decoded: {dict(skipped)[first]})"
                )
            counts = Counter(k for _, k in kept)
            big = max(counts, key=lambda k: counts[k])
            drop = max(i for i, (_, k) in enumerate(kept) if k == big)
            kept[drop] = (found, c)
    kept.sort(key=lambda t: (t[1], str(t[0])))

    if transform is not None:
        image_fn = transform
        desc = f"transform {_describe_transform(transform)}"
        geo = mask_geometry(transform)
    else:
        from torchvision.transforms import functional as TF

        resize, geo = _resize_square(image_size)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else (None, None)

        def image_fn(img, resize=resize, mean=mean, std=std):
            x = TF.to_tensor(resize(img))
            return TF.normalize(x, mean, std) if mean is not None else x

        desc = f"resized to {image_size}x{image_size}, " + (
            "normalised with the ImageNet mean and std" if normalize == "imagenet" else "values in [0, 1]"
        )
    masks = None
    masks_dropped: list[tuple[Path, str]] = []
    if masks_csv is not None:
        if geo is None:
            raise DataFolderError(
                "masks need a transform whose geometry is known: use image_size (the default "
                "transform) or a torchvision weights' transforms(), not a custom transform"
            )
        csv_path = Path(masks_csv)
        mask_set = load_masks(csv_path, root, [p for p, _ in kept], geo)
        if mask_set.dropped:
            gone = {p for p, _ in mask_set.dropped}
            kept = [(p, c) for p, c in kept if p not in gone]
            first, why = mask_set.dropped[0]
            if not kept:
                raise DataFolderError(
                    f"masks CSV {csv_path}: the ground truth of every selected image is empty (first: "
                    f"{first.relative_to(root)}, {why}); fix the boxes or masks, or leave the masks out"
                )
            lost = [name for c, name in enumerate(classes) if not any(k == c for _, k in kept)]
            if lost:
                raise DataFolderError(
                    f"masks CSV {csv_path}: every image of class {lost[0]} has an empty ground truth (first: "
                    f"{first.relative_to(root)}, {why}); fix its boxes or masks, or leave the masks out"
                )
        masks = mask_set.makers
        masks_dropped = mask_set.dropped
        desc += "; ground-truth masks from " + str(csv_path)
    ds = ImageFolderData(root, classes, kept, image_fn, geo, masks, desc, skipped, cache=cache)
    ds.modes = Counter(mode_of[p] for p, _ in kept)
    ds.masks_dropped = len(masks_dropped)
    ds.masks_dropped_files = masks_dropped
    return ds


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _select_order(per_class: list[list[Path]], seed: int) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(seed)
    orders = [list(rng.permutation(len(ps))) for ps in per_class]
    out: list[tuple[Path, int]] = []
    depth = 0
    while any(depth < len(o) for o in orders):
        for c, o in enumerate(orders):
            if depth < len(o):
                out.append((per_class[c][o[depth]], c))
        depth += 1
    return out


def _describe_transform(t: Any) -> str:
    s = repr(t).replace("\n", " ")
    return " ".join(s.split())[:300]
