"""Reading checkpoint files safely: safetensors, and torch.save files with weights-only unpickling.

A torch.save zip archive has its CRCs checked before torch reads it (torch itself does not), a
plain pickle is read with ``torch.load(weights_only=True)``, and a pickle that would need more than
tensors and plain containers is refused without being run, with the globals it asks for.
Every failure is a :class:`CheckpointLoadError` naming the file and what to do.
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from tunelens.core.files import CheckpointError
from tunelens.core.naming import ArchitectureMismatch

__all__ = ["CheckpointArchitectureError", "CheckpointLoadError", "ClassCountError", "read_checkpoint_file"]

#: Non-tensor classes that training scripts store beside the weights and that are safe to read as data:
#: ``argparse.Namespace`` itself, and Lightning's ``AttributeDict`` (a dict subclass) read as a plain dict.
_SAFE_EXTRA: list[Any] = [
    argparse.Namespace,
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "lightning.pytorch.utilities.parsing.AttributeDict"),
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
]

_CONVERT = (
    "If you trust the file, convert it once in your own Python: "
    "sd = torch.load(PATH, weights_only=False) (then sd = sd['state_dict'] or whichever entry holds the "
    "weights), and save the weights alone with torch.save(model.state_dict(), 'weights.pt') or "
    "safetensors.torch.save_file(sd, 'weights.safetensors')."
)


class CheckpointLoadError(CheckpointError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, unsafe, or of another model."""


class CheckpointArchitectureError(CheckpointLoadError, ArchitectureMismatch):
    """The checkpoint's parameter names or shapes do not fit the architecture."""


class ClassCountError(CheckpointLoadError):
    """The checkpoint's classification head has another number of outputs than asked for."""


def _head_bytes(path: Path, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size and head[8:9] == b"{"


def _pickle_globals(path: Path, limit: int = 10) -> list[str]:
    """Globals a plain pickle refers to, found by reading its opcodes (nothing is executed)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in (
                    "SHORT_BINUNICODE",
                    "BINUNICODE",
                    "UNICODE",
                    "BINUNICODE8",
                    "SHORT_BINSTRING",
                    "BINSTRING",
                    "STRING",
                ):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if op.name == "STOP" or len(found) >= 50:
                    break
    except Exception:  # a damaged pickle: report what was found so far
        pass
    return list(dict.fromkeys(found))[:limit]


def _unsafe_globals(path: Path) -> list[str]:
    try:
        if zipfile.is_zipfile(path):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        pass
    allowed = {
        f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}"
        for g in torch.serialization.get_safe_globals()
        if not isinstance(g, tuple)
    }
    return [
        g for g in _pickle_globals(path) if not g.startswith(("torch.", "collections.OrderedDict")) and g not in allowed
    ]


def _refused(path: Path, err: Exception) -> CheckpointLoadError:
    globs = _unsafe_globals(path)
    if globs:
        what = f"it needs {', '.join(globs[:5])}" + (" ..." if len(globs) > 5 else "")
        why = (
            "; unpickling arbitrary objects or functions can run code, so tunelens only loads tensors and "
            "plain containers (torch.load(weights_only=True))"
        )
    else:
        msg = str(err).strip().splitlines()
        detail = next((ln.strip() for ln in msg if "Unsupported" in ln or "GLOBAL" in ln or "operand" in ln), "")
        what = "it uses pickle features that weights-only loading refuses" + (f" ({detail})" if detail else "")
        why = ""
    return CheckpointLoadError(
        f"checkpoint {path} was refused: {what}{why}. " + _CONVERT.replace("PATH", repr(str(path)))
    )


def _check_zip(path: Path) -> None:
    """A torch.save zip archive, whole: a ``data.pkl``, no TorchScript code, and every member's CRC right.

    torch itself reads the members without checking their CRCs, so a flipped block would load as
    garbage weights."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
                raise CheckpointLoadError(
                    f"{path} is a TorchScript archive (torch.jit.save), not a state dict: load it in your own code "
                    "with torch.jit.load and save model.state_dict() with torch.save or safetensors"
                )
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else "no files"
                raise CheckpointLoadError(
                    f"{path} is not a checkpoint: it is a zip archive without a torch data.pkl ({shown}), so "
                    "torch.save did not write it; unpack it if the checkpoint is inside"
                )
            bad = z.testzip()
    except CheckpointLoadError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, OSError ... from a damaged archive
        raise CheckpointLoadError(
            f"{path} is truncated or corrupt (cannot read it as a torch.save zip archive: {first_line(e)}); "
            "re-save or re-download it"
        ) from None
    if bad is not None:
        raise CheckpointLoadError(f"{path} is corrupt: CRC check failed for member {bad}; re-save or re-download it")


def _torch_load(path: Path) -> Any:
    if zipfile.is_zipfile(path):
        _check_zip(path)
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal says enough
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e) or "GLOBAL" in str(e) or "global" in str(e):
            raise _refused(path, e) from None
        raise CheckpointLoadError(f"{path} is truncated or corrupt ({first_line(e)}); copy or save it again") from None
    except CheckpointLoadError:
        raise
    except Exception as e:  # EOFError, RuntimeError, struct.error, KeyError ... from a damaged file
        if _unsafe_globals(path):
            raise _refused(path, e) from None
        raise CheckpointLoadError(
            f"{path} is truncated or corrupt: torch.load failed with {type(e).__name__}: "
            f"{first_line(e)}; copy or save it again"
        ) from None


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    line = s.splitlines()[0] if s else type(e).__name__
    line = line.split(". ")[0].rstrip(".")
    return line[:300]


def read_checkpoint_file(path: Path) -> Any:
    """The object stored in ``path`` (safetensors or torch.save), read without running code."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointLoadError(f"checkpoint {path} is empty (0 bytes): the copy or save did not finish")
    head = _head_bytes(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointLoadError(
                f"{path} is truncated or corrupt (cannot read it as safetensors: "
                f"{first_line(e)}); copy or save it again"
            ) from None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _torch_load(path)
    text = head.lstrip()[:20].lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        hint = "it is an HTML page (a failed download?)"
    elif text.startswith(b"version https://git-lfs"):
        hint = "it is a Git LFS pointer: fetch the real file with `git lfs pull`"
    elif text.startswith((b"{", b"[")):
        hint = "it looks like JSON"
    elif head.startswith(b"PK"):
        hint = "it is a zip archive that torch.save did not write"
    else:
        hint = f"it starts with bytes {head[:8]!r}"
    raise CheckpointLoadError(f"{path} is not a checkpoint: neither a safetensors file nor a torch.save file ({hint})")
