"""Stages found from the model itself: one traced forward pass of an example input.

A stage map is data, computed once per model and input shape (:func:`stages`), used by fine-tuning
(``last_k`` unfreezing), the weight deltas (aggregated per stage), CKA and the probes (one output per
stage), rewind groups and the report. How it is found:

1. **Units.** Forward hooks on every module record its output shape, how often it ran and in which
   order. The model is split top-down into *units*: a child is expanded into its own children when
   the feature map's resolution changes more than once inside it (VGG's ``features``, EfficientNet's
   ``features``), or when it never runs itself (a ``ModuleList`` whose blocks the parent calls one by
   one); otherwise it stays whole (ResNet's ``layer2``: only its first block downsamples). The
   top-level module holding the classification head is never expanded.
2. **Head.** The unit holding the head (:func:`tunelens.core.naming.head_name`), everything after it,
   and the parameterless units right before it (pooling, flatten, dropout) form the stage ``head``.
3. **Blocks and stem.** A *block* is a container whose children are blocks (ResNet's ``layer1``), or a
   composite module next to one of the same class (MobileNet's ``InvertedResidual``, SqueezeNet's
   ``Fire``). The units before the first block are the stage ``stem``.
4. **Stages.** After the stem, a unit whose output resolution (spatial ``h x w`` in NCHW or NHWC,
   the token count for ``(B, N, D)`` outputs) differs from the previous unit's opens a new stage.
   Networks without downsampling (ViT, text-like encoders) give one such stage: they are split
   instead by the repeated blocks of their largest ``ModuleList``/``Sequential`` (one stage each).
   A timm model's ``feature_info`` (where present) gives the stage ends directly.
5. **Layers.** One output per stage for CKA and the probes: the stage's output module; for token stages
   the class token and the mean patch token (views of the output), or the model's own parameter-free
   readouts where it declares them (``model.token_readouts(module)``: the text wrapper's attention-masked
   mean and [CLS] token, so that padding never enters a Gram matrix). A model whose inputs are not images
   gives its example input itself (``model.example_input()``: token ids for the text wrapper).

A stage is named after its module(s) (``layer2``, ``features.4-5``, ``_blocks.3-5``); ``stem`` and
``head`` as above, so ResNets keep ``stem``, ``layer1`` .. ``layer4``, ``head``.
"""

from __future__ import annotations

import itertools
import re
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .models import eval_mode
from .naming import head_name

__all__ = ["TOKEN_GRID", "Stage", "StageMap", "example_input", "gradcam_layer", "patch_grid", "stages"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Stage:
    """One stage: its ``name``, the ``modules`` (units) that make it, in forward order, the resolution of
    its output (``(h, w)``, ``(tokens,)`` or None when pooled), the module whose output is the stage's
    output, that output's ``layout`` (``nchw``, ``nhwc``, ``tokens``, ``flat``) and ``kind``
    (``stem``, ``body``, ``head``)."""

    name: str
    modules: tuple[str, ...]
    resolution: tuple[int, ...] | None
    output: str | None
    layout: str
    kind: str = "body"


@dataclass(frozen=True)
class StageMap:
    """The stages of one model, how they were found, and the layers chosen from them."""

    stages: tuple[Stage, ...]
    method: str
    input_shape: tuple[int, ...]
    prefix_tokens: int = 0
    gradcam_layer: str | None = None
    gradcam_reason: str = ""
    unused: tuple[str, ...] = ()
    layers: dict[str, str] = field(default_factory=dict)  # CKA/probe layer -> role (stage name, pooled, logits)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def body(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "body"]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {', '.join(self.names)}")

    def stage_of(self, name: str) -> str:
        """The stage a parameter, buffer or module belongs to (longest module-name prefix); names outside every
        stage unit (a class token on the model, an encoder's position embedding) belong to the first stage,
        those of modules that never ran to ``unused``."""
        best, size = None, -1
        for s in self.stages:
            for m in s.modules:
                if (name == m or name.startswith(m + ".")) and len(m) > size:
                    best, size = s.name, len(m)
        if best is not None:
            return best
        if any(name == u or name.startswith(u + ".") for u in self.unused):
            return "unused"
        return self.stages[0].name if self.stages else "model"

    def layer_stage(self, layer: str) -> str:
        """The stage a CKA/probe layer reads: its role in :attr:`layers` where that is a stage, else the stage
        of its module (``head`` for the pooled features and the logits)."""
        role = self.layers.get(layer)
        if role is not None and role in self.names:
            return role
        return self.stage_of(layer.split("[", 1)[0])

    def cka_layers(self, logits: bool = True) -> list[str]:
        """One output per stage (two for token stages: the class token and the mean patch token, or the model's
        own readouts), the pooled features and (``logits``) the head's output."""
        return [n for n, role in self.layers.items() if logits or role != "logits"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "input_shape": list(self.input_shape),
            "stages": [{**asdict(s), "modules": list(s.modules)} for s in self.stages],
            "layers": dict(self.layers),
            "gradcam_layer": self.gradcam_layer,
            "gradcam_reason": self.gradcam_reason,
            "prefix_tokens": self.prefix_tokens,
        }


@dataclass
class _Rec:
    start: int
    shape: tuple[int, ...] | None = None
    calls: int = 0
    end: int = 0


def example_input(model: nn.Module, size: int = 64) -> torch.Tensor:
    """A dummy input batch for ``model``: the model's own ``example_input()`` where it has one (token ids for
    the text wrapper), else an image batch: its first convolution's input channels (3 otherwise), its declared
    ``image_size`` (torchvision ViT) or timm ``pretrained_cfg['input_size']`` where it has one, else ``size``."""
    own = getattr(model, "example_input", None)
    if callable(own):
        return own()
    ch = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    side = getattr(model, "image_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if side is None and isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
        ch, side = cfg["input_size"][0], cfg["input_size"][1]
    side = int(side or size)
    p = next(iter(model.parameters()), None)
    return torch.zeros(1, ch, side, side, device=p.device if p is not None else "cpu")


def _trace(model: nn.Module, x: torch.Tensor) -> dict[str, _Rec]:
    recs: dict[str, _Rec] = {}
    counter = [0]

    def pre(name: str):
        def f(_m, _i):
            if name not in recs:
                recs[name] = _Rec(start=counter[0])
                counter[0] += 1

        return f

    def post(name: str):
        def f(_m, _i, out):
            r = recs[name]
            r.calls += 1
            if r.calls == 1:
                t = out
                while isinstance(t, (tuple, list)) and t:
                    t = t[0]
                r.shape = tuple(t.shape) if isinstance(t, torch.Tensor) else None
                r.end = counter[0]
                counter[0] += 1

        return f

    handles = []
    for n, m in model.named_modules():
        if n:
            handles += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return recs


def _layout(shape: tuple[int, ...] | None, hw: tuple[int, int]) -> str:
    if shape is None:
        return "none"
    if len(shape) == 2:
        return "flat"
    if len(shape) == 3:
        return "tokens"
    if len(shape) != 4:
        return "other"
    ratio = hw[0] / hw[1]
    nchw = abs(shape[2] / shape[3] - ratio) < 1e-6 and shape[2] <= hw[0]
    nhwc = abs(shape[1] / shape[2] - ratio) < 1e-6 and shape[1] <= hw[0]
    if nhwc and not nchw:
        return "nhwc"
    return "nchw"  # NCHW also when ambiguous (C == H == W)


def _resolution(shape: tuple[int, ...] | None, layout: str) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if layout == "nchw":
        return None if shape[2] * shape[3] == 1 else (shape[2], shape[3])
    if layout == "nhwc":
        return None if shape[1] * shape[2] == 1 else (shape[1], shape[2])
    if layout == "tokens":
        return (shape[1],)
    return None


def _composite(m: nn.Module) -> bool:
    return any(True for _ in m.children()) and any(True for _ in m.parameters())


def _prefix_tokens(model: nn.Module) -> int:
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return int(any(hasattr(model, a) for a in ("class_token", "cls_token")))


def _short_name(units: Sequence[str]) -> str | None:
    parents = {u.rsplit(".", 1)[0] if "." in u else "" for u in units}
    if len(parents) != 1:
        return None
    if len(units) == 1:
        return units[0]
    parent = parents.pop()
    leaves = [u.rsplit(".", 1)[-1] for u in units]
    parsed = [re.fullmatch(r"(.*?)(\d+)", leaf) for leaf in leaves]
    if not all(parsed) or len({p.group(1) for p in parsed if p}) != 1:
        return None
    a, b = parsed[0], parsed[-1]
    assert a is not None and b is not None
    return f"{parent + '.' if parent else ''}{a.group(1)}{a.group(2)}-{b.group(2)}"


def _stage_name(units: Sequence[str], blocks: Sequence[str], taken: set[str]) -> str:
    parent = units[0].rsplit(".", 1)[0] if "." in units[0] else ""
    run = [u for u in units if (u.rsplit(".", 1)[0] if "." in u else "") == parent]
    name = _short_name(units) or _short_name(run) or (_short_name(blocks) if blocks else None) or "+".join(units)
    base, i = name, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class _Finder:
    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model = model
        self.mods = dict(model.named_modules())
        self.recs = _trace(model, x)
        self.hw = (int(x.shape[-2]), int(x.shape[-1]))
        self.layouts: dict[str, str] = {}
        for n, r in self.recs.items():
            self.layouts[n] = _layout(r.shape, self.hw)
        try:
            self.head: str | None = head_name(model)
        except ValueError:
            self.head = None
        self.head_top = self.head.split(".")[0] if self.head else None

    def res(self, name: str) -> tuple[int, ...] | None:
        r = self.recs.get(name)
        return _resolution(r.shape, self.layouts.get(name, "none")) if r else None

    def fired(self, name: str) -> bool:
        return name in self.recs

    def units(self, name: str = "", force: frozenset[str] = frozenset(), stop: str | None = None) -> list[str]:
        """Units under ``name``, in forward order. ``force``: expand these; ``stop``: never expand below it."""
        mod = self.mods[name]
        out: list[tuple[int, str]] = []
        for cname, _child in mod.named_children():
            full = f"{name}.{cname}" if name else cname
            if not self.fired(full):
                if any(self.fired(n) for n in self.mods if n.startswith(full + ".")) and full != stop:
                    out += [(self.recs[u].start, u) for u in self.units(full, force, stop)]
                continue
            if full != stop and full != self.head_top and (full in force or self._varies(full)):
                out += [(self.recs[u].start, u) for u in self.units(full, force, stop)]
            else:
                out.append((self.recs[full].start, full))
        return [u for _, u in sorted(out)]

    def _varies(self, name: str) -> bool:
        """The resolution changes between the outputs of ``name``'s children (in forward order) more than once, or
        once between blocks (Swin's ``features`` with two stages; not ConvNeXt's norm + strided conv)."""
        kids = sorted(
            (self.recs[k].start, k)
            for k in (f"{name}.{c}" for c, _ in self.mods[name].named_children())
            if self.fired(k)
        )
        res = [self.res(k) for _, k in kids]
        changes = sum(a != b for a, b in itertools.pairwise(res))
        return changes > 1 or (changes == 1 and any(_composite(self.mods[k]) for _, k in kids))

    def is_block(self, units: list[str], i: int) -> bool:
        m = self.mods[units[i]]
        if isinstance(m, _CONTAINERS):  # a container is a block when it holds blocks (ResNet's layer1)
            return any(_composite(c) for c in m.children())
        if not _composite(m):
            return False
        near = [units[j] for j in (i - 1, i + 1) if 0 <= j < len(units)]
        return any(type(self.mods[u]) is type(m) for u in near)

    def repeated_container(self) -> str | None:
        best, size = None, 0
        for n, m in self.mods.items():
            if not n or not isinstance(m, (nn.Sequential, nn.ModuleList)) or self._in_head(n):
                continue
            kids = list(m.children())
            if len(kids) < 2 or len({type(k) for k in kids}) != 1 or not all(_composite(k) for k in kids):
                continue
            p = sum(t.numel() for t in m.parameters())
            if p > size:
                best, size = n, p
        return best

    def _in_head(self, n: str) -> bool:
        return self.head_top is not None and (n == self.head_top or n.startswith(self.head_top + "."))

    def split_head(self, units: list[str]) -> tuple[list[str], list[str]]:
        if self.head_top is None:
            return units, []
        idx = next((i for i, u in enumerate(units) if self._in_head(u)), len(units))
        # parameterless units right before the head that pool, flatten or resize (not a ReLU on the last map)
        while idx > 0 and not any(True for _ in self.mods[units[idx - 1]].parameters()):
            r = self.res(units[idx - 1])
            if r is not None and idx > 1 and r == self.res(units[idx - 2]):
                break
            idx -= 1
        return units[:idx], units[idx:]

    def last_once(self, units: Sequence[str]) -> str | None:
        for u in reversed(units):
            r = self.recs.get(u)
            if r is not None and r.calls == 1 and r.shape is not None:
                return u
        return None

    def make(self, name: str, units: list[str], kind: str) -> Stage:
        out = self.last_once(units)
        return Stage(
            name,
            tuple(units),
            self.res(out) if out else None,
            out,
            self.layouts.get(out, "none") if out else "none",
            kind,
        )


def _group(f: _Finder, body: list[str], blocks: set[str], by_block: bool) -> tuple[list[str], list[list[str]]]:
    first = next((i for i, u in enumerate(body) if u in blocks), None)
    stem = body[:first] if first is not None else []
    rest = body[first:] if first is not None else body
    groups: list[list[str]] = []
    for u in rest:
        opens = u in blocks if by_block else (not groups or f.res(u) != f.res(groups[-1][-1]))
        if opens or not groups:
            groups.append([u])
        else:
            groups[-1].append(u)
    return stem, groups


def _feature_info_ends(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    items = info.get_dicts() if hasattr(info, "get_dicts") else info
    try:
        return [str(d["module"]) for d in items]
    except (TypeError, KeyError):
        return []


def _find(model: nn.Module, x: torch.Tensor) -> StageMap:
    f = _Finder(model, x)
    units = f.units()
    method = "resolution changes"
    body, head = f.split_head(units)
    blocks = {u for i, u in enumerate(body) if f.is_block(body, i)}
    ends = [e for e in _feature_info_ends(model) if e in f.mods]
    if ends:
        method = "timm feature_info"
        force = frozenset(n for n in f.mods if n and any(e.startswith(n + ".") for e in ends))
        body, head = f.split_head(f.units(force=force))
        groups, cur = [], []
        for u in body:
            cur.append(u)
            if any(e == u or e.startswith(u + ".") for e in ends):
                groups.append(cur)
                cur = []
        if cur and groups:
            groups[-1].extend(cur)
        elif cur:
            groups.append(cur)
        blocks = {u for i, u in enumerate(body) if f.is_block(body, i)}
        stem = groups.pop(0) if len(groups) > 1 and not any(u in blocks for u in groups[0]) else []
    else:
        stem, groups = _group(f, body, blocks, by_block=False)
        cont = f.repeated_container()
        if sum(any(u in blocks for u in g) for g in groups) < 2 and cont is not None:
            force = frozenset(n for n in f.mods if n and cont.startswith(n + "."))
            body, head = f.split_head(f.units(force=force | {cont}, stop=None))
            blocks = {u for u in body if u.startswith(cont + ".") and u.count(".") == cont.count(".") + 1}
            stem, groups = _group(f, body, blocks, by_block=True)
            method = f"repeated blocks of {cont}"
    taken: set[str] = {"stem", "head"}
    out: list[Stage] = []
    if stem:
        out.append(f.make("stem", stem, "stem"))
    for g in groups:
        out.append(f.make(_stage_name(g, [u for u in g if u in blocks], taken), g, "body"))
    if head:
        out.append(f.make("head", head, "head"))
    used = {u for s in out for u in s.modules}
    unused = tuple(n for n in f.mods if n and not f.fired(n) and not any(n.startswith(u + ".") for u in used))
    smap = StageMap(tuple(out), method, tuple(x.shape), _prefix_tokens(model), unused=unused)
    layers = _layers(f, smap)
    gl, why = _gradcam(f, smap)
    return StageMap(smap.stages, method, tuple(x.shape), smap.prefix_tokens, gl, why, unused, layers)


def _layers(f: _Finder, smap: StageMap) -> dict[str, str]:
    out: dict[str, str] = {}
    p = smap.prefix_tokens
    readouts = getattr(f.model, "token_readouts", None)
    for s in smap.stages:
        if s.output is None:
            continue
        if s.kind == "head":
            pooled = f.last_once([u for u in s.modules if not f._in_head(u)])
            if pooled is not None:  # (a stage's own readout when the head reads one: it keeps its stage)
                out.setdefault(pooled + ("[nhwc]" if f.layouts.get(pooled) == "nhwc" else ""), "pooled")
            top = f.last_once([u for u in s.modules if f._in_head(u)])
            if top is not None:
                out[top] = "logits"
            continue
        own = readouts(s.output) if callable(readouts) else None
        if own:  # the model's own readouts of this stage (masked mean and [CLS] of a text encoder layer)
            out.update(dict.fromkeys(own, s.name))
        elif s.layout == "tokens":
            if p:
                out[f"{s.output}[cls]"] = s.name
                out[f"{s.output}[patch_mean{'' if p == 1 else f':{p}'}]"] = s.name
            else:
                out[f"{s.output}[mean]"] = s.name
        elif s.layout == "nhwc":
            out[f"{s.output}[nhwc]"] = s.name
        else:
            out[s.output] = s.name
    return out


def _gradcam(f: _Finder, smap: StageMap) -> tuple[str | None, str]:
    stem = set(smap.stage("stem").modules) if "stem" in smap.names else set()
    units = [u for s in smap.stages for u in s.modules]
    head = set(smap.stage("head").modules) if "head" in smap.names else set()
    last = smap.body[-1].resolution if smap.body else None

    def ok(n: str) -> bool:
        under = lambda group: any(n == u or n.startswith(u + ".") for u in group)
        if under(stem) or any(u.startswith(n + ".") for u in units):  # the stem, or a container split into units
            return False
        return not under(head) or (not f._in_head(n) and f.res(n) == last)  # a head layer: the last map re-laid

    cands = [
        (r.end, n)
        for n, r in f.recs.items()
        if r.calls == 1 and f.layouts.get(n) == "nchw" and f.res(n) is not None and ok(n)
    ]
    at_units = [c for c in cands if c[1] in units]  # stage units first (layer3, not layer4.0.bn1 before its stride)
    if at_units or cands:
        return max(at_units or cands)[1], ""
    tok = [s for s in smap.body if s.layout == "tokens" and s.output and s.resolution]
    if tok and len(smap.input_shape) == 4:  # images cut into patches (text tokens have no grid)
        # token Grad-CAM (TOKEN_GRID): the patch tokens reshaped to the patch grid. With a class-token readout the
        # last block's patch-token outputs never reach the logits (zero gradient), so the layer is the last block's
        # input (the previous block's output), whose patch tokens the last attention reads.
        pick = tok[-2] if smap.prefix_tokens and len(tok) > 1 else tok[-1]
        n_patch = (pick.resolution or (0,))[0] - smap.prefix_tokens
        hw = smap.input_shape[-2:]
        if n_patch > 1 and _grid(n_patch, hw) is not None:
            return f"{pick.output}{TOKEN_GRID}", ""
    if tok:
        return None, (
            "not applicable: the blocks output tokens (B, N, D) that do not form a patch grid of the input's aspect "
            "ratio, and no layer after the patch embedding is spatial"
        )
    return None, "not applicable: no layer after the stem has a spatial output larger than 1x1 at this input size"


#: suffix of a Grad-CAM layer whose output is tokens (B, N, D): its patch tokens are read as a (h, w) grid
TOKEN_GRID = "[grid]"


def _grid(n_patch: int, hw: Sequence[int]) -> tuple[int, int] | None:
    """The patch grid ``(h, w)`` of ``n_patch`` tokens for an input of height and width ``hw`` (same aspect ratio)."""
    h = max(round((n_patch * hw[0] / hw[1]) ** 0.5), 1)
    return (h, n_patch // h) if h * (n_patch // h) == n_patch else None


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, StageMap]] = weakref.WeakKeyDictionary()


def stages(model: nn.Module, example: torch.Tensor | None = None) -> StageMap:
    """The :class:`StageMap` of ``model`` for inputs shaped like ``example`` (one image or a batch; default
    :func:`example_input`). One traced forward pass in eval mode without gradients (the training flag is
    restored), cached per model and input shape."""
    x = example_input(model) if example is None else example
    if x.ndim == 3:
        x = x[None]
    x = x[:1]
    key = tuple(x.shape)
    per = _CACHE.setdefault(model, {})
    if key not in per:
        p = next(iter(model.parameters()), None)
        per[key] = _find(model, x.to(p.device) if p is not None else x)
    return per[key]


def patch_grid(n_patch: int, hw: Sequence[int]) -> tuple[int, int]:
    """The ``(h, w)`` patch grid of ``n_patch`` tokens for inputs of height and width ``hw``; ValueError if none."""
    g = _grid(n_patch, hw)
    if g is None:
        raise ValueError(f"{n_patch} patch tokens do not form a grid with the aspect ratio of a {hw[0]}x{hw[1]} input")
    return g


def gradcam_layer(model: nn.Module, example: torch.Tensor | None = None) -> str:
    """The Grad-CAM layer of ``model``: the last layer after the stem with an NCHW output larger than 1x1 that
    runs once per forward pass (``layer4`` on ResNets); for token networks (ViT) a block output read as a patch grid
    (``NAME[grid]``, see :data:`TOKEN_GRID`). ValueError, with the reason, when there is none."""
    smap = stages(model, example)
    if smap.gradcam_layer is None:
        raise ValueError(f"Grad-CAM is {smap.gradcam_reason}; pass grad_cam's layer= explicitly")
    return smap.gradcam_layer
