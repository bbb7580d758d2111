"""One run at a time per --out: a second run is refused in one line naming the first; bad --out paths exit 2."""

from __future__ import annotations

import os

import pytest

from tunelens.cli import main
from tunelens.core.out_lock import LOCK_NAME, OutInUseError, out_lock


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with out_lock(out, command="tunelens run --out out"):
        assert (out / LOCK_NAME).exists()
        with pytest.raises(OutInUseError, match=rf"pid {os.getpid()}, `tunelens run --out out`"), out_lock(out):
            pass
        rc = main(["report", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1
        assert err[0].startswith(f"tunelens: error: --out {out} is in use by another tunelens run (pid {os.getpid()}")
    assert not out.exists(), "the folder the lock made is removed when the run leaves it empty"
    with out_lock(out):  # released: the next run takes it
        (out / "kept.txt").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 999999, "command": "tunelens run", "started": "yesterday"}')
    with out_lock(out):
        pass
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_run_with_an_out_that_cannot_be_a_folder_exits_2(tmp_path, capsys, where):
    f = tmp_path / "afile"
    f.write_text("mine")
    out = f if where == "a file" else f / "sub"
    rc = main(["run", "--quick", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("tunelens: error: --out")
    assert ("is a file; give a folder" if where == "a file" else "which is a file") in err[0]
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_run_into_a_read_only_folder_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["run", "--quick", "--no-progress", "--out", str(ro / "out")])
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write in" in err[0]
