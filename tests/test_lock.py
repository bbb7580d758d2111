"""The dev venv's lock (.ci/constraints.txt) agrees with pyproject.toml: every package that the dev venv's
extras ask for is pinned, and each pin lies inside pyproject's range. A disagreement names the package and
the fix (`make lock`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "constraints.txt"


def read_lock(text: str) -> dict[str, Version]:
    """name -> pinned version of a pip constraints file; every non-comment line must be `name==version`."""
    pins: dict[str, Version] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if m is None:
            raise ValueError(f"line {n}: {raw!r} is not an exact pin (name==version)")
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def dev_extras() -> list[str]:
    """The extras that the Makefile's venv installs (EXTRAS := dev,text)."""
    m = re.search(r"^EXTRAS\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile names its venv's extras as EXTRAS := ..."
    return m.group(1).split(",")


def disagreements(pyproject: dict, pins: dict[str, Version], extras: list[str]) -> list[str]:
    """One sentence per requirement of the project (and the given extras) that the lock does not satisfy."""
    project = pyproject["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    out = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            out.append(f"{req.name} ({req}) is not pinned in .ci/constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req.name}: pyproject.toml asks for {req.specifier}, .ci/constraints.txt pins {pins[name]}")
    return out


def test_lock_agrees_with_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = disagreements(pyproject, read_lock(LOCK.read_text()), dev_extras())
    assert not problems, "pyproject.toml and the lock disagree; run `make lock`:\n" + "\n".join(problems)


def test_lock_pins_the_known_good_torch():
    pins = read_lock(LOCK.read_text())
    assert pins["torch"] == Version("2.14.1") and pins["torchvision"] == Version("0.29.1")


def test_disagreements_are_found():
    """The check itself: a range the pin falls outside of, and a package the lock lacks, are both named."""
    pyproject = {
        "project": {"dependencies": ["torch>=2.2,!=2.13.*", "numpy>=3"], "optional-dependencies": {"x": ["rich"]}}
    }
    pins = read_lock("torch==2.13.0\nnumpy==2.4.6\n")
    problems = disagreements(pyproject, pins, ["x"])
    assert len(problems) == 3
    assert "torch" in problems[0] and "2.13.0" in problems[0]
    assert "numpy" in problems[1] and "rich" in problems[2]
    with pytest.raises(ValueError, match="line 1"):
        read_lock("torch>=2\n")
