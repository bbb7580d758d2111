"""One run at a time per output folder.

Two tunelens commands writing into the same ``--out`` would replace each other's checkpoints and report. The
first takes an exclusive ``flock`` on ``OUT/.tunelens.lock`` (the kernel releases it when the process ends, even
killed) and writes its pid, command and start time there; a second is refused with one line naming the first.
A folder that the run created only to hold the lock is removed again when the run leaves nothing else in it,
so a run refused for bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "OutInUseError", "OutPathError", "check_out_path", "out_lock"]

LOCK_NAME = ".tunelens.lock"


class OutInUseError(FileExistsError):
    """Another tunelens run holds the output folder."""


class OutPathError(NotADirectoryError):
    """``--out`` names something that cannot become the output folder."""


def check_out_path(out: str | os.PathLike, flag: str = "--out") -> None:
    """:class:`OutPathError` when ``out`` cannot hold a run's output: a file, a dangling link, a path below a
    file, or a place this user cannot write in."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise OutPathError(
            f"{flag} {out} is a dangling symbolic link (to {os.readlink(out)}); create its target or give another {flag}"
        )
    if out.exists() and not out.is_dir():
        raise OutPathError(f"{flag} {out} is a file; give a folder")
    anc = out
    while not anc.exists():
        if anc.is_symlink():
            raise OutPathError(
                f"{flag} {out}: {anc} is a dangling symbolic link; create its target or give another {flag}"
            )
        anc = anc.parent
    if not anc.is_dir():
        raise OutPathError(f"{flag} {out} lies below {anc}, which is a file; give a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutPathError(f"{flag} {out}: cannot write in {anc}; give a folder you can write in")


def _holder(fd: int) -> str:
    """Who holds the lock, as its lock file says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return f"pid {info['pid']}, `{info.get('command', '?')}`, since {info.get('started', '?')}"


@contextmanager
def out_lock(out: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold ``out`` for the block; :class:`OutPathError` when it cannot be an output folder
    (:func:`check_out_path`), :class:`OutInUseError` when another run holds it (both exit 2)."""
    out = Path(out)
    check_out_path(out)
    created = []  # folders made here, innermost first
    p = out
    while not p.exists():
        created.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutInUseError(
                f"--out {out} is in use by another tunelens run ({_holder(fd)}); wait for it to end or give "
                "another --out"
            ) from None
        stamp = {
            "pid": os.getpid(),
            "command": command or " ".join(["tunelens", *sys.argv[1:]]),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(stamp).encode(), 0)
        try:
            yield out
        finally:
            with contextlib.suppress(OSError):  # gone before it is unlocked: a later process makes a new one
                os.unlink(path)
    finally:
        os.close(fd)  # releases the flock
        for folder in created:  # innermost first; only the ones the run left empty
            try:
                folder.rmdir()
            except OSError:
                break
