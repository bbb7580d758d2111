"""One progress line for a whole run (tunelens/core/progress.py): stage names, shares by predicted seconds, no
bars of the stages while it is shown, nothing with --no-progress."""

from __future__ import annotations

import io
import re

import pytest

from tunelens.core import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_shares_follow_the_plan_and_the_line_ends_full(capsys):
    term = _Terminal()
    with progress.run_progress({"pretrain": 30.0, "full": 10.0}, title="tunelens run", stream=term) as line:
        assert progress.active() and not line.plain
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
    assert "[finetune] a log line" in capsys.readouterr().out
    frames = [f for f in re.split(r"[\r\n]", term.getvalue()) if f.strip()]
    assert "tunelens run: pretrain" in frames[1]
    # the line ends once, at 100%, without stepping back through the stages already done
    full = [i for i, f in enumerate(frames) if "100%" in f]
    assert full and full[0] == len(frames) - 1 and frames[-1].startswith("tunelens run: done 100%")
    assert not any("pretrain" in f for f in frames[frames.index(next(f for f in frames if "full" in f)) :])


def test_a_stream_that_is_not_a_terminal_gets_plain_lines():
    """A log file or CI: one plain line per stage and one at the end, no carriage returns, no bar frames."""
    log = io.StringIO()
    with progress.run_progress({"data": 1.0, "pretrain": 3.0, "report": 1.0}, title="tunelens run", stream=log) as line:
        assert line.plain and progress.active()
        progress.report("data", 1.0)
        for k in range(4):
            progress.report("pretrain", (k + 1) / 4, label=f"epoch {k + 1}/4")
        progress.report("report", 1.0)
    text = log.getvalue()
    assert "\r" not in text and "%|" not in text
    lines = text.splitlines()
    assert [ln.rsplit(" (", 1)[0] for ln in lines] == [
        "tunelens run: data",
        *(f"tunelens run: pretrain (epoch {k}/4)" for k in range(1, 5)),
        "tunelens run: report",
        "tunelens run: done",
    ]
    assert "( 20% of the run" in lines[1] and "( 35% of the run" in lines[2] and "(100% of the run" in lines[-1]


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
    err = capsys.readouterr().err  # not a terminal: plain lines
    assert "\r" not in err and "%|" not in err
    lines = [ln for ln in err.splitlines() if "% of the run" in ln]
    assert lines and all(ln.startswith("tunelens compare: ") for ln in lines)
    assert any("attribution" in ln for ln in lines) and lines[-1].startswith("tunelens compare: done (100%")
    # --no-progress: no line at all
    argv[argv.index("--out") + 1] = str(tmp_path / "out2")
    assert main([*argv, "--no-progress"]) == 0
    assert "% of the run" not in capsys.readouterr().err
