"""The whole configuration is validated before any work: unknown keys, types, ranges, strategy names."""

import json

import pytest

from tunelens.cli import main
from tunelens.config import DEFAULT_CONFIG, make_config
from tunelens.config_validation import ConfigError, validate_config

BAD_SETS = [
    ("finetune.common.epochs=-1", "finetune.common.epochs=-1 is too small"),
    ("finetune.common.epochs=0", "at least 1"),
    ("pretrain.lr=0", "pretrain.lr=0 is out of range"),
    ("pretrain.batch_size=0", "pretrain.batch_size=0"),
    ("finetune.common.patience=-1", "finetune.common.patience=-1"),
    ("finetune.common.patience=true", "expected an integer"),
    ("finetune.common.epochs=2.5", "expected an integer"),
    ('finetune.strategies=["ful"]', "did you mean 'full'"),
    ('finetune.strategies=["full", 3]', "expected a list of strings"),
    ("finetune.common.schedule=cos", "expected one of cosine, step, none"),
    ("analysis.interpolation_steps=1", "at least 2"),
    ("analysis.attribution_images=0", "at least 1"),
    ("analysis.attribution_images=abc", "expected an integer"),
    ("pretrain.augment=1", "expected true or false"),
    ("analysis.attribution_methods=nosuch", "unknown attribution method(s) nosuch; known: default or saliency"),
    ("analysis.attribution_methods=saliency,nosuch", 'attribution_methods="saliency,nosuch": unknown'),
    ("analysis.attribution_methods=,", "no attribution method named"),
]
BAD_FILES = [
    ({"sed": 3}, "unknown configuration key 'sed'", "did you mean 'seed'"),
    ({"finetune": {"common": {"epochs": "three"}}}, 'finetune.common.epochs="three"', "expected an integer"),
    ({"finetune": {"full": {"patiense": 3}}}, "'finetune.full.patiense'", "did you mean 'finetune.full.patience'"),
    ({"data": 3}, "data=3", "expected a section"),
    ([1, 2], "JSON object", "got list"),
]


@pytest.mark.parametrize("assignment,msg", BAD_SETS)
def test_bad_set_exits_2_before_any_work(tmp_path, capsys, assignment, msg):
    out = tmp_path / "out"
    assert main(["run", "--quick", "--out", str(out), "--device", "cpu", "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and err.startswith("tunelens: error: ")
    assert not out.exists()


@pytest.mark.parametrize("over,msg,hint", BAD_FILES)
def test_bad_config_file_exits_2(tmp_path, capsys, over, msg, hint):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(over))
    out = tmp_path / "out"
    assert main(["finetune", "--out", str(out), "--device", "cpu", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert msg in err and hint in err and err.count("\n") == 1
    assert not out.exists()


def test_valid_configurations_pass():
    make_config(quick=True)
    make_config(sets=["analysis.attribution_methods=default", "analysis.attribution_methods=saliency, grad_cam"])
    make_config(sets=['finetune.strategies=["full", "last_k"]', "pretrain.lr=1", "pretrain.weight_decay=0"])
    cfg = make_config({"finetune": {"full": {"patience": 3, "lr": 1}}})  # a strategy section takes common keys
    assert cfg["finetune"]["full"]["patience"] == 3


def test_validation_is_generic_over_the_defaults():
    defaults = {"analysis": {"new_steps": 4, "new_fraction": 0.5, "names": ["a"]}}
    with pytest.raises(ConfigError, match="new_fraction=1 is out of range"):
        validate_config({"analysis": {"new_steps": 7, "new_fraction": 1}}, defaults)
    with pytest.raises(ConfigError, match=r"did you mean 'analysis\.new_steps'"):
        validate_config({"analysis": {"new_step": 7}}, defaults)
    validate_config({"analysis": {"new_steps": 7, "new_fraction": 0.25, "names": ["b"]}}, defaults)
    validate_config(make_config(), DEFAULT_CONFIG)


@pytest.mark.parametrize(
    "assignment,msg",
    [
        ("analysis.interpolation_steps=0", "at least 2"),
        ("analysis.attribution_images=abc", "expected an integer"),
        ("analysis.attribution_methods=nosuch", "unknown attribution method(s) nosuch; known: default or saliency"),
    ],
)
def test_compare_set_is_validated(tmp_path, capsys, assignment, msg):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    argv = ["compare", "--arch", "resnet18", "--base", "b.pt", "--tuned", "t.pt", "--data", str(tmp_path / "data")]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not out.exists()


HOSTILE_FLAGS = [
    (["--seed", "-1"], "the seed must lie between 0 and 4294967295"),
    (["--seed", "1" * 30], "the seed must lie between 0 and 4294967295"),
    (["--budget", "inf"], "the budget must be finite seconds"),
    (["--budget", "1e-300"], "the budget must be finite seconds of at least 0.1"),
    (["--budget", "nan"], "the budget must be finite seconds"),
    (["--set", "analysis.budget=NaN"], 'analysis.budget=NaN must be finite seconds >= 0.1, "auto" or "none"'),
    (["--set", "analysis.budget=Infinity"], "must be finite seconds"),
    (["--set", "analysis.intruder_threshold=NaN"], "analysis.intruder_threshold=NaN must be a finite number"),
    (["--set", "seed=99999999999"], "seed=99999999999 is too large"),
    (["--set", "analysis=3"], "analysis is a section"),
]


def _exit_code(argv: list[str]) -> int:
    """main's status, or argparse's for a flag it refuses itself."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize(("flags", "words"), HOSTILE_FLAGS, ids=[" ".join(f) for f, _ in HOSTILE_FLAGS])
def test_hostile_flags_exit_2_before_anything_is_written(tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    assert _exit_code(["run", "--quick", "--no-progress", "--out", str(out), *flags]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_a_section_set_as_an_object_keeps_its_other_keys():
    cfg = make_config(sets=["analysis={}"])
    assert cfg["analysis"] == DEFAULT_CONFIG["analysis"]
    cfg = make_config(sets=['analysis={"budget": 60}'])
    assert (
        cfg["analysis"]["budget"] == 60
        and cfg["analysis"]["attribution_images"] == (DEFAULT_CONFIG["analysis"]["attribution_images"])
    )


def test_cli_flags_are_validated_with_the_configuration():
    from tunelens.cli import _config, build_parser

    args = build_parser().parse_args(["run", "--seed", "7", "--budget", "30", "--set", "seed=3"])
    cfg = _config(args)
    assert cfg["seed"] == 7 and cfg["analysis"]["budget"] == 30  # the flags win over --set
