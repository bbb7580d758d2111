"""Stable hashes: of a configuration (the stage cache key) and of a package's source code."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["code_hash", "config_hash"]


def config_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (the stage cache key)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_hash(package: str) -> str:
    """Hash of a package's Python sources: a code change invalidates the cached stage that ran it."""
    import importlib
    from pathlib import Path

    root = Path(str(importlib.import_module(package).__file__)).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")) + sorted(root.rglob("*.j2")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
