"""Loading checkpoints that tunelens did not write: safely, from the layouts people actually save.

Accepted files (recognised by their content, not their suffix):

* **safetensors** (``.safetensors``), read with :func:`safetensors.torch.load_file`;
* **torch.save** files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``), read with
  ``torch.load(weights_only=True)``: tensors and plain containers only, so a pickle can
  never run code while it loads. The state dict may be the whole file, or nested under
  ``state_dict`` (Lightning), ``model`` (torchvision's reference scripts),
  ``model_state_dict``, ``module``, ``net`` ...; the bookkeeping next to it (epoch,
  optimizer state, ``argparse.Namespace`` arguments, Lightning's ``AttributeDict``
  hyper-parameters) is read as plain data and ignored.
* ``torchvision:WEIGHTS`` (``torchvision:IMAGENET1K_V1``, ``torchvision:ResNet18_Weights.DEFAULT``):
  torchvision's pretrained weights for the architecture, read from the local torch hub
  cache (``torch.hub.get_dir()/checkpoints``); never downloaded.

Parameter names lose the wrappers' prefixes: ``module.`` (DistributedDataParallel,
DataParallel), ``_orig_mod.`` (``torch.compile``), and -- in :func:`load_model`, when the
model itself has no such prefix -- a prefix shared by every key (Lightning's ``model.``).

Every failure is a :class:`CheckpointLoadError` (a ``ValueError``) whose message names the
file, what is wrong and what to do about it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelens.core.files import CheckpointError

from .weights import ArchitectureMismatch

__all__ = [
    "CheckpointArchitectureError",
    "CheckpointLoadError",
    "ClassCountError",
    "check_finite",
    "infer_num_classes",
    "is_torchvision_spec",
    "load_model",
    "load_state_dict",
    "suggest_archs",
    "torchvision_weights",
    "torchvision_weights_file",
]

#: Keys under which checkpoints nest the model's state dict, in order of preference.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "model_ema", "ema")

#: Non-tensor classes that training scripts store beside the weights and that are safe to read as data:
#: ``argparse.Namespace`` itself, and Lightning's ``AttributeDict`` (a dict subclass) read as a plain dict.
_SAFE_EXTRA = [
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


# ----------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------


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


def _torch_load(path: Path) -> Any:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
                raise CheckpointLoadError(
                    f"{path} is a TorchScript archive (torch.jit.save), not a state dict: load it in your own code "
                    "with torch.jit.load and save model.state_dict() with torch.save or safetensors"
                )
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointLoadError(
            f"{path} is truncated or corrupt (cannot read it as a torch.save zip archive: {e}); copy or save it again"
        ) from e
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal says enough
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e) or "GLOBAL" in str(e) or "global" in str(e):
            raise _refused(path, e) from None
        raise CheckpointLoadError(f"{path} is truncated or corrupt ({_first_line(e)}); copy or save it again") from None
    except CheckpointLoadError:
        raise
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, AttributeError, TypeError, IndexError) as e:
        if _unsafe_globals(path):
            raise _refused(path, e) from None
        raise CheckpointLoadError(
            f"{path} is truncated or corrupt: torch.load failed with {type(e).__name__}: "
            f"{_first_line(e)}; copy or save it again"
        ) from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    line = s.splitlines()[0] if s else type(e).__name__
    line = line.split(". ")[0].rstrip(".")
    return line[:300]


def _read(path: Path) -> Any:
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
                f"{_first_line(e)}); copy or save it again"
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


# ----------------------------------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------------------------------


def _is_tensor_map(m: Any) -> bool:
    return isinstance(m, Mapping) and len(m) > 0 and all(isinstance(v, torch.Tensor) for v in m.values())


def _extract(obj: Any, path: Path, where: str = "") -> dict[str, torch.Tensor]:
    loc = f" (under {where})" if where else ""
    if isinstance(obj, torch.Tensor):
        raise CheckpointLoadError(
            f"{path} is not a checkpoint: it holds a single tensor of shape {tuple(obj.shape)}, "
            "not a mapping of parameter names to tensors (a state dict)"
        )
    if not isinstance(obj, Mapping):
        raise CheckpointLoadError(
            f"{path} is not a checkpoint: it holds a {type(obj).__name__}{loc}, expected a "
            "mapping of parameter names to tensors (save it with torch.save(model.state_dict(), "
            "...))"
        )
    if _is_tensor_map(obj):
        return dict(obj)
    for key in NESTED_KEYS:
        if key in obj and isinstance(obj[key], Mapping) and obj[key]:
            try:
                return _extract(obj[key], path, f"{where}[{key!r}]")
            except CheckpointLoadError:
                continue
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    nested = [k for k, v in obj.items() if isinstance(v, Mapping) and _contains_tensors(v)]
    if tensors:
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise CheckpointLoadError(
            f"{path} is not a clean state dict{loc}: entry {bad!r} is a "
            f"{type(obj[bad]).__name__}, not a tensor (beside {len(tensors)} tensors); save "
            "model.state_dict() alone"
        )
    if len(nested) == 1:
        return _extract(obj[nested[0]], path, f"{where}[{nested[0]!r}]")
    if len(nested) > 1:
        raise CheckpointLoadError(
            f"{path} holds several sets of tensors{loc} ({', '.join(map(repr, nested[:5]))}) "
            "and none under a usual name (state_dict, model): save the model's state dict alone"
        )
    keys = ", ".join(map(repr, list(obj)[:6]))
    raise CheckpointLoadError(
        f"{path} is not a checkpoint: it holds no tensors{loc}"
        + (f" (its entries: {keys})" if keys else " (it is empty)")
    )


def _contains_tensors(m: Mapping, depth: int = 0) -> bool:
    if depth > 4:
        return False
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _contains_tensors(v, depth + 1)) for v in m.values()
    )


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(not isinstance(k, str) for k in sd):
        bad = next(k for k in sd if not isinstance(k, str))
        raise CheckpointLoadError(f"state dict key {bad!r} is not a string: this is not a model's state dict")
    out = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in sd.items()}
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (see the module docstring for the layouts), on the CPU, prefixes stripped.

    Raises :class:`CheckpointLoadError` for a missing, empty, truncated or corrupt file, a file
    that is not a checkpoint, and a pickle that would need more than tensors and plain containers
    (it is refused without being run).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointLoadError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointLoadError(f"checkpoint {path} is a folder, expected a .safetensors, .pt or .pth file")
    try:
        obj = _read(path)
    except PermissionError as e:
        raise CheckpointLoadError(f"checkpoint {path} cannot be read: {e.strerror}") from None
    sd = _extract(obj, path)
    sd = _strip_prefixes(sd)
    return {k: (v.detach() if v.requires_grad else v) for k, v in sd.items()}


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor)
        and (v.is_floating_point() or v.is_complex())
        and not bool(torch.isfinite(v).all())
    ]


# ----------------------------------------------------------------------------------------------
# torchvision weights from the local cache
# ----------------------------------------------------------------------------------------------


def is_torchvision_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("torchvision:")


def torchvision_weights(arch: str, spec: str):
    """The torchvision weights enum member named by ``spec`` (``torchvision:IMAGENET1K_V1``,
    ``torchvision:ResNet18_Weights.IMAGENET1K_V1``, ``torchvision:DEFAULT``) for ``arch``."""
    import torchvision.models as tvm

    name = spec.split(":", 1)[1] if is_torchvision_spec(spec) else spec
    if ":" in arch:
        raise CheckpointLoadError(
            f"{spec}: torchvision weights need a torchvision architecture, not the factory {arch!r}"
        )
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise CheckpointLoadError(
            f"{spec}: torchvision has no pretrained weights for architecture {arch!r} ({_first_line(e)})"
        ) from None
    member = name.rsplit(".", 1)[-1]
    prefix = name.rsplit(".", 1)[0] if "." in name else None
    if prefix is not None and prefix != enum.__name__:
        raise CheckpointLoadError(
            f"{spec}: these are weights of another architecture ({prefix}); {arch} takes "
            f"{enum.__name__} ({', '.join(w.name for w in enum)})"
        )
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise CheckpointLoadError(
            f"{spec}: {enum.__name__} has no weights {member!r}; choose one of {choices}"
        ) from None


def torchvision_weights_file(arch: str, spec: str) -> Path:
    """Where torch hub keeps the file of ``spec``'s weights; :class:`CheckpointLoadError` when it is not there.

    Nothing is downloaded: the message says where to put the file and where to get it.
    """
    from urllib.parse import urlparse

    w = torchvision_weights(arch, spec)
    fname = os.path.basename(urlparse(w.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.exists():
        raise CheckpointLoadError(
            f"{spec} for {arch} is not in the local torch cache: put the file {fname} at "
            f"{path} (download it from {w.url}, e.g. with curl -L -o '{path}' '{w.url}'); "
            "tunelens never downloads"
        )
    return path


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def _build(arch: str, num_classes: int, meta: bool = False) -> nn.Module:
    from tunelens.core.architectures import build_model

    if meta:
        with torch.device("meta"):
            return build_model(arch, num_classes)
    return build_model(arch, num_classes)


def _skeleton(arch: str, num_classes: int = 1000) -> nn.Module:
    """The architecture without allocating its weights where possible (meta device)."""
    try:
        return _build(arch, num_classes, meta=True)
    except Exception:
        return _build(arch, num_classes)


def infer_num_classes(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Outputs of the classification head in ``state_dict`` (None when its weight is not there)."""
    from tunelens.core.naming import head_name

    head = head_name(_skeleton(arch))
    w = state_dict.get(f"{head}.weight")
    if w is None or w.ndim < 1:
        return None
    return int(w.shape[0])


_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _align(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename keys to fit the model: a prefix every key shares (``model.``, ``backbone.``), old DenseNet names."""

    def overlap(d):
        return len(model_keys.intersection(d))

    best = sd
    cur = sd
    for _ in range(3):
        firsts = {k.split(".", 1)[0] for k in cur}
        if len(firsts) != 1 or not all("." in k for k in cur):
            break
        p = next(iter(firsts)) + "."
        cur = {k[len(p) :]: v for k, v in cur.items()}
        if overlap(cur) > overlap(best):
            best = cur
    if any(_DENSENET.match(k) for k in best) and overlap(best) < len(best):
        renamed = {(_DENSENET.sub(r"\1\2", k)): v for k, v in best.items()}
        if overlap(renamed) > overlap(best):
            best = renamed
    return best


def _diff(
    sd: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], skip: str | None = None
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    def ignored(k):
        return skip is not None and (k == skip or k.startswith(skip + "."))

    missing = [k for k in ref if k not in sd and not k.endswith("num_batches_tracked") and not ignored(k)]
    unexpected = [k for k in sd if k not in ref and not ignored(k)]
    shaped = [
        (k, tuple(sd[k].shape), tuple(ref[k].shape))
        for k in ref
        if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape) and not ignored(k)
    ]
    return missing, unexpected, shaped


_FAMILIES = [  # (name prefixes of a family, a key only that family has)
    (("resnet", "resnext", "wide_resnet"), "layer1.0.conv1.weight"),
    (("densenet",), "features.denseblock1."),
    (("vit_",), "encoder.layers.encoder_layer_0."),
    (("swin",), ".attn.relative_position_bias_table"),
    (("convnext",), ".layer_scale"),
    (("efficientnet",), "features.1.0.block.0.0.weight"),
    (("mobilenet_v3",), "features.1.block.0.0.weight"),
    (("mobilenet_v2",), "features.1.conv.0.0.weight"),
    (("vgg",), "features.0.weight"),
    (("alexnet",), "features.0.weight"),
    (("squeezenet",), ".squeeze.weight"),
    (("shufflenet",), "stage2.0.branch"),
    (("mnasnet",), "layers.0.weight"),
    (("googlenet",), "inception3a."),
    (("inception",), "Mixed_5b."),
    (("maxvit",), "blocks.0.layers.0."),
    (("regnet",), "trunk_output.block1."),
]


def _family_of(arch: str) -> tuple[str, ...]:
    for prefixes, _ in _FAMILIES:
        if arch.startswith(prefixes):
            return prefixes
    m = re.match(r"[a-z]+", arch)
    return (m.group(0),) if m else ()


def suggest_archs(
    state_dict: Mapping[str, torch.Tensor], arch: str | None = None, k: int = 3, max_candidates: int = 14
) -> list[tuple[str, float]]:
    """torchvision architectures whose state dict fits ``state_dict`` best: ``[(name, fraction of tensors that
    fit by name and shape)]``, best first. Candidates: ``arch``'s family and the families the keys point to."""
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    prefixes: list[str] = []
    if arch and ":" not in arch:
        prefixes += list(_family_of(arch))
    keys = list(state_dict)
    for fam, marker in _FAMILIES:
        if any(marker in key for key in keys):
            prefixes += [p for p in fam if p not in prefixes]
    cands = [n for n in names if n.startswith(tuple(prefixes)) and n != arch and not n.startswith("regnet_y_128")]
    cands = cands[:max_candidates]
    from tunelens.core.naming import head_name

    out = []
    for name in cands:
        try:
            skel = _skeleton(name)
            ref, head = skel.state_dict(), head_name(skel)
        except Exception:
            continue
        sd = _align(dict(state_dict), set(ref))
        fit = sum(
            1
            for key, v in ref.items()
            if key in sd and (tuple(sd[key].shape) == tuple(v.shape) or key.startswith(head + "."))
        )
        out.append((name, fit / max(len(ref), len(sd), 1)))
    out.sort(key=lambda t: -t[1])
    return [t for t in out[:k] if t[1] > 0.5]


def _names(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _mismatch(
    arch: str, what: str, sd: Mapping[str, torch.Tensor], missing, unexpected, shaped
) -> CheckpointArchitectureError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if shaped:
        parts.append(
            f"{len(shaped)} mis-shaped: "
            + ", ".join(
                f"{k} is {'x'.join(map(str, a))} in the checkpoint, {'x'.join(map(str, b))} in {arch}"
                for k, a, b in shaped[:3]
            )
            + (f" (+{len(shaped) - 3} more)" if len(shaped) > 3 else "")
        )
    sugg = suggest_archs(sd, arch)
    if sugg and sugg[0][1] >= 0.999:
        hint = f" It fits {sugg[0][0]} exactly: try --arch {sugg[0][0]}."
    elif sugg:
        hint = (
            " Closest torchvision architectures: "
            + ", ".join(f"{n} ({100 * s:.0f}% of tensors fit)" for n, s in sugg)
            + "."
        )
    else:
        hint = (
            " No torchvision architecture of the same family fits; if you trained your own model class, "
            "pass --arch module:function."
        )
    return CheckpointArchitectureError(f"{what} does not fit architecture {arch}: " + "; ".join(parts) + "." + hint)


def load_model(
    arch: str,
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    num_classes: int | None = None,
    strict: bool = True,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build ``arch`` and load the weights of ``path`` into it; returns the model in eval mode.

    ``arch``: a torchvision classifier name (``resnet50``...), ``tiny_resnet`` or ``module:function``
    (a factory called as ``function(num_classes=...)``, imported from the working directory).
    ``path``: a checkpoint file (see :func:`load_state_dict`), ``torchvision:WEIGHTS`` (from the local
    torch cache, never downloaded) or a state dict. ``num_classes``: None reads it from the head's
    weight; given, it must match (:class:`ClassCountError` otherwise). ``strict=False`` loads what
    fits and ignores the rest (missing, unexpected and mis-shaped entries are in ``model.load_report``).

    Raises :class:`CheckpointLoadError` (file problems), :class:`ClassCountError`,
    :class:`CheckpointArchitectureError` (names the first missing, unexpected and mis-shaped
    keys and suggests the architecture the weights fit), ``ValueError`` for an unknown ``arch``.
    """
    from tunelens.core.naming import head_name

    if isinstance(path, Mapping):
        sd, what = _strip_prefixes(dict(path)), "the state dict"
    elif is_torchvision_spec(path):
        file = torchvision_weights_file(arch, str(path))
        sd, what = load_state_dict(file), f"{path} ({file})"
    else:
        sd, what = load_state_dict(path), f"checkpoint {path}"
    skeleton = _skeleton(arch)
    head = head_name(skeleton)
    sd = _align(sd, set(skeleton.state_dict()))
    hw = sd.get(f"{head}.weight")
    found = int(hw.shape[0]) if hw is not None and hw.ndim >= 1 else None
    if num_classes is None:
        if found is None:
            missing, unexpected, shaped = _diff(sd, skeleton.state_dict())
            raise _mismatch(arch, what, sd, missing, unexpected, shaped)
        num_classes = found
    elif found is not None and found != num_classes:
        raise ClassCountError(
            f"{what} has a {found}-class head ({head}.weight is "
            f"{'x'.join(map(str, hw.shape))}) but {num_classes} classes were asked for: pass "
            f"num_classes={found}, or the checkpoint trained for your {num_classes} classes"
        )
    model = _skeleton(arch, num_classes)
    ref = model.state_dict()
    missing, unexpected, shaped = _diff(sd, ref)
    if strict and (missing or unexpected or shaped):
        raise _mismatch(arch, what, sd, missing, unexpected, shaped)
    fit = {k: v for k, v in sd.items() if k in ref and tuple(v.shape) == tuple(ref[k].shape)}
    buffers = {n for n, _ in model.named_buffers()}
    complete = not missing and buffers <= set(ref) and any(t.is_meta for t in ref.values())
    if complete:  # every tensor comes from the checkpoint: skip the random initialisation
        model = model.to_empty(device="cpu")
        for k, t in model.state_dict().items():
            if k not in fit:  # num_batches_tracked absent from the file
                with torch.no_grad():
                    t.zero_()
    else:
        model = _build(arch, num_classes)
    try:
        model.load_state_dict(fit, strict=False)
    except RuntimeError as e:  # e.g. dtype problems
        raise CheckpointLoadError(f"{what} cannot be loaded into {arch}: {_first_line(e)}") from None
    model.load_report = {"missing": missing, "unexpected": unexpected, "mis_shaped": [k for k, _, _ in shaped]}
    return model.to(device).eval()
