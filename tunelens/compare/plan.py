"""What ``tunelens compare`` has validated and will run (:class:`Plan`), its error (:class:`CompareError`), and the
small helpers every step of the validation shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_IMAGE_SIZE", "CompareError", "Plan", "finding", "one_line", "tuned_names"]

#: The largest --image-size: one 3x4096x4096 float32 image is 200 MB, and the analyses hold batches of them.
MAX_IMAGE_SIZE = 4096


class CompareError(Exception):
    """Bad input for ``tunelens compare``: printed as one line, exit status 2."""


@dataclass
class Plan:
    """Everything validated, ready to run: models, data, configuration and notes."""

    arch: str
    out: Path
    models: dict[str, Any]
    manifests: dict[str, dict]
    train: Any
    test: Any
    dataset: Any
    cfg: dict
    device: Any
    notes: list[str] = field(default_factory=list)
    nonfinite: dict[str, list[str]] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # found while validating, e.g. weights equal to the base's
    base_description: str = ""
    progress: bool = True
    failed: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # source_train / source_test (--source-data)
    data_summary: dict[str, Any] = field(default_factory=dict)  # the report's data facts (text: set by validate)
    no_localisation: str = ""  # why attributions are not scored against ground truth (default: the image words)


def one_line(e: BaseException | str) -> str:
    """The message of ``e`` on one line (whitespace runs collapsed)."""
    return " ".join(str(e).split())


def tuned_names(paths: list[str]) -> list[str]:
    """A name per --tuned file: its stem without the weights suffix, made unique (never ``base`` or ``scratch``)."""
    names: list[str] = []
    for p in paths:
        stem = Path(p).name
        for suf in (".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
            if stem.endswith(suf):
                stem = stem[: -len(suf)]
                break
        stem = stem or "tuned"
        name = stem if stem not in ("base", "scratch") else f"{stem}_tuned"
        i = 2
        while name in names:
            name = f"{stem}_{i}"
            i += 1
        names.append(name)
    return names


def finding(
    id: str, text: str, evidence: str, score: float, kind: str = "caveat", uncertainty: str | None = None
) -> dict:
    """A finding of the validation or the run, as the summary stores it."""
    from tunelens.analysis.findings import Finding

    return Finding(id, text, evidence, score=score, uncertainty=uncertainty, kind=kind).to_dict()
