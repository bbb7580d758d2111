"""The entry points never import from the working directory (except an explicit module:function factory)."""

import subprocess
import sys

import pytest


@pytest.fixture
def hostile_cwd(tmp_path):
    """A working directory whose files shadow names tunelens and its libraries import."""
    marker = tmp_path / "IMPORTED"
    for mod in ("analysis", "jinja2", "reports", "pipeline"):
        (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'a').write('{mod}\\n')\n")
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "__init__.py").write_text("raise RuntimeError('the user folder finetune/ was imported')\n")
    (tmp_path / "out" / "results").mkdir(parents=True)
    (tmp_path / "out" / "results" / "summary.json").write_text("{}")
    return tmp_path


def test_python_m_tunelens_ignores_the_working_directory(hostile_cwd):
    for argv in (["--help"], ["report", "--out", "out"]):
        p = subprocess.run(
            [sys.executable, "-m", "tunelens", *argv], cwd=hostile_cwd, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert not (hostile_cwd / "IMPORTED").exists(), (hostile_cwd / "IMPORTED").read_text()
    assert (hostile_cwd / "out" / "report" / "index.html").exists()


def test_arch_factory_imports_from_cwd_and_leaves_sys_path(tmp_path, monkeypatch):
    from tunelens.finetune.models import build_model

    (tmp_path / "mymod_entry.py").write_text(
        "from tunelens.finetune.models import TinyResNet\n"
        "def factory(num_classes):\n"
        "    return TinyResNet(num_classes=num_classes, widths=(4, 4, 4, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        model = build_model("mymod_entry:factory", 3)
        assert model.fc.out_features == 3
        assert sys.path == before
        with pytest.raises(ValueError, match="cannot import module 'nope_mod'"):
            build_model("nope_mod:factory", 3)
        assert sys.path == before
    finally:
        sys.modules.pop("mymod_entry", None)
