"""Check a merged configuration against the defaults before any work starts.

Generic over the defaults dict: the known keys and each value's type come from the default
value (a bool takes only a bool, an int an int but not a bool, a float an int or a float, a
list a list whose items have the type of the default's items, a dict a section checked key by
key). Ranges and allowed values come from :data:`RULES`, a table of ``fnmatch`` patterns over
dotted keys (``*.epochs`` is every ``epochs``), and from each analysis's own ``rules`` (declared on its step,
:class:`tunelens.analysis.engine.registry.Analysis`), so analyses that add defaults get their types checked
with no code here and declare a rule only for a range.

:func:`validate_config` raises :class:`ConfigError` with one line that names the key, the
problem and the fix.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
from typing import Any

__all__ = ["RULES", "SECTION_ALIASES", "ConfigError", "validate_config"]


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type, value out of range."""


def _strategies() -> tuple[str, ...]:
    from tunelens.finetune.strategies import STRATEGIES

    return tuple(s for s in STRATEGIES if s != "scratch")  # scratch is the control, always trained


# dotted-key pattern -> rule; a rule is a dict with any of:
#   min / max (inclusive), gt / lt (exclusive), choices (a tuple, or a callable returning one),
#   items (a rule applied to each item of a list), seconds_auto_none (a number > 0, "auto" or "none"),
#   check (a callable: the value -> None when fine, else the problem in words, e.g. an unknown name in a list)
RULES: dict[str, dict[str, Any]] = {
    "seed": {"min": 0, "max": 2**32 - 1},
    "*.epochs": {"min": 1},
    "*.lp_epochs": {"min": 0},
    "*.warmup_epochs": {"min": 0},
    "*.lr": {"gt": 0},
    "*.lp_lr": {"gt": 0},
    "*.batch_size": {"min": 1},
    "*.weight_decay": {"min": 0},
    "*.patience": {"min": 0},
    "*.last_k": {"min": 1},
    "*.schedule": {"choices": ("cosine", "step", "none")},
    "*fraction*": {"gt": 0, "lt": 1},
    "data.dataset": {"choices": ("shapes", "fashion_mnist")},
    "data.text.dataset": {"choices": ("generated", "rotten_tomatoes")},
    "data.image_size": {"min": 8},
    "data.clutter": {"min": 0},
    "data.std": {"gt": 0},
    "data.*.*_per_class": {"min": 1},
    "analysis.budget": {"seconds_auto_none": True},
    "finetune.strategies": {"items": {"choices": _strategies}, "nonempty": True},
    "finetune.lora.rank": {"min": 1},
    "finetune.lora.alpha": {"gt": 0},
    "finetune.lora.stages": {"nonempty": True},
    "modality": {"choices": ("image", "text")},
    "data.text.max_len": {"min": 4},
    "*.optimizer": {"choices": ("sgd", "adamw")},
}

# sections that also take the keys of another section (a strategy's own section may override
# any of the common fine-tuning settings)
SECTION_ALIASES: dict[str, str] = {"finetune.*": "finetune.common"}

MIN_SECONDS = 0.1  # the smallest time budget: every plan is then its smallest

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _show(v: Any) -> str:
    return json.dumps(v, default=str)


def _type_name(default: Any) -> str:
    if isinstance(default, dict):
        return "a section (a JSON object)"
    return _NAMES.get(type(default), type(default).__name__)


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _rules() -> dict[str, dict[str, Any]]:
    """:data:`RULES` followed by each analysis's rules for its own settings (declared on its step)."""
    from tunelens.analysis.engine.registry import analysis_rules

    return {**RULES, **analysis_rules()}


def _rule_for(key: str) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    for pat, r in _rules().items():
        if fnmatch.fnmatchcase(key, pat):
            rule.update(r)
    return rule


def _check_value(key: str, value: Any, rule: dict[str, Any]) -> None:
    choices = rule.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"configuration {key}: {_show(value)} is not allowed{hint} (expected one of {', '.join(choices)})"
        )
    check = rule.get("check")
    if check is not None and (problem := check(value)):
        raise ConfigError(f"configuration {key}={_show(value)}: {problem}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"configuration {key}={_show(value)} must be a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in rule and value < rule["min"]:
            raise ConfigError(f"configuration {key}={_show(value)} is too small: it must be at least {rule['min']}")
        if "max" in rule and value > rule["max"]:
            raise ConfigError(f"configuration {key}={_show(value)} is too large: it must be at most {rule['max']}")
        if "gt" in rule and value <= rule["gt"]:
            raise ConfigError(
                f"configuration {key}={_show(value)} is out of range: it must be greater than {rule['gt']}"
            )
        if "lt" in rule and value >= rule["lt"]:
            raise ConfigError(f"configuration {key}={_show(value)} is out of range: it must be less than {rule['lt']}")
    if isinstance(value, list):
        if rule.get("nonempty") and not value:
            raise ConfigError(f"configuration {key} is empty: give at least one item")
        for item in value:
            _check_value(key, item, rule.get("items", {}))


def _schema(defaults: dict, key: str, root: dict) -> dict:
    """The known keys of the section ``key``: its defaults, plus those of sections it aliases."""
    known = dict(defaults)
    for pat, other in SECTION_ALIASES.items():
        if key and fnmatch.fnmatchcase(key, pat) and key != other:
            node: Any = root
            for part in other.split("."):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                known = {**node, **known}
    return known


def _walk(cfg: dict, defaults: dict, prefix: str, root: dict) -> None:
    known = _schema(defaults, prefix, root)
    for k, v in cfg.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in known:
            close = difflib.get_close_matches(str(k), [str(x) for x in known], n=1)
            hint = f"did you mean {(f'{prefix}.' if prefix else '') + close[0]!r}?" if close else ""
            where = f"in section {prefix!r} " if prefix else ""
            raise ConfigError(
                f"unknown configuration key {key!r} {where}(from --config or --set); "
                + (hint or f"known keys here: {', '.join(map(str, known))}")
            )
        d = known[k]
        if _rule_for(key).get("seconds_auto_none"):  # seconds > 0, "auto" or "none"
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if v not in ("auto", "none") and not (number and math.isfinite(v) and v >= MIN_SECONDS):
                raise ConfigError(
                    f'configuration {key}={_show(v)} must be finite seconds >= {MIN_SECONDS:g}, "auto" or "none"'
                )
            continue
        if not _type_ok(v, d):
            like = "" if isinstance(d, dict) else f" like the default {_show(d)}"
            raise ConfigError(f"configuration {key}={_show(v)} has the wrong type: expected {_type_name(d)}{like}")
        if isinstance(d, dict):
            _walk(v, d, key, root)
            continue
        if isinstance(d, list) and d:
            for item in v:
                if not _type_ok(item, d[0]):
                    raise ConfigError(
                        f"configuration {key} has an item {_show(item)} of the wrong type: expected a list of "
                        f"{_type_name(d[0]).removeprefix('a ').removeprefix('an ')}s like the default {_show(d)}"
                    )
        _check_value(key, v, _rule_for(key))


def validate_config(cfg: Any, defaults: dict) -> dict:
    """Check ``cfg`` (the merged configuration) against ``defaults``; return ``cfg`` or raise ConfigError."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"the configuration must be a JSON object of sections, got {type(cfg).__name__}")
    _walk(cfg, defaults, "", defaults)
    return cfg
