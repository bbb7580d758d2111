"""The default run's configuration: one nested dict of plain values, hashed for the stage cache.

Override with ``--config FILE.json`` (a partial dict merged over the defaults) or
``--set dotted.key=value``; ``--quick`` shrinks data and epochs for tests.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tunelens.analysis.registry import analysis_defaults
from tunelens.core.hashing import code_hash, config_hash

__all__ = ["DEFAULT_CONFIG", "QUICK_OVERRIDES", "code_hash", "config_hash", "make_config", "merge", "set_dotted"]

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "arch": "tiny_resnet",
    "data": {
        "image_size": 32,
        "clutter": 3,
        "source": {"train_per_class": 400, "val_per_class": 25, "test_per_class": 25},
        "target": {"train_per_class": 40, "val_per_class": 20, "test_per_class": 60},
    },
    "pretrain": {
        "epochs": 30,
        "lr": 0.1,
        "batch_size": 64,
        "weight_decay": 5e-4,
        "warmup_epochs": 1,
        "schedule": "cosine",
        "augment": True,
        "patience": 0,
        "amp": False,
        "sync_bn": False,
    },
    "finetune": {
        "strategies": ["linear_probe", "full", "lp_ft", "lora"],
        "common": {
            "epochs": 30,
            "batch_size": 32,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "augment": True,
            "patience": 10,
            "amp": False,
            "sync_bn": False,
        },
        "linear_probe": {"lr": 0.1},
        "full": {"lr": 0.005},
        "last_k": {"lr": 0.005, "last_k": 2},
        "lp_ft": {"lr": 0.005, "lp_epochs": 10, "lp_lr": 0.1},
        # low-rank adapters (peft) on every conv / linear layer of these stages, the new head trained fully
        "lora": {"lr": 0.05, "rank": 4, "alpha": 8.0, "stages": ["layer1", "layer2", "layer3", "layer4"]},
        "scratch": {"lr": 0.05, "warmup_epochs": 1},
    },
    # the analysis section: shared keys, one switch per optional analysis and each analysis's own
    # settings, from the registry (tunelens.analysis.registry.analysis_defaults)
    "analysis": analysis_defaults(),
}

QUICK_OVERRIDES: dict[str, Any] = {
    "data": {
        "source": {"train_per_class": 60, "val_per_class": 10, "test_per_class": 10},
        "target": {"train_per_class": 16, "val_per_class": 8, "test_per_class": 16},
    },
    "pretrain": {"epochs": 3},
    "finetune": {"common": {"epochs": 3, "patience": 0}, "lp_ft": {"lp_epochs": 1}},
    "analysis": {"attribution_images": 12, "interpolation_steps": 5},
}


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: values of ``over`` replace those of ``base`` (dicts merged key by key)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(cfg: dict, assignment: str) -> dict:
    """Apply ``a.b.c=value`` (value parsed as JSON when it parses, else a string)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, _, raw = assignment.partition("=")
    try:
        val = json.loads(raw)
    except json.JSONDecodeError:
        val = raw
    node = cfg
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ValueError(f"--set {key}: {p!r} is not a section of the configuration")
        node = node[p]
    if parts[-1] not in node:
        raise ValueError(f"--set {key}: unknown key {parts[-1]!r} (known: {', '.join(node)})")
    node[parts[-1]] = val
    return cfg


def make_config(overrides: dict | None = None, quick: bool = False, sets: list[str] | None = None) -> dict:
    """The defaults, ``--quick``'s overrides, ``overrides`` (``--config``) and ``sets`` (``--set``) merged, then
    validated as a whole (unknown keys, types, ranges, strategy names): a ``ValueError`` with one line."""
    from tunelens.config_validation import ConfigError, validate_config

    cfg = merge(DEFAULT_CONFIG, QUICK_OVERRIDES) if quick else copy.deepcopy(DEFAULT_CONFIG)
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(
            f'the --config file must hold a JSON object of sections (like {{"pretrain": {{"epochs": 5}}}}), '
            f"got {type(overrides).__name__}"
        )
    if overrides:
        cfg = merge(cfg, overrides)
    for s in sets or []:
        set_dotted(cfg, s)
    return validate_config(cfg, DEFAULT_CONFIG)
