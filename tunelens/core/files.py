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
    "OWNER_MARKER",
    "CorruptFileError",
    "ForeignFolderError",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_owned_folder",
    "claim_folder",
    "read_json",
    "sha256_file",
    "versions",
    "write_folder_atomically",
    "write_owned_folder",
]

#: The file tunelens writes into every folder it owns (results/, report/, checkpoints/): JSON with the
#: tool's name and a run id. Only a folder holding it is ever replaced or written into.
OWNER_MARKER = ".tunelens-output"


class ForeignFolderError(FileExistsError):
    """A folder tunelens would replace or write into, but did not create (no :data:`OWNER_MARKER`)."""


class CorruptFileError(ValueError):
    """A file tunelens wrote that cannot be read back (not JSON, or without the expected entries)."""


def read_json(path: str | os.PathLike, fix: str, key: str | None = None):
    """The JSON in ``path`` (its ``key`` entry when given); :class:`CorruptFileError` naming the file and ``fix``."""
    import json

    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}): it is damaged; {fix}") from None
    if key is None:
        return obj
    if not isinstance(obj, dict) or key not in obj:
        raise CorruptFileError(f"{path} has no {key!r} entry: it is damaged or not tunelens's; {fix}")
    return obj[key]


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


def check_owned_folder(folder: str | os.PathLike, flag: str = "--out") -> None:
    """Raise :class:`ForeignFolderError` when ``folder`` exists but tunelens did not create it.

    An absent folder, an empty one, and one holding :data:`OWNER_MARKER` pass; anything else would
    lose someone's files when tunelens replaced it.
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if not folder.is_dir():
        raise ForeignFolderError(f"{folder} exists and is not a folder; move it away or give another {flag}")
    if (folder / OWNER_MARKER).is_file():
        return
    try:
        empty = not any(folder.iterdir())
    except OSError as e:
        raise ForeignFolderError(f"{folder} cannot be read ({e.strerror}); give another {flag}") from None
    if not empty:
        raise ForeignFolderError(
            f"{folder} holds files tunelens did not write (it has no {OWNER_MARKER} marker) and would be "
            f"replaced: give another {flag}, or move the folder away"
        )


def _marker_text(kind: str, run_id: str | None) -> str:
    import datetime
    import json
    import uuid

    return json.dumps(
        {
            "tool": "tunelens",
            "kind": kind,
            "run_id": run_id or uuid.uuid4().hex,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        indent=2,
    )


def claim_folder(folder: str | os.PathLike, run_id: str | None = None, flag: str = "--out") -> Path:
    """Create ``folder`` (or take an empty one) and mark it as tunelens's; an owned one is kept as it is.

    :class:`ForeignFolderError` when it holds files tunelens did not write (see :func:`check_owned_folder`).
    """
    folder = Path(folder)
    check_owned_folder(folder, flag)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OWNER_MARKER
    if not marker.is_file():
        atomic_write_text(marker, _marker_text(folder.name, run_id))
    return folder


def write_owned_folder(
    folder: str | os.PathLike, fill: Callable[[Path], None], run_id: str | None = None, flag: str = "--out"
) -> Path:
    """:func:`write_folder_atomically`, for a folder tunelens owns: the new folder gets :data:`OWNER_MARKER`,
    and an existing folder without it is never replaced (:class:`ForeignFolderError`, nothing written)."""
    folder = Path(folder)
    check_owned_folder(folder, flag)

    def fill_and_mark(tmp: Path) -> None:
        fill(tmp)
        (tmp / OWNER_MARKER).write_text(_marker_text(folder.name, run_id))

    return write_folder_atomically(folder, fill_and_mark)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "captum", "scikit-learn", "pandas", "numpy", "safetensors", "tunelens"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
