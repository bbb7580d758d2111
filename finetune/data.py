"""The embedded default data: generated shape images with ground-truth object masks.

Offline and deterministic from a seed. Two related tasks share one image
distribution (random shapes with random colour, size, position and rotation on
textured, cluttered backgrounds):

* the **source** task (pretraining) classifies 8 shapes;
* the **target** task (fine-tuning) classifies 6 *other* shapes.

Edges, corners, colour blobs and textures transfer from source to target; what
composes them into a class must adapt. Every image comes with its object mask, so
attributions can be checked against where the evidence really is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MEAN", "SOURCE_CLASSES", "STD", "TARGET_CLASSES", "ShapesDataset", "ShapesSpec", "make_shapes"]

SOURCE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "hexagon", "half_disk")
TARGET_CLASSES = ("ellipse", "crescent", "l_shape", "t_shape", "heart", "arrow")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _polygon(r, th, n, radius):
    """Inside a regular n-gon of circumradius ``radius`` (polar coordinates)."""
    sector = 2 * np.pi / n
    local = np.mod(th, sector) - sector / 2
    return r * np.cos(local) <= radius * np.cos(np.pi / n)


def _shape_mask(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape; x, y are rotated, scaled coordinates (~[-1, 1])."""
    r = np.hypot(x, y)
    th = np.arctan2(y, x)
    if name == "circle":
        return r <= 0.9
    if name == "square":
        return (np.abs(x) <= 0.7) & (np.abs(y) <= 0.7)
    if name == "triangle":
        return _polygon(r, th + np.pi / 2, 3, 1.0)
    if name == "cross":
        return ((np.abs(x) <= 0.28) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.28) & (np.abs(x) <= 0.95))
    if name == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if name == "star":
        return r <= 0.55 + 0.4 * np.cos(5 * th)
    if name == "hexagon":
        return _polygon(r, th, 6, 0.9)
    if name == "half_disk":
        return (r <= 0.95) & (y >= -0.1)
    if name == "ellipse":
        return (x / 0.95) ** 2 + (y / 0.45) ** 2 <= 1
    if name == "crescent":
        return (r <= 0.9) & (np.hypot(x - 0.45, y) >= 0.7)
    if name == "l_shape":
        return ((x >= -0.8) & (x <= -0.3) & (np.abs(y) <= 0.9)) | ((x >= -0.8) & (x <= 0.8) & (y >= 0.4) & (y <= 0.9))
    if name == "t_shape":
        return ((np.abs(x) <= 0.25) & (y >= -0.9) & (y <= 0.6)) | ((np.abs(x) <= 0.9) & (y >= 0.35) & (y <= 0.85))
    if name == "heart":
        xs, ys = x * 1.25, -y * 1.25 + 0.2
        return (xs**2 + ys**2 - 1) ** 3 - xs**2 * ys**3 <= 0
    if name == "arrow":
        shaft = (np.abs(y) <= 0.2) & (x >= -0.9) & (x <= 0.2)
        head = (x >= 0.1) & (x <= 0.95) & (np.abs(y) <= (0.95 - x) * 0.8)
        return shaft | head
    raise ValueError(f"unknown shape {name!r}")


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate. The split sizes are images per class."""

    task: str = "target"  # "source" or "target"
    image_size: int = 32
    train_per_class: int = 40
    val_per_class: int = 20
    test_per_class: int = 60
    seed: int = 0
    clutter: int = 3  # number of random distractor strokes per image
    classes: tuple[str, ...] = field(default=())
    std: float = STD[0]  # images are (x - 0.5) / std; the ImageNet preset uses 0.5, as its weights expect

    def __post_init__(self) -> None:
        if self.task not in ("source", "target"):
            raise ValueError(f"task must be 'source' or 'target', got {self.task!r}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if not self.classes:
            object.__setattr__(self, "classes", SOURCE_CLASSES if self.task == "source" else TARGET_CLASSES)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["name"] = "shapes"
        return d


class ShapesDataset(Dataset):
    """In-memory images (normalised float tensors), labels and boolean object masks.

    Items are ``(image, label, mask)``: ``image`` is ``3 x H x W``, ``mask`` is ``H x W``.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, classes: tuple[str, ...]
    ) -> None:
        self.images, self.labels, self.masks, self.classes = images, labels, masks, tuple(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.masks[i]


def _render(rng: np.random.Generator, names: list[str], size: int, clutter: int):
    n = len(names)
    ss = 2  # supersampling for anti-aliased edges
    s = size * ss
    lin = (np.arange(s) + 0.5) / s * 2 - 1
    gx, gy = np.meshgrid(lin, lin)  # (s, s)
    # background: smooth colour gradient + fine texture
    c0, c1 = rng.uniform(0, 1, (n, 3, 1, 1)), rng.uniform(0, 1, (n, 3, 1, 1))
    ang = rng.uniform(0, 2 * np.pi, (n, 1, 1, 1))
    t = (np.cos(ang) * gx + np.sin(ang) * gy + 1) / 2
    img = c0 * (1 - t) + c1 * t
    img = 0.6 * img + 0.2
    # clutter: thin random line segments in random colours
    for _ in range(clutter):
        p = rng.uniform(-1, 1, (n, 2, 1, 1))
        d = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        length = rng.uniform(0.3, 0.9, (n, 1, 1))
        vx, vy = np.cos(d), np.sin(d)
        rx, ry = gx - p[:, 0], gy - p[:, 1]
        along = rx * vx + ry * vy
        across = np.abs(-rx * vy + ry * vx)
        line = (across <= 0.035) & (np.abs(along) <= length)
        col = rng.uniform(0, 1, (n, 3, 1, 1))
        img = np.where(line[:, None], col, img)
    # the object
    scale = rng.uniform(0.35, 0.6, n)
    cx, cy = rng.uniform(-1, 1, (2, n)) * (1 - scale - 0.05)
    rot = rng.uniform(0, 2 * np.pi, n)
    masks = np.zeros((n, s, s), dtype=bool)
    for i, name in enumerate(names):
        dx, dy = (gx - cx[i]) / scale[i], (gy - cy[i]) / scale[i]
        c, sn = np.cos(rot[i]), np.sin(rot[i])
        masks[i] = _shape_mask(name, c * dx + sn * dy, -sn * dx + c * dy)
    bg_mean = img.mean(axis=(2, 3))
    fg = rng.uniform(0, 1, (n, 3))
    # keep the object visible: push its colour away from the mean background colour
    far = np.abs(fg - bg_mean).sum(1) < 0.6
    fg[far] = 1 - bg_mean[far]
    img = np.where(masks[:, None], fg[:, :, None, None], img)
    img = img + rng.normal(0, 0.04, img.shape)
    img = img.reshape(n, 3, size, ss, size, ss).mean(axis=(3, 5))
    mask = masks.reshape(n, size, ss, size, ss).mean(axis=(2, 4)) >= 0.5
    return np.clip(img, 0, 1).astype(np.float32), mask


def make_shapes(spec: ShapesSpec) -> dict[str, ShapesDataset]:
    """Generate the ``train``, ``val`` and ``test`` splits of one task, deterministically from ``spec.seed``."""
    out = {}
    task_offset = 0 if spec.task == "source" else 1_000_003
    for k, (split, per) in enumerate(
        (("train", spec.train_per_class), ("val", spec.val_per_class), ("test", spec.test_per_class))
    ):
        if per < 1:
            raise ValueError(f"{split}_per_class must be at least 1, got {per}")
        rng = np.random.default_rng([spec.seed, task_offset, k])
        labels = np.repeat(np.arange(len(spec.classes)), per)
        rng.shuffle(labels)
        imgs, masks = _render(rng, [spec.classes[c] for c in labels], spec.image_size, spec.clutter)
        x = (torch.from_numpy(imgs) - torch.tensor(MEAN)[:, None, None]) / spec.std
        out[split] = ShapesDataset(
            x.contiguous(), torch.from_numpy(labels).long(), torch.from_numpy(masks), spec.classes
        )
    return out


def denormalize(x: torch.Tensor, std: float = STD[0]) -> torch.Tensor:
    """Undo the normalisation (for display); ``std``: the spec's."""
    return (x * std + torch.tensor(MEAN)[:, None, None]).clamp(0, 1)
