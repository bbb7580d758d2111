"""The README's examples run as written, from an empty folder, with nothing but the installed package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_block(markdown: str, heading: str) -> str:
    """The first fenced ``python`` block of the section under ``heading`` (up to the next ``## `` heading)."""
    start = markdown.find(heading + "\n")
    if start < 0:
        raise LookupError(f"no section {heading!r}")
    body = markdown[start + len(heading) :]
    nxt = re.search(r"^## ", body, flags=re.M)
    if nxt:
        body = body[: nxt.start()]
    m = re.search(r"^```python\n(.*?)^```", body, flags=re.M | re.S)
    if not m:
        raise LookupError(f"the section {heading!r} has no ```python block")
    return m.group(1)


def run_block(tmp_path: Path, heading: str) -> str:
    code = python_block((ROOT / "README.md").read_text(encoding="utf-8"), heading)
    assert "import tunelens as tl" in code and not re.search(
        r"^\s*(from|import) (analysis|finetune|reports)\b", code, re.M
    )
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_library_example_runs(tmp_path):
    out = run_block(tmp_path, "## Library")
    assert "cka_base_random" in out and "loss barrier" in out and "intruders" in out and "acc_drop" in out


@pytest.mark.slow
def test_byo_example_runs(tmp_path):
    out = run_block(tmp_path, "## Bring your own checkpoints")
    assert "['circle', 'square', 'triangle']" in out and "all_but_head" in out
    assert "- " in out  # at least one finding
