"""Tensors of a checkpoint read one at a time, without loading the checkpoint: safetensors files, sharded Hugging
Face folders and PyTorch state dicts.

:func:`open_checkpoint` returns a :class:`TensorSource`: the names, shapes and dtypes of every tensor (read from
the files' headers only) and :meth:`TensorSource.read`, which returns one tensor in its stored dtype, in memory
of its own.

* **safetensors** (a ``.safetensors`` file; a folder with ``model.safetensors``, or shards listed by
  ``model.safetensors.index.json``, or shards named ``*-0000i-of-0000N.safetensors``): each file's header is
  checked with ``safetensors.safe_open`` and parsed for the byte range of each tensor; a tensor is read from
  that range into a fresh buffer (``readinto``). ``safe_open``'s own ``get_tensor`` is not used for the data:
  it reads through a memory map of the whole file, whose touched pages stay in the process's resident memory
  until the file is closed, so reading every tensor of a shard would hold the shard.
* **PyTorch** (``.pt``, ``.pth``, ``.bin``): ``torch.load(weights_only=True, mmap=True)``: the zip format is
  memory-mapped and each tensor is paged in when read (copied out by :meth:`read`); the pages read stay
  resident while the file is open, so a ``.pt`` checkpoint costs up to its size in memory (the legacy
  non-zip format cannot be mapped and is loaded whole). Use safetensors for models bigger than memory.

Every problem with the input raises :class:`CheckpointInputError` with one sentence naming the problem and
the fix, before any tensor is read: a missing file or shard, an index naming a file that is not there, a
truncated or malformed file, a tensor listed twice.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CheckpointInputError", "TensorInfo", "TensorSource", "open_checkpoint"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_SHARD = re.compile(r"(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointInputError(ValueError):
    """A checkpoint that cannot be audited as given: one line naming the problem and the fix (exit status 2)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor is and what it is. ``file``/``offset``: its bytes in a safetensors file (None for
    PyTorch files)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSource:
    """The tensors of one checkpoint, by name (in the files' order), read one at a time."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], kind: str, state: dict | None = None) -> None:
        self.path = path
        self.infos = infos
        self.kind = kind  # "safetensors" or "torch"
        self._state = state

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype and shape, in memory of its own (CPU)."""
        info = self.infos[name]
        if self._state is not None:
            return self._state[name].detach().clone()
        flat = torch.empty(info.numel, dtype=info.dtype)
        with open(info.file, "rb", buffering=0) as f:  # type: ignore[arg-type]
            f.seek(info.offset)
            _read_exactly(f, flat, info)
        return flat.reshape(info.shape)

    def chunks(self, name: str, entries: int = 1 << 22) -> Iterator[tuple[int, torch.Tensor]]:
        """Tensor ``name`` flattened, as ``(offset, chunk)`` pieces of at most ``entries`` entries (stored dtype,
        CPU), read one after the other: memory for one piece only."""
        info = self.infos[name]
        if self._state is not None:
            flat = self._state[name].detach().reshape(-1)
            for off in range(0, info.numel, entries):
                yield off, flat[off : off + entries].clone()
            return
        with open(info.file, "rb", buffering=0) as f:  # type: ignore[arg-type]
            f.seek(info.offset)
            for off in range(0, info.numel, entries):
                chunk = torch.empty(min(entries, info.numel - off), dtype=info.dtype)
                _read_exactly(f, chunk, info)
                yield off, chunk


def _read_exactly(f, out: torch.Tensor, info: TensorInfo) -> None:
    """Fill the 1-d tensor ``out`` with the next bytes of the open file ``f``."""
    view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")  # type: ignore[arg-type]
    got = 0
    while got < len(view):
        r = f.readinto(view[got:])
        if not r:
            raise CheckpointInputError(
                f"{info.file} ended while reading {info.name}: the file is truncated; copy or download it again"
            )
        got += r


def _header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file from its header, checked against the file's size."""
    from safetensors import safe_open

    fix = "copy or download it again"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointInputError(f"{file} is truncated ({size} bytes, no safetensors header); {fix}")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointInputError(f"{file} is truncated (its header alone is longer than the file); {fix}")
            head = json.loads(f.read(n))
    except CheckpointInputError:
        raise
    except FileNotFoundError:
        raise CheckpointInputError(f"{file} does not exist; check the path") from None
    except OSError as e:
        raise CheckpointInputError(f"{file} cannot be read ({e.strerror or e}); check its permissions") from None
    except Exception as e:  # JSON or safetensors errors: not a safetensors file
        msg = " ".join(str(e).split())
        raise CheckpointInputError(f"{file} is not a valid safetensors file ({msg}); {fix}") from None
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in head.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise CheckpointInputError(f"{file}: the header entry of {name} is malformed; {fix}")
        dtype = _DTYPES.get(str(meta.get("dtype")))
        if dtype is None:
            raise CheckpointInputError(f"{file}: tensor {name} has dtype {meta.get('dtype')}, which is not supported")
        try:
            start, stop = (int(v) for v in meta["data_offsets"])
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointInputError(f"{file}: the header entry of {name} is malformed; {fix}") from None
        info = TensorInfo(name, shape, dtype, file, 8 + n + start)
        if stop - start != info.nbytes:
            raise CheckpointInputError(f"{file}: tensor {name}'s byte range does not match its shape; {fix}")
        end = max(end, stop)
        out[name] = info
    if 8 + n + end > size:
        raise CheckpointInputError(f"{file} is truncated ({size} bytes, its header describes {8 + n + end}); {fix}")
    try:
        with safe_open(str(file), framework="pt"):  # the library's own checks of the header
            pass
    except Exception as e:
        msg = " ".join(str(e).split())
        raise CheckpointInputError(f"{file} is not a valid safetensors file ({msg}); {fix}") from None
    return out


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder: the index's, ``model.safetensors``, or a full set of shards."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointInputError(
                f"{index} is not a valid index ({type(e).__name__}: {e}); download the model again"
            ) from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointInputError(
                f"{index} names {len(missing)} file(s) that are not in the folder ({', '.join(missing[:3])}): the "
                "download is incomplete; download the missing shards"
            )
        return [folder / f for f in files]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    shards: dict[tuple[str, int], set[int]] = {}
    for p in found:
        m = _SHARD.fullmatch(p.name)
        if m:
            shards.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    for (stem, n), have in shards.items():
        lost = sorted(set(range(1, n + 1)) - have)
        if lost:
            raise CheckpointInputError(
                f"{folder} has {len(have)} of the {n} shards of {stem} (shard {lost[0]} of {n} is missing): the "
                "download is incomplete; download the missing shards"
            )
    if not found:
        raise CheckpointInputError(
            f"{folder} holds no safetensors weights (no {INDEX}, {SINGLE} or *.safetensors); give a Hugging Face "
            "model folder, a .safetensors file or a .pt state dict"
        )
    return found


def _open_safetensors(path: Path, files: list[Path]) -> TensorSource:
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in _header(f).items():
            if name in infos:
                raise CheckpointInputError(
                    f"{path}: tensor {name} is in both {infos[name].file} and {f}; remove the stray file"
                )
            infos[name] = info
    index = path / INDEX if path.is_dir() else None
    if index is not None and index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        wrong = [n for n, f in weight_map.items() if n not in infos or infos[n].file != path / f]
        if wrong:
            raise CheckpointInputError(
                f"{index} places {wrong[0]} in {weight_map[wrong[0]]}, which does not hold it (and "
                f"{len(wrong) - 1} more): the index and shards do not belong together; download the model again"
            )
    return TensorSource(path, infos, "safetensors")


def _open_torch(path: Path) -> TensorSource:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: cannot be mapped
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointInputError(
            f"{path} cannot be read as a PyTorch state dict ({type(e).__name__}: {msg}); save it with "
            "torch.save(model.state_dict(), ...) or as safetensors"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointInputError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointInputError(f"{path} holds no tensors; save model.state_dict()")
    infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()}
    return TensorSource(path, infos, "torch", state)


def open_checkpoint(path: str | os.PathLike, flag: str = "--base") -> TensorSource:
    """The tensors of the checkpoint at ``path`` (see the module docstring); ``flag`` names it in errors."""
    p = Path(path)
    if not p.exists():
        raise CheckpointInputError(f"{flag} {p}: no such file or folder; check the path")
    if p.is_dir():
        if (p / ADAPTER_CONFIG).is_file():
            raise CheckpointInputError(
                f"{flag} {p} is a PEFT adapter folder; an adapter can only be the tuned model (--tuned), with "
                "the model it was trained on as --base"
            )
        return _open_safetensors(p, _safetensors_files(p))
    if p.suffix == ".safetensors":
        return _open_safetensors(p, [p])
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _open_torch(p)
    raise CheckpointInputError(
        f"{flag} {p}: unknown checkpoint type {p.suffix!r}; give a Hugging Face folder, a .safetensors file or "
        "a .pt/.pth state dict"
    )
