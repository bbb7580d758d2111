"""One progress line for a whole run (tunelens/core/progress.py): stage names, shares by predicted seconds, no
bars of the stages while it is shown, nothing with --no-progress."""

from __future__ import annotations

import re

import pytest

from tunelens.core import progress


def test_shares_follow_the_plan_and_the_line_ends_full(capsys):
    with progress.run_progress({"pretrain": 30.0, "full": 10.0}, title="tunelens run") as line:
        assert progress.active()
        progress.report("pretrain", 0.5, label="epoch 1/2")
        assert line.bar.n == pytest.approx(15.0) and line.bar.desc == "tunelens run: pretrain (epoch 1/2)"
        progress.report("pretrain", 0.25)  # never backwards
        assert line.bar.n == pytest.approx(15.0)
        progress.report("full", 1.0)
        assert line.bar.n == pytest.approx(25.0)
        progress.replan("full", 20.0)  # a better prediction: the total follows
        assert line.bar.total == pytest.approx(50.0)
        line.write("[finetune] a log line")
    assert not progress.active()
    out = capsys.readouterr()
    assert "[finetune] a log line" in out.out
    err = out.err.replace("\r", "\n")
    assert "tunelens run: pretrain" in err and re.search(r"tunelens run: full 100%", err)


def test_disabled_line_prints_nothing_and_reports_are_ignored(capsys):
    with progress.run_progress({"analyze": 5.0}, enabled=False) as line:
        assert not progress.active()
        progress.report("analyze", 1.0)
        line.write("plain")
    out = capsys.readouterr()
    assert out.out == "plain\n" and out.err == ""


@pytest.mark.slow
def test_compare_shows_one_line_and_no_inner_bars(tmp_path, capsys):
    import torch
    import torchvision
    from test_compare_cli import make_images, train_tuned

    from tunelens.cli import main

    data = make_images(tmp_path / "data")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save(train_tuned(base, data, 3).state_dict(), tmp_path / "tuned.pt")
    argv = ["compare", "--arch", "resnet18", "--base", str(tmp_path / "base.pt"), "--tuned", str(tmp_path / "tuned.pt"),
            "--data", str(data), "--out", str(tmp_path / "out"), "--image-size", "32", "--device", "cpu",
            "--set", "analysis.attribution_images=2", "--set", "analysis.interpolation_steps=3",
            "--set", "analysis.intruders=false"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [ln for ln in err.splitlines() if "%|" in ln]
    assert lines and all(ln.strip().startswith("tunelens compare") for ln in lines)
    assert any("attribution" in ln for ln in lines) and "100%" in lines[-1]
    # --no-progress: no line at all
    argv[argv.index("--out") + 1] = str(tmp_path / "out2")
    assert main([*argv, "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err
