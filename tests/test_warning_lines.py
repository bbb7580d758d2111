"""The command line shows tunelens' warnings as one short line each, once, and hides libraries' own."""

from __future__ import annotations

import io
import warnings

import pytest

import tunelens.analysis.measures.cka as own_module
from tunelens.core.warning_lines import MAX_CHARS, is_own_file, warning_lines


def _warn(message: str, filename: str, category: type[Warning] = RuntimeWarning) -> None:
    warnings.warn_explicit(message, category, filename, 42)


def test_own_warnings_are_one_line_once_and_cut(monkeypatch):
    monkeypatch.delenv("TUNELENS_DEBUG", raising=False)
    err = io.StringIO()
    long = "StreamingCKA: layer1: constant features;\n" + "layer2: too few samples; " * 600  # ~15 KB
    with warning_lines(err):
        _warn(long, own_module.__file__)
        _warn(long, own_module.__file__)  # the same text again: shown once
        _warn("grad_cam at layer4 is coarse", own_module.__file__, UserWarning)
        _warn("a library's own deprecation", "/usr/lib/python3/site-packages/matplotlib/axes.py")
    lines = err.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tunelens: warning: StreamingCKA: layer1: constant features; layer2")
    assert len(lines[0]) <= len("tunelens: warning: ") + MAX_CHARS and lines[0].endswith("\u2026")
    assert lines[1] == "tunelens: warning: grad_cam at layer4 is coarse"
    assert ".py" not in err.getvalue()


def test_debug_restores_python_display(monkeypatch):
    monkeypatch.setenv("TUNELENS_DEBUG", "1")
    err = io.StringIO()
    with warning_lines(err), pytest.warns(RuntimeWarning):
        _warn("x", own_module.__file__)
    assert err.getvalue() == ""


def test_own_files_are_recognised():
    assert is_own_file(own_module.__file__)
    assert not is_own_file(warnings.__file__)
