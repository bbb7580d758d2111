"""Files that are whole or absent: atomic writes of files and folders, hashes, library versions."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "OWNER_MARKER",
    "CheckpointError",
    "CorruptFileError",
    "ForeignFolderError",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_owned_folder",
    "chmod_like_new",
    "claim_folder",
    "read_json",
    "sha256_file",
    "umask",
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


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, incomplete or not what was expected."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_UMASK: int | None = None


def umask() -> int:
    """The process umask (read once: ``os.umask`` can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        old = os.umask(0)
        os.umask(old)
        _UMASK = old
    return _UMASK


def chmod_like_new(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (mkstemp and mkdtemp make it 0600/0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def atomic_replace(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        chmod_like_new(tmp)
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


def _versions_of(folder: Path) -> re.Pattern:
    """Names of the hidden siblings :func:`write_folder_atomically` makes for ``folder`` (and only those)."""
    return re.compile(rf"\.{re.escape(folder.name)}\.(link-)?[a-z0-9_]{{8}}(-old)?")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def write_folder_atomically(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` in a versioned sibling, then switch ``folder`` to it in one step.

    ``folder`` is a symbolic link to a hidden sibling ``.NAME.<id>`` that holds the contents.
    The new version is filled beside it and the link is replaced atomically (``os.replace`` of a
    new link), so at every instant, killed or not, ``folder`` is the complete old or the complete
    new folder; then the old version is removed. When ``fill`` (or anything) fails, ``folder``
    stays as it was and the new version is removed. Readers use ``folder/...`` paths as usual.
    A ``folder`` that is a real directory (written by an older tunelens) is exchanged with the link
    in one step (Linux ``renameat2``); where that is unavailable it is moved aside first and moved
    back on failure (or, after a kill in between, by the next call).
    """
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    ours = _versions_of(folder)
    prefix = f".{folder.name}."
    if not folder.exists() and not folder.is_symlink():  # a migration killed between its two steps
        for p in parent.glob(f"{glob.escape(prefix)}*-old"):
            if ours.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                os.rename(p, folder)
                break
    new = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    vid = new.name[len(prefix) :]
    link = parent / f"{prefix}link-{vid}"
    old: Path | None = None
    moved: Path | None = None  # a real directory moved aside, moved back on failure
    try:
        chmod_like_new(new, folder=True)
        fill(new)
        if folder.is_symlink():
            target = os.readlink(folder)
            if os.sep not in target and ours.fullmatch(target):
                old = parent / target  # a version of ours: removed after the switch
            os.symlink(new.name, link)
            os.replace(link, folder)
        elif folder.exists():
            os.symlink(new.name, link)
            if _exchange(link, folder):  # one step: ``folder`` is the link, ``link`` the old directory
                old = link
            else:
                moved = parent / f"{prefix}{vid}-old"
                os.rename(folder, moved)
                old = moved
                os.replace(link, folder)
        else:
            os.symlink(new.name, link)
            os.replace(link, folder)
        moved = None
    except BaseException:
        with contextlib.suppress(OSError):
            link.unlink(missing_ok=True)
        if moved is not None and not folder.exists() and not folder.is_symlink():
            os.rename(moved, folder)
        shutil.rmtree(new, ignore_errors=True)
        raise
    # switched: remove the old version, and versions and links left behind by killed runs
    if old is not None:
        _remove(old)
    for p in parent.glob(f"{glob.escape(prefix)}*"):
        if p.name != new.name and ours.fullmatch(p.name) and (p.is_symlink() or _age(p) > 600):
            _remove(p)
    return folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _age(p: Path) -> float:
    try:
        return time.time() - p.lstat().st_mtime
    except OSError:
        return 0.0


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
