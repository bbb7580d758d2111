"""The layers import only downward (a contract test over every import statement, function-level ones too).

    tunelens (the API), tunelens.cli / pipeline / compare / config   compose; may import anything below
    tunelens.reports                                                  reads results: core and analysis
    tunelens.analysis    tunelens.finetune                            siblings: core only
    tunelens.core                                                     nothing else of tunelens

Nothing imports the repository folders as top-level packages (``import analysis``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "tunelens.analysis": ROOT / "analysis",
    "tunelens.finetune": ROOT / "finetune",
    "tunelens.reports": ROOT / "reports",
    "tunelens.core": ROOT / "tunelens" / "core",
}
ALLOWED = {
    "tunelens.core": {"tunelens.core"},
    "tunelens.finetune": {"tunelens.core", "tunelens.finetune"},
    "tunelens.analysis": {"tunelens.core", "tunelens.analysis"},
    "tunelens.reports": {"tunelens.core", "tunelens.analysis", "tunelens.reports"},
}
LAYERS = ("tunelens.core", "tunelens.finetune", "tunelens.analysis", "tunelens.reports")


def module_name(package: str, folder: Path, path: Path) -> str:
    rel = path.relative_to(folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package, *parts])


def imports_of(package: str, folder: Path, path: Path) -> list[tuple[int, str]]:
    """Every module named by an import statement of ``path`` (absolute names; relative imports resolved)."""
    mod = module_name(package, folder, path)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def layer_of(name: str) -> str | None:
    for layer in LAYERS:
        if name == layer or name.startswith(layer + "."):
            return layer
    if name == "tunelens" or name.startswith("tunelens."):
        return "tunelens (composition)"
    return None


def violations() -> list[str]:
    bad = []
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            for line, name in imports_of(package, folder, path):
                root = name.split(".")[0]
                where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line} imports {name}"
                if root in ("analysis", "finetune", "reports"):
                    bad.append(f"{where}: a top-level repository folder; import tunelens.{name}")
                    continue
                target = layer_of(name)
                if target is not None and target not in ALLOWED[package]:
                    bad.append(f"{where}: {package} may import only {sorted(ALLOWED[package])}")
    return bad


def test_layers_import_only_downward():
    assert violations() == []


def test_contract_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a finetune module importing analysis, and a bare ``import analysis``, are caught."""
    pkg = tmp_path / "finetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from tunelens.analysis import weights\n    import analysis\n")
    (pkg / "ok.py").write_text("from tunelens.core import runtime\nfrom . import bad\n")
    monkeypatch.setitem(FOLDERS, "tunelens.finetune", pkg)
    monkeypatch.setattr("test_architecture.ROOT", tmp_path)
    found = violations()
    assert any("bad.py:2 imports tunelens.analysis" in v for v in found)
    assert any("bad.py:3 imports analysis" in v for v in found)
    assert not any("ok.py" in v for v in found)


@pytest.mark.parametrize("package", sorted(FOLDERS))
def test_every_module_is_importable_under_its_installed_name(package):
    import importlib

    folder = FOLDERS[package]
    for path in sorted(folder.rglob("*.py")):
        importlib.import_module(module_name(package, folder, path))
