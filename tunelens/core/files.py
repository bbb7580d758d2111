"""Files that are whole or absent: atomic writes of files and folders, hashes, library versions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CheckpointError",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "sha256_file",
    "versions",
    "write_folder_atomically",
]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, incomplete or not what was expected."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_replace(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""

    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_replace(Path(path), w)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_folder_atomically(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` in a temporary sibling, then swap it in for ``folder``.

    A reader sees the old folder or the complete new one, never a half-written one; when ``fill``
    fails, the old folder stays as it was and the temporary one is removed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "captum", "scikit-learn", "pandas", "numpy", "safetensors", "tunelens"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
