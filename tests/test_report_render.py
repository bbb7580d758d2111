"""The renderer escapes user strings and keeps the page whole when a section fails."""

import pandas as pd

from tunelens.core.results import Results
from tunelens.reports.render import render_html, render_report


def _results():
    evil = '<script>alert("x")</script>'
    r = Results()
    r.summary = {
        "findings": [
            {
                "id": "f1",
                "text": f"class {evil} changed",
                "evidence": "overview",
                "score": 1.0,
                "uncertainty": None,
                "kind": "result",
            }
        ],
        "data": {"classes": [evil, "b&c"], "description": "d", "n_train": 1, "n_test": 1, "image_size": 8},
        "checkpoints": {"m": {"file": f"{evil}.safetensors", "sha256": "abc"}},
        "timings": {"x": 1.0},
    }
    r.tables["accuracy"] = pd.DataFrame(
        {
            "model": [evil],
            "acc": [0.5],
            "loss": [1.0],
            "n": [2],
            "role": ["tuned"],
            "strategy": ["full"],
            "train_seconds": [1.0],
        }
    )
    return r, evil


def test_user_strings_are_escaped():
    r, evil = _results()
    html = render_html(r)
    assert evil not in html
    assert "&lt;script&gt;alert(" in html
    assert "b&amp;c" in html


def test_broken_section_is_reported_not_fatal(tmp_path):
    r, _ = _results()
    r.tables["weight_deltas"] = pd.DataFrame({"unexpected": [1]})  # a table the weights section cannot read
    html = render_html(r)
    assert "could not be rendered" in html and 'id="findings"' in html


def test_report_written_atomically(tmp_path):
    r, _ = _results()
    r.save(tmp_path / "results")
    out = render_report(tmp_path / "results", tmp_path / "report")
    assert out.exists() and (tmp_path / "report" / "tables" / "accuracy.csv").exists()
    # only the current version of each folder (its link's target) is left beside it, nothing temporary
    import os

    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == sorted(os.readlink(tmp_path / n) for n in ("results", "report"))


def test_missing_values_show_a_dash_not_nan():
    """External checkpoints have no train_seconds; the cell shows a dash, never a literal NaN."""
    import re

    import numpy as np

    from tunelens.reports.render import MISSING

    r, _ = _results()
    r.tables["accuracy"]["train_seconds"] = [np.nan]
    r.tables["accuracy"]["trainable_params"] = pd.array([pd.NA], dtype="Int64")
    html = render_html(r)
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells and MISSING in cells
    assert not any(c.strip().lower() in ("nan", "none", "<na>", "&lt;na&gt;") for c in cells)
