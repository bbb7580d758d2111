"""The pretrained base shipped for the default run (finetune/shipped/): it is what the pretraining stage makes
for the default settings with the current code, it is used only for exactly those settings, and a run that
uses it writes the same base checkpoint a fresh pretraining writes."""

from __future__ import annotations

import json

import pytest

from tunelens.config import DEFAULT_CONFIG, make_config
from tunelens.core.files import sha256_file
from tunelens.finetune.recipes import data_spec
from tunelens.finetune.shipped import SHIPPED, pretrain_code_hash, shipped_base, shipped_key


def _key(cfg: dict) -> str:
    return shipped_key(cfg["arch"], cfg["seed"], data_spec(cfg, "source").to_dict(), cfg["pretrain"])


def test_the_shipped_base_is_current():
    man = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert man["sha256"] == sha256_file(SHIPPED)
    assert man["pretrain_code"] == pretrain_code_hash(), (
        "the pretraining code changed since the shipped base was made: run `make base-weights` (about 150 s) and "
        "commit finetune/shipped/"
    )
    assert man["shipped_key"] == _key(make_config(None)), (
        "the default pretraining settings changed since the shipped base was made: run `make base-weights`"
    )
    assert man["metrics"]["test_acc"] >= 0.9  # a useful pretrained model: the default run's story needs one
    assert DEFAULT_CONFIG["pretrain"]["use_shipped"] is True


@pytest.mark.parametrize(
    "sets", [["pretrain.epochs=3"], ["seed=1"], ["data.source.train_per_class=10"], ["pretrain.lr=0.05"]]
)
def test_other_settings_do_not_get_the_shipped_base(sets):
    assert shipped_base(_key(make_config(None))) is not None
    assert shipped_base(_key(make_config(None, sets=sets))) is None


def test_use_shipped_does_not_change_the_key():
    assert _key(make_config(None, sets=["pretrain.use_shipped=false"])) == _key(make_config(None))


def test_a_run_writes_the_shipped_weights_as_its_base(tmp_path):
    from tunelens.core.hashing import code_hash, config_hash
    from tunelens.finetune.checkpoints import load_checkpoint
    from tunelens.finetune.recipes import _pretrain_base

    cfg = make_config(None)
    spec = data_spec(cfg, "source")
    code = code_hash("tunelens.finetune") + code_hash("tunelens.core")
    lines: list[str] = []
    path = tmp_path / "base.safetensors"
    # data=None: the shipped copy needs no source data (training it would fail on None)
    from tunelens.core.progress import run_progress

    with run_progress({"pretrain": 150.0, "full": 20.0}) as line:
        man = _pretrain_base(cfg, cfg["arch"], cfg["seed"], "cpu", spec, None, code, path, False, lines.append)
        assert line.plan["pretrain"] == 0.0 and line.bar.total == 20.0  # the progress line drops the pretraining
    shipped = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert man["sha256"] == shipped["sha256"] and man["seconds"] == 0.0 and man["shipped"]["file"] == SHIPPED.name
    assert man["config_hash"] == config_hash(
        "base", cfg["arch"], cfg["seed"], spec.to_dict(), cfg["pretrain"], code, "cpu"
    )
    assert "shipped with tunelens" in lines[0]
    sd, _ = load_checkpoint(path)
    assert set(sd) == set(load_checkpoint(SHIPPED)[0])
