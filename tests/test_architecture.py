"""The layers import only downward, and nothing imports in a cycle (a contract test over every import
statement, function-level ones too).

    tunelens (the API), tunelens.cli / pipeline / compare / config   compose; may import anything below
    tunelens.reports                                                  reads results: core and analysis
    tunelens.analysis    tunelens.finetune                            siblings: core only
    tunelens.core                                                     nothing else of tunelens

Inside ``tunelens.analysis`` (the package's ``__init__`` and ``suite`` compose the rest):

    steps      one module per analysis               io, measures, engine, findings, core
    engine     registry, passes, sharding, budget     io, measures, findings, core
    findings   the Finding model, wording, caveats    core (tables in, sentences out: no models)
    measures   weights, CKA, probes, attribution ...  core
    io         checkpoints and data folders           core

No private name (``_x``) is imported from another module of the package. No module may reach itself through imports (a strongly connected component of the import graph with more
than one module, or a module importing itself), whether the imports sit at module level or in a function.
Nothing imports the repository folders as top-level packages (``import analysis``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "tunelens.analysis": ROOT / "analysis",
    "tunelens.finetune": ROOT / "finetune",
    "tunelens.reports": ROOT / "reports",
    "tunelens.core": ROOT / "tunelens" / "core",
}
# the composition layer (tunelens/*.py) joins the import graph for the cycle check
COMPOSITION = ("tunelens", ROOT / "tunelens")
ALLOWED = {
    "tunelens.core": {"tunelens.core"},
    "tunelens.finetune": {"tunelens.core", "tunelens.finetune"},
    "tunelens.analysis": {"tunelens.core", "tunelens.analysis"},
    "tunelens.reports": {"tunelens.core", "tunelens.analysis", "tunelens.reports"},
}
LAYERS = ("tunelens.core", "tunelens.finetune", "tunelens.analysis", "tunelens.reports")

A = "tunelens.analysis"
SUBLAYERS = (f"{A}.io", f"{A}.measures", f"{A}.findings", f"{A}.engine", f"{A}.steps")
SUB_ALLOWED = {
    f"{A}.io": {f"{A}.io"},
    f"{A}.measures": {f"{A}.measures"},
    f"{A}.findings": {f"{A}.findings"},
    f"{A}.engine": {f"{A}.engine", f"{A}.io", f"{A}.measures", f"{A}.findings"},
    f"{A}.steps": {f"{A}.steps", f"{A}.engine", f"{A}.io", f"{A}.measures", f"{A}.findings"},
}
# modules of a sub-layer that may import nothing outside the standard library, numpy, pandas and core
TABLES_ONLY = {f"{A}.findings": ("torch", "captum", "sklearn", "transformers", "peft", "timm")}


def module_name(package: str, folder: Path, path: Path) -> str:
    rel = path.relative_to(folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package, *parts])


def imports_of(package: str, folder: Path, path: Path, known: set[str] | None = None) -> list[tuple[int, str]]:
    """Every module named by an import statement of ``path`` (absolute names; relative imports resolved).

    ``from P import x`` names ``P.x`` where that is one of the ``known`` modules (a submodule), else ``P``."""
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
            subs = [f"{name}.{a.name}" for a in node.names if known is not None and f"{name}.{a.name}" in known]
            if len(subs) < len(node.names):
                out.append((node.lineno, name))
            out += [(node.lineno, s) for s in subs]
    return out


def sources(folders: Mapping[str, Path]) -> Iterable[tuple[str, Path, Path]]:
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            yield package, folder, path


def _where(path: Path, line: int, name: str) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line} imports {name}"


def layer_of(name: str, layers: Iterable[str] = LAYERS) -> str | None:
    for layer in layers:
        if name == layer or name.startswith(layer + "."):
            return layer
    if name == "tunelens" or name.startswith("tunelens."):
        return "tunelens (composition)"
    return None


def _known(folders: Mapping[str, Path]) -> set[str]:
    return {module_name(p, f, path) for p, f, path in sources(folders)}


def violations() -> list[str]:
    bad = []
    known = _known(FOLDERS)
    for package, folder, path in sources(FOLDERS):
        mod = module_name(package, folder, path)
        here = layer_of(mod, SUBLAYERS) if package == A else None
        here = here if here in SUB_ALLOWED else None
        for line, name in imports_of(package, folder, path, known):
            root = name.split(".")[0]
            where = _where(path, line, name)
            if root in ("analysis", "finetune", "reports"):
                bad.append(f"{where}: a top-level repository folder; import tunelens.{name}")
                continue
            target = layer_of(name)
            if target is not None and target not in ALLOWED[package]:
                bad.append(f"{where}: {package} may import only {sorted(ALLOWED[package])}")
            elif here is not None and target == A:
                sub = layer_of(name, SUBLAYERS)
                if sub is None or sub not in SUB_ALLOWED[here]:
                    bad.append(f"{where}: {here} may import only core and {sorted(SUB_ALLOWED[here])}")
            if here in TABLES_ONLY and root in TABLES_ONLY[here]:
                bad.append(f"{where}: {here} reads tables only (no {', '.join(TABLES_ONLY[here])})")
    return bad


def graph(folders: Mapping[str, Path]) -> dict[str, set[str]]:
    """The import graph: module -> the modules of ``folders`` it imports (any import statement)."""
    known = _known(folders)
    edges: dict[str, set[str]] = {m: set() for m in known}
    for package, folder, path in sources(folders):
        mod = module_name(package, folder, path)
        for _, name in imports_of(package, folder, path, known):
            if name in known:
                edges[mod].add(name)
    return edges


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1 or node in edges[node]:
                        found.append(sorted(comp))
    return found


def all_folders() -> dict[str, Path]:
    return {**FOLDERS, COMPOSITION[0]: COMPOSITION[1]}


def test_layers_import_only_downward():
    assert violations() == []


def private_imports(folders: Mapping[str, Path]) -> list[str]:
    """``from tunelens.X import _name``: a private name used outside its module (make it public or move it)."""
    bad = []
    for _, _, path in sources(folders):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tunelens")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{_where(path, node.lineno, node.module or '.')}: the private name {a.name}")
    return bad


def test_no_private_name_crosses_a_module():
    assert private_imports(all_folders()) == []


#: Cycles that stay, each with the reason. finetune's feature_cache names train's TrainConfig for type checking
#: only (never executed); both files are hashed into the shipped base's ``pretrain_code``
#: (:data:`tunelens.finetune.shipped.PRETRAIN_CODE`), so editing them means remaking the shipped weights
#: (``make base-weights``): a Protocol in feature_cache for the three settings it reads ends this cycle then.
KNOWN_CYCLES = [["tunelens.finetune.feature_cache", "tunelens.finetune.train"]]


def test_no_import_cycle():
    assert [c for c in cycles(graph(all_folders())) if c not in KNOWN_CYCLES] == []


def _plant(tmp_path: Path, name: str, files: Mapping[str, str]) -> Path:
    pkg = tmp_path / name
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_contract_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a finetune module importing analysis, and a bare ``import analysis``, are caught."""
    pkg = _plant(
        tmp_path,
        "finetune",
        {
            "__init__.py": "",
            "bad.py": "def f():\n    from tunelens.analysis import weights\n    import analysis\n",
            "ok.py": "from tunelens.core import runtime\nfrom . import bad\n",
        },
    )
    monkeypatch.setitem(FOLDERS, "tunelens.finetune", pkg)
    monkeypatch.setattr("test_architecture.ROOT", tmp_path)
    found = violations()
    assert any("bad.py:2 imports tunelens.analysis" in v for v in found)
    assert any("bad.py:3 imports analysis" in v for v in found)
    assert not any("ok.py" in v for v in found)


def test_contract_catches_an_upward_import_between_sublayers(tmp_path, monkeypatch):
    """A measure importing the engine (in a function), io importing a measure, findings importing torch and
    an engine module importing a step are caught; a step importing the engine is not."""
    pkg = _plant(
        tmp_path,
        "analysis",
        {
            "__init__.py": "from .steps import one\n",
            "io/__init__.py": "",
            "io/read.py": "from tunelens.analysis.measures.cka import f\n",
            "measures/__init__.py": "",
            "measures/cka.py": "def f():\n    from ..engine import registry\n",
            "findings/__init__.py": "import torch\n",
            "engine/__init__.py": "",
            "engine/registry.py": "from tunelens.analysis.steps import one\n",
            "steps/__init__.py": "",
            "steps/one.py": "from tunelens.analysis.engine.registry import register\nfrom ..io import read\n",
        },
    )
    monkeypatch.setitem(FOLDERS, A, pkg)
    monkeypatch.setattr("test_architecture.ROOT", tmp_path)
    found = violations()
    assert any("io/read.py:1 imports tunelens.analysis.measures.cka" in v for v in found)
    assert any("measures/cka.py:2 imports tunelens.analysis.engine" in v for v in found)
    assert any("findings/__init__.py:1 imports torch" in v for v in found)
    assert any("engine/registry.py:1 imports tunelens.analysis.steps" in v for v in found)
    assert not any("steps/one.py" in v or "analysis/__init__.py" in v for v in found), found


def test_contract_catches_a_cycle(tmp_path):
    """Two modules importing each other (one of them inside a function) form a cycle; a chain does not."""
    pkg = _plant(
        tmp_path,
        "measures",
        {
            "__init__.py": "",
            "a.py": "from .b import g\n",
            "b.py": "def g():\n    from tunelens.analysis.measures import a\n",
            "c.py": "from . import a\n",
            "d.py": "import tunelens.analysis.measures.d\n",
        },
    )
    found = cycles(graph({"tunelens.analysis.measures": pkg}))
    assert sorted(found) == [
        ["tunelens.analysis.measures.a", "tunelens.analysis.measures.b"],
        ["tunelens.analysis.measures.d"],
    ]


@pytest.mark.parametrize("package", sorted(FOLDERS))
def test_every_module_is_importable_under_its_installed_name(package):
    import importlib

    folder = FOLDERS[package]
    for path in sorted(folder.rglob("*.py")):
        importlib.import_module(module_name(package, folder, path))
