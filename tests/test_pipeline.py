"""End to end on the quick default: checkpoints, results, report, cache, CLI errors."""

import json

import pandas as pd
import pytest

from tunelens.cli import main

pytestmark = pytest.mark.slow


def test_run_writes_checkpoints_results_and_report(quick_run):
    ck = quick_run / "checkpoints"
    index = json.loads((ck / "manifest.json").read_text())["checkpoints"]
    assert {"base", "linear_probe", "full", "scratch"} <= set(index)
    man = json.loads((ck / "full.json").read_text())
    for key in ("arch", "classes", "strategy", "data", "seed", "metrics", "history", "sha256", "versions"):
        assert key in man
    assert set(man["history"][0]["update_ratio"]) >= {"stem", "layer1", "layer4", "head"}
    lp = json.loads((ck / "linear_probe.json").read_text())
    # the linear probe trains the head only: backbone stages have zero update ratio
    assert all(r["update_ratio"]["layer1"] == 0 for r in lp["history"])
    assert all(r["update_ratio"]["head"] > 0 for r in lp["history"])
    res = quick_run / "results"
    wd = pd.read_csv(res / "weight_deltas.csv")
    assert set(wd["model"]) >= {"linear_probe", "full"}
    assert (
        wd[(wd.model == "linear_probe") & (wd.status == "compared") & (wd.kind != "bn_stat")]["frobenius"] == 0
    ).all()
    assert (wd[wd.name == "fc.weight"]["status"] == "replaced").all()
    html = (quick_run / "report" / "index.html").read_text()
    assert 'id="findings"' in html and "Weight deltas" in html and "Methods and reproducibility" in html
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    assert (quick_run / "report" / "tables" / "weight_deltas.csv").exists()
    summary = json.loads((res / "summary.json").read_text())
    assert summary["findings"] and all(f["text"] for f in summary["findings"])


def test_unchanged_stages_are_not_recomputed(quick_run, capsys):
    before = (quick_run / "checkpoints" / "full.safetensors").stat().st_mtime_ns
    assert main(["run", "--quick", "--out", str(quick_run), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "base unchanged, kept" in out and "full unchanged, kept" in out and "results unchanged" in out
    assert out.strip().splitlines()[-1].startswith("report: ")
    assert (quick_run / "checkpoints" / "full.safetensors").stat().st_mtime_ns == before


def test_stages_run_alone_from_files(quick_run, capsys):
    assert main(["report", "--out", str(quick_run)]) == 0
    assert "report:" in capsys.readouterr().out


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["analyze", "--out", str(tmp_path / "nothing")]) == 2
    assert "run `tunelens finetune" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path), "--set", "finetune.common.nope=1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
