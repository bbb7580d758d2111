"""The analysis registry: every analysis of the suite is one module that registers one :class:`Analysis`.

An analysis declares its ``name``, its configuration ``defaults`` (flat keys of the ``analysis``
section, e.g. ``interpolation_steps``), the names of the ``tables`` it writes (constants the report
sections read them by), ``run(context) -> Output`` and ``findings(results) -> list[Finding]``.
The suite (:func:`tunelens.analysis.suite.analyze_models`), the configuration and ``tunelens compare``
loop over :func:`registered`; adding an analysis is one module under ``analysis/steps/`` (imported by
:mod:`tunelens.analysis.steps`, which the package ``tunelens.analysis`` imports, so every step has registered
before anything can ask the registry) plus, for its figures, one report section under ``reports/sections/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from tunelens.analysis.engine.budget import PassCosts
from tunelens.analysis.engine.passes import PassCache
from tunelens.analysis.engine.sharding import shard_loader
from tunelens.analysis.findings import Finding
from tunelens.core.results import Results
from tunelens.core.stages import StageMap, stages

__all__ = [
    "Analysis",
    "Context",
    "Output",
    "analysis_defaults",
    "analysis_rules",
    "get",
    "no_pass",
    "register",
    "registered",
]

_REGISTRY: dict[str, Analysis] = {}


@dataclass
class Context:
    """What every analysis receives: the models, their manifests, the data and the settings.

    ``models`` holds ``base``, the tuned models (``tuned``, in order) and optionally ``scratch``;
    ``data`` holds the target task's ``train`` and ``test`` splits (items ``(x, y[, mask])``);
    ``settings`` is the flat ``analysis`` section of the configuration; ``results`` holds the tables
    of the analyses that ran before (an analysis may read them, e.g. the strategies table)."""

    models: Mapping[str, nn.Module]
    manifests: Mapping[str, Mapping[str, Any]]
    data: Mapping[str, Any]  # map-style datasets (len, getitem)
    settings: Mapping[str, Any]
    device: torch.device
    seed: int = 0
    primary: str = ""
    tuned: list[str] = field(default_factory=list)
    progress: bool = True
    log: Callable[[str], None] = print
    results: Results = field(default_factory=Results)
    random_like: Callable[[int], nn.Module | None] | None = None
    """Builds the base architecture with fresh random weights, initialised the way the architecture
    initialises itself (given by the caller that knows how to build it); None: ``reset_parameters()``."""

    @property
    def base(self) -> nn.Module:
        return self.models["base"]

    @cached_property
    def stage_map(self) -> StageMap:
        """The base model's stages (:func:`tunelens.core.stages.stages`), traced on one test image."""
        item = self.data["test"][0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return stages(self.base, torch.as_tensor(x)[None])

    @cached_property
    def test_loader(self) -> DataLoader:
        """The test split in the configured batch size; under torch.distributed each rank its block of batches."""
        return shard_loader(self.data["test"], int(self.settings.get("batch_size", 64)), device=self.device)

    @cached_property
    def passes(self) -> PassCache:
        """One pass per model over :attr:`test_loader` at the stage map's layers (:mod:`tunelens.analysis.engine.passes`): the
        evaluation, CKA, the probes' test features and the rewind reference all read it."""
        return PassCache(self.test_loader, self.stage_map.cka_layers(), self.device)


@dataclass(frozen=True)
class Output:
    """What an analysis returns: named tables (CSV), named arrays (NPZ), a summary entry, notes, skips."""

    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    arrays: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Analysis:
    """One registered analysis. ``order`` sets when it runs (later ones can read earlier tables);
    ``compares_models``: it needs the base and a tuned model with finite weights (``compare`` skips it
    otherwise); ``optional``: ``analysis.<name> = false`` switches it off."""

    name: str
    title: str
    order: int
    tables: tuple[str, ...]
    run: Callable[[Context], Output]
    findings: Callable[[Results], list[Finding]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    optional: bool = True
    compares_models: bool = True
    rules: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Ranges and allowed values of its own settings, by flat key (``{"interpolation_steps": {"min": 2}}``),
    in the rule language of :mod:`tunelens.config_validation` (their types come from ``defaults``)."""
    cost: Callable[[Context, PassCosts], float] | None = None
    """Predicted seconds at the configured settings from the timed pass costs (the run's progress line and
    the budget); None: one forward pass per model and test image."""
    relative_cost: float = 1.0
    """Its weight on the progress line when no pass was timed (no budget)."""


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` to the registry (its name must be new); returns it."""
    if analysis.name in _REGISTRY and _REGISTRY[analysis.name] is not analysis:
        raise ValueError(f"an analysis named {analysis.name!r} is already registered")
    _REGISTRY[analysis.name] = analysis
    return analysis


def registered() -> list[Analysis]:
    """Every registered analysis, in run order (the steps register when :mod:`tunelens.analysis` is imported)."""
    return sorted(_REGISTRY.values(), key=lambda a: (a.order, a.name))


def get(name: str) -> Analysis:
    """The registered analysis called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no analysis named {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def analysis_defaults() -> dict[str, Any]:
    """The ``analysis`` section of the default configuration: shared keys, one on/off switch per optional
    analysis, then each analysis's own defaults (flat keys)."""
    # budget: seconds of the analysis stage ("auto": 120 on a CPU, none on CUDA; "none": no limit), see budget.py
    out: dict[str, Any] = {"primary": "full", "batch_size": 64, "budget": "auto"}
    for a in registered():
        if a.optional:
            out[a.name] = True
        for k, v in a.defaults.items():
            if k in out and out[k] != v:
                raise ValueError(f"analysis {a.name!r} redefines the setting {k!r}")
            out[k] = v
    return out


def analysis_rules() -> dict[str, dict[str, Any]]:
    """Every analysis's rules for its settings, as dotted configuration keys (``analysis.<key>``)."""
    out: dict[str, dict[str, Any]] = {}
    for a in registered():
        for k, rule in a.rules.items():
            out.setdefault(f"analysis.{k}", {}).update(rule)
    return out


def no_pass(ctx: Context, costs: PassCosts) -> float:
    """The ``cost`` of an analysis that reads weights only (no pass over the data): a nominal second."""
    return 1.0
