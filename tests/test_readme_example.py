"""The README's worked example for your own checkpoints runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Bring your own checkpoints"


def python_block(markdown: str, heading: str = HEADING) -> str:
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


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    try:
        code = python_block(readme)
    except LookupError as e:
        pytest.fail(f"README.md: {e} (its text is in docs_compare_section.md)")
    (tmp_path / "example.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=540, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "['circle', 'square', 'triangle']" in out and "all_but_head" in out
    assert "- " in out  # at least one finding
