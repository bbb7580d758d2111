"""One installed name: only ``tunelens`` is importable; a user's own ``analysis/`` or ``reports/`` never shadows
ours, and ``import tunelens as tl`` is the whole public API."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tunelens as tl

ROOT = Path(__file__).resolve().parents[1]


def _user_folder(tmp_path: Path) -> Path:
    """A research repository with its own ``analysis``, ``reports`` and ``finetune`` packages."""
    for name in ("analysis", "reports", "finetune"):
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text(f"USER = True\nopen({str(tmp_path / (name + '.imported'))!r}, 'w').close()\n")
    return tmp_path


def test_public_api_is_complete():
    for name in (
        "weight_deltas",
        "cka_matrix",
        "attribute",
        "attribute_pair",
        "load_model",
        "rewind",
        "interpolate",
        "probe_layers",
        "attribution_study",
        "StreamingCKA",
        "analyze_models",
    ):
        assert name in tl.__all__ and callable(getattr(tl, name)), name
    assert all(hasattr(tl, n) for n in tl.__all__)
    assert isinstance(tl.__version__, str) and tl.__version__[0].isdigit()


def test_user_packages_do_not_shadow_ours(tmp_path):
    user = _user_folder(tmp_path)
    code = (
        "import tunelens as tl, tunelens.analysis, tunelens.reports.render, tunelens.finetune.train, analysis\n"
        "print(tunelens.analysis.__file__); print(tunelens.reports.render.__file__); print(analysis.USER)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=user, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, render, theirs = proc.stdout.split()
    assert Path(ours).resolve() == (ROOT / "analysis" / "__init__.py").resolve()
    assert Path(render).resolve() == (ROOT / "reports" / "render.py").resolve()
    assert theirs == "True"  # the user's own package, imported by the user's own code only
    assert [p.name for p in user.glob("*.imported")] == ["analysis.imported"]  # by the user's import alone
    (user / "analysis.imported").unlink()
    # tunelens itself never imported the user's packages
    proc = subprocess.run(
        [sys.executable, "-m", "tunelens", "--help"], cwd=user, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(user.glob("*.imported"))


def test_repository_folders_are_not_top_level_packages(tmp_path):
    code = "import importlib.util as u; print([n for n in ('analysis', 'finetune', 'reports') if u.find_spec(n)])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.slow
def test_built_wheel_holds_only_tunelens_and_imports(tmp_path):
    """``pip wheel .``: every file under ``tunelens/`` (templates included); installed into a fresh folder it
    imports from there, with the report template."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("tunelens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tunelens"}, tops
    for must in (
        "tunelens/analysis/measures/weights.py",
        "tunelens/analysis/measures/attribution/methods.py",
        "tunelens/analysis/io/loading.py",
        "tunelens/analysis/engine/registry.py",
        "tunelens/analysis/findings/model.py",
        "tunelens/compare/validation.py",
        "tunelens/finetune/train.py",
        "tunelens/reports/render.py",
        "tunelens/reports/templates/report.html.j2",
        "tunelens/core/runtime.py",
        "tunelens/cli.py",
        "tunelens/analysis/steps/similarity.py",
        "tunelens/reports/sections/overview.py",
    ):
        assert must in names, must
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tunelens as tl, tunelens.reports.render as r\n"
        "print(tl.__file__); print(r._TEMPLATES.joinpath('report.html.j2').exists())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, has_template = proc.stdout.split()
    assert Path(path).resolve().is_relative_to(site.resolve()) and has_template == "True"
