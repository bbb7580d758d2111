"""README.md and docs/ stay true: their examples run, their commands parse, their links resolve.

* every ```python block runs as written, in an empty folder, with nothing but the installed package;
* every command line of a ```bash block (or an unlabelled one) that calls tunelens (directly,
  ``python -m tunelens`` or under ``torchrun -m tunelens``) parses with the real CLI parser, and its
  ``--set`` assignments name real settings; ``make TARGET`` names a Makefile target; ``python FILE.py``
  and ``bash FILE.sh`` name files of the repository. ```text blocks (synopses) are not checked;
* every relative link and image points to an existing file (and an existing heading, for ``#anchors``);
* user docs hold no development history: the word "session" appears nowhere.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGS = ("", "bash", "sh", "shell")

FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
# what an example's output must show, by page (beyond running at all)
EXPECTED_OUTPUT = {
    "README.md": ["cka_base_random", "loss barrier", "intruders", "acc_drop"],
    "docs/own-checkpoints.md": ["['circle', 'square', 'triangle']", "all_but_head", "\n- "],
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line number)`` of each fenced block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def prose(path: Path) -> str:
    """The page without its fenced blocks and inline code (where links are not links)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return re.sub(r"`[^`\n]*`", "", text)


def python_blocks() -> list:
    return [
        pytest.param(page, code, id=f"{rel(page)}:{line}")
        for page in PAGES
        for lang, code, line in blocks(page)
        if lang in ("python", "py")
    ]


def command_lines() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every command line in the shell blocks; ``\\`` continuations joined."""
    out = []
    for page in PAGES:
        for lang, code, line in blocks(page):
            if lang not in SHELL_LANGS:
                continue
            joined = re.sub(r"\\\n\s*", " ", code)
            for k, cmd in enumerate(joined.splitlines()):
                argv = shlex.split(cmd, comments=True)
                if argv:
                    out.append((f"{rel(page)}:{line + 1 + k}: {cmd.strip()}", argv))
    return out


def tunelens_args(argv: list[str]) -> list[str] | None:
    """The arguments a command line passes to tunelens, or None when it does not call tunelens."""
    if argv[0] == "tunelens":
        return argv[1:]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "tunelens":
            return argv[i + 2 :]
    return None


def test_pages_exist():
    assert (ROOT / "docs" / "README.md") in PAGES and len(PAGES) > 3


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_development_history(page):
    hits = [
        f"{rel(page)}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bsessions?\b", line, re.I)
    ]
    assert not hits, "user docs describe the product, not its development history:\n" + "\n".join(hits)


def test_readme_starts_with_the_two_commands():
    _, code, _ = blocks(ROOT / "README.md")[0]
    first = [shlex.split(c, comments=True) for c in code.splitlines()]
    first = [c for c in first if c]
    assert first[:2] == [["make", "report"], ["make", "test"]], "README's first commands are make report, make test"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in [c.strip() for c in ci], ".ci/run runs the README's test command"


def test_every_doc_page_is_in_the_index():
    index = prose(ROOT / "docs" / "README.md")
    linked = {(ROOT / "docs" / t.split("#")[0]).resolve() for t in LINK.findall(index)}
    missing = [rel(p) for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif not dest.resolve().is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {rel(dest)}")
        elif dest.suffix == ".png" and dest.stat().st_size > 300_000:
            bad.append(f"{target}: {dest.stat().st_size} bytes, over 300 KB")
    assert not bad, f"{rel(page)}:\n" + "\n".join(bad)


def test_commands_parse():
    from tunelens.cli import build_parser
    from tunelens.config import make_config

    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    bad, seen = [], 0
    for where, argv in command_lines():
        args = tunelens_args(argv)
        if args is not None:
            seen += 1
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    ns = build_parser().parse_args(args)
            except SystemExit:
                bad.append(f"{where}: the CLI parser refuses it: {err.getvalue().strip().splitlines()[-1:]}")
                continue
            try:  # --set names real settings (the whole configuration is validated, as the CLI does first)
                make_config(
                    None,
                    quick=getattr(ns, "quick", False),
                    sets=getattr(ns, "set", []),
                    preset=getattr(ns, "preset", None),
                )
            except ValueError as e:
                bad.append(f"{where}: {e}")
        elif argv[0] == "make":
            bad += [f"{where}: no Makefile target {t!r}" for t in argv[1:] if "=" not in t and t not in targets]
        elif (
            argv[0] in ("python", "bash")
            and len(argv) > 1
            and argv[1].endswith((".py", ".sh"))
            and not (ROOT / argv[1]).is_file()
        ):
            bad.append(f"{where}: no file {argv[1]}")
    assert seen >= 10, f"only {seen} tunelens command lines found in README.md and docs/"
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("page, code", python_blocks())
def test_python_example_runs(page, code, tmp_path):
    assert not re.search(r"^\s*(from|import) (analysis|finetune|reports)\b", code, re.M), (
        "examples import tunelens, never the repository's top-level folders"
    )
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example shows its results"
    for expected in EXPECTED_OUTPUT.get(rel(page), []):
        assert expected in proc.stdout, f"{rel(page)}'s example no longer prints {expected!r}"
