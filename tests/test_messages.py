"""What the user sees: one line for Ctrl-C, internal errors and corrupt files; modes that follow the umask;
an unchanged report kept."""

import json
import os

import pytest

from tunelens import pipeline
from tunelens.cli import main

ARGS = ["--quick", "--device", "cpu", "--no-progress"]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "stage_finetune", interrupted)
    assert main(["finetune", "--out", str(tmp_path / "out"), *ARGS]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "resume file" in err
    assert "Rerun the same command to resume" in err and "Traceback" not in err


def test_internal_error_is_one_line_unless_debugging(tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(pipeline, "stage_finetune", broken)
    monkeypatch.delenv("TUNELENS_DEBUG", raising=False)
    assert main(["finetune", "--out", str(tmp_path / "out"), *ARGS]) == 1
    err = capsys.readouterr().err
    assert err == (
        "tunelens: internal error: RuntimeError: something broke (run with TUNELENS_DEBUG=1 for the traceback)\n"
    )
    monkeypatch.setenv("TUNELENS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="broke"):
        main(["finetune", "--out", str(tmp_path / "out"), *ARGS])


@pytest.mark.parametrize("broken", ["index", "index_shape", "checkpoint_manifest"])
def test_analyze_on_corrupt_json_is_one_line_exit_2(tmp_path, capsys, broken):
    ck = tmp_path / "out" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "base.safetensors").write_bytes(b"weights")
    (ck / "base.json").write_text('{"sha256": "x"}')
    index = {"checkpoints": {"base": {"file": "base.safetensors", "sha256": "x"}}}
    if broken == "index":
        (ck / "manifest.json").write_text('{"checkpoints": {"base": ')
    elif broken == "index_shape":
        (ck / "manifest.json").write_text('{"checkpoints": ["base"]}')
    else:
        (ck / "manifest.json").write_text(json.dumps(index))
        (ck / "base.json").write_text('{"sha256": ')
    assert main(["analyze", "--force", "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tunelens: error: ") and "Traceback" not in err
    assert ("run index" in err and "corrupt" in err) if broken != "checkpoint_manifest" else "not valid JSON" in err


def test_outputs_follow_the_umask(tmp_path):
    import torch

    from tunelens.core import files
    from tunelens.finetune.checkpoints import save_checkpoint

    old = os.umask(0o022)
    files._UMASK = None
    try:
        save_checkpoint(tmp_path / "ck" / "m.safetensors", {"w": torch.zeros(2)}, {"name": "m"})
        assert os.stat(tmp_path / "ck" / "m.safetensors").st_mode & 0o777 == 0o644
        assert os.stat(tmp_path / "ck" / "m.json").st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
        files._UMASK = None


def test_unchanged_report_is_kept(tmp_path):
    from tunelens.core.results import Results

    out = tmp_path / "out"
    Results(summary={"key": "k1", "findings": []}).save(out / "results")
    logs = []
    p1 = pipeline.stage_report(out, log=logs.append)
    inode = os.stat(out / "report" / "index.html").st_ino
    p2 = pipeline.stage_report(out, log=logs.append)
    assert p1 == p2 and logs[-1] == "[report] unchanged, kept"
    assert os.stat(out / "report" / "index.html").st_ino == inode
    Results(summary={"key": "k2", "findings": []}).save(out / "results")  # new results: rendered again
    pipeline.stage_report(out, log=logs.append)
    assert logs[-1].startswith("[report] rendered")
    assert json.loads((out / "report" / ".tunelens-report.json").read_text())["results_key"] == "k2"
