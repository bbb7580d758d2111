"""Runs that do not mix: a resume file continues only the training it was written for, the early-stopping
counter survives a kill, and analyze refuses checkpoints tuned from another base."""

import json

import pytest
import torch
from _distributed import TINY
from torch.utils.data import TensorDataset

from tunelens.cli import main
from tunelens.core import files
from tunelens.finetune import train as train_mod
from tunelens.finetune.models import TinyResNet
from tunelens.finetune.train import TrainConfig, train


class Killed(BaseException):
    pass


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 16, 16, generator=g)
    y = torch.arange(24) % 2
    return TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])


def _model():
    torch.manual_seed(0)
    return TinyResNet(num_classes=2, widths=(4, 4, 4, 4))


def _cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.05, "augment": False, "device": "cpu", **kw})


def _kill_after_epoch(monkeypatch, k):
    """The k-th resume save completes, then the run dies (as with a kill after epoch k)."""
    orig, n = files.atomic_replace, {"saves": 0}

    def save_then_die(path, write):
        orig(path, write)
        n["saves"] += 1
        if n["saves"] == k:
            raise Killed(f"killed after epoch {k}")

    monkeypatch.setattr(files, "atomic_replace", save_then_die)


def _train(cfg, resume, key, logs=None):
    tr, va = _data()
    return train(
        _model(),
        tr,
        va,
        cfg,
        resume_path=resume,
        progress=False,
        resume_key=key,
        log=None if logs is None else logs.append,
    )


def test_resume_file_of_another_configuration_is_ignored(tmp_path, monkeypatch):
    resume = tmp_path / "full.resume.pt"
    with monkeypatch.context() as m:
        _kill_after_epoch(m, 1)
        with pytest.raises(Killed):
            _train(_cfg(epochs=8), resume, {"config_hash": "A", "parent_sha256": "p"})
    assert resume.exists()
    logs = []
    res = _train(_cfg(epochs=1), resume, {"config_hash": "B", "parent_sha256": "p"}, logs)
    assert any("ignoring the resume file full.resume.pt" in line and "from scratch" in line for line in logs), logs
    assert not resume.exists() and len(res.history) == 1
    clean = _train(_cfg(epochs=1), tmp_path / "clean.resume.pt", {"config_hash": "B", "parent_sha256": "p"})
    for k, v in clean.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k


def test_resume_file_of_another_parent_is_ignored(tmp_path, monkeypatch):
    resume = tmp_path / "full.resume.pt"
    with monkeypatch.context() as m:
        _kill_after_epoch(m, 2)
        with pytest.raises(Killed):
            _train(_cfg(), resume, {"config_hash": "A", "parent_sha256": "old-base"})
    logs = []
    res = _train(_cfg(), resume, {"config_hash": "A", "parent_sha256": "new-base"}, logs)
    assert len(res.history) == 3 and [r["epoch"] for r in res.history] == [1, 2, 3]
    assert any("ignoring the resume file" in line for line in logs)


def test_resume_with_the_same_key_continues(tmp_path, monkeypatch):
    resume = tmp_path / "full.resume.pt"
    key = {"config_hash": "A", "parent_sha256": "p"}
    with monkeypatch.context() as m:
        _kill_after_epoch(m, 2)
        with pytest.raises(Killed):
            _train(_cfg(), resume, key)
    calls = {"epochs": 0}
    set_train_mode = train_mod.set_train_mode

    def count(*a, **k):  # called once per trained epoch
        calls["epochs"] += 1
        return set_train_mode(*a, **k)

    monkeypatch.setattr(train_mod, "set_train_mode", count)
    logs = []
    res = _train(_cfg(), resume, key, logs)
    assert calls["epochs"] == 1 and [r["epoch"] for r in res.history] == [1, 2, 3] and not logs


def test_resume_keeps_the_early_stopping_counter(tmp_path, monkeypatch):
    """patience 2, validation accuracy falling after epoch 1: stops after epoch 3, killed after epoch 2 or not."""
    accs = iter([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])

    def scripted(model, loader, device):
        return {"loss": 1.0, "acc": next(accs)}

    monkeypatch.setattr(train_mod, "evaluate", scripted)
    resume = tmp_path / "full.resume.pt"
    key = {"config_hash": "A", "parent_sha256": "p"}
    with monkeypatch.context() as m:
        _kill_after_epoch(m, 2)
        with pytest.raises(Killed):
            _train(_cfg(epochs=10, patience=2), resume, key)
    res = _train(_cfg(epochs=10, patience=2), resume, key)
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
    assert res.best_epoch == 1


def test_analyze_refuses_checkpoints_of_another_base(tmp_path, capsys):
    from tunelens.finetune.checkpoints import load_checkpoint, save_checkpoint

    out = tmp_path / "out"
    assert main(["finetune", "--out", str(out), *TINY]) == 0
    ck = out / "checkpoints"
    index_text = (ck / "manifest.json").read_text()
    # a later run replaced the base and was killed before it re-tuned `full` and rewrote the index
    sd, man = load_checkpoint(ck / "base.safetensors")
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    new = save_checkpoint(ck / "base.safetensors", sd, {k: v for k, v in man.items() if k not in ("sha256", "file")})
    assert main(["analyze", "--force", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "not the one the run index" in err and "rerun `tunelens finetune" in err and err.count("\n") == 1
    # the index updated too (only `full` still from the old base): the recorded parent is checked
    index = json.loads(index_text)
    index["checkpoints"]["base"]["sha256"] = new["sha256"]
    (ck / "manifest.json").write_text(json.dumps(index))
    assert main(["analyze", "--force", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "full was tuned from a different 'base'" in err and "rerun `tunelens finetune" in err
    assert not (out / "results").exists()
