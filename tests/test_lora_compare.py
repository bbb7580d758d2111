"""``tunelens compare --tuned ADAPTER_DIR``: a PEFT LoRA adapter folder merged onto --base, forgetting with
--source-data, and a clear exit 2 when the adapter does not fit the base."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torchvision
from peft import LoraConfig, get_peft_model
from test_compare_cli import FAST, make_images

from tunelens.cli import main


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cmp")
    data = make_images(root / "data")
    source = make_images(root / "source", classes=("a", "b", "c", "d"))
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=4)
    torch.save(base.state_dict(), root / "base.pt")
    tuned = copy.deepcopy(base)
    tuned.fc = torch.nn.Linear(tuned.fc.in_features, 3)
    pm = get_peft_model(
        tuned,
        LoraConfig(r=2, lora_alpha=4, target_modules=["layer4.0.conv1", "layer4.1.conv2"], modules_to_save=["fc"]),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking adapter (B starts at zero)
    pm.save_pretrained(str(root / "lora_adapter"))
    return {"root": root, "data": data, "source": source, "adapter": root / "lora_adapter"}


def _argv(case, out, *extra, base=None):
    return [
        "compare", "--arch", "resnet18", "--base", str(base or case["root"] / "base.pt"), "--tuned",
        str(case["adapter"]), "--data", str(case["data"]), "--out", str(out), *FAST, *extra,
    ]  # fmt: skip


def test_adapter_that_does_not_fit_the_base_exits_2(adapter_case, tmp_path, capsys):
    from tunelens.core.architectures import TinyResNet

    torch.save(TinyResNet(num_classes=4).state_dict(), tmp_path / "other.pt")  # no layer4.1: the adapter's target
    argv = _argv(adapter_case, tmp_path / "out", base=tmp_path / "other.pt")
    argv[argv.index("resnet18")] = "tiny_resnet"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tuned" in err[0] and "does not fit" in err[0]
    assert not (tmp_path / "out").exists()


def test_adapter_is_merged_and_forgetting_uses_source_data(adapter_case, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(adapter_case, out, "--source-data", str(adapter_case["source"]))) == 0
    acc = pd.read_csv(out / "results" / "accuracy.csv")
    assert acc["strategy"].tolist() == ["lora (PEFT adapter)"]
    fg = pd.read_csv(out / "results" / "forgetting.csv")
    assert fg["model"].tolist() == ["lora_adapter"] and {"head_drop", "probe_drop", "head_drop_lo"} <= set(fg.columns)
    st = pd.read_csv(out / "results" / "intruder_stages.csv")
    assert set(st["kind"]) == {"tuned", "control"}
    html = (out / "report" / "index.html").read_text()
    assert "Forgetting of the source task" in html and "intruder" in html


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"lora_alpha": "abc"}, 'lora_alpha must be a positive finite number, got "abc"'),
        ({"r": 1e12}, "r must be a positive integer (the LoRA rank), got 1000000000000.0"),
        ({"r": 10**12}, "r is 1000000000000 but the saved lora_A tensors have rank 2"),
        ({"lora_alpha": 1e38}, "r = 5e+37 is beyond 10000"),
    ],
    ids=["alpha not a number", "r a float", "r too large", "alpha overflows"],
)
def test_adapter_config_numbers_are_checked_before_merging(adapter_case, tmp_path, capsys, change, words):
    import json
    import shutil

    bad = tmp_path / "adapter"
    shutil.copytree(adapter_case["adapter"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    argv = _argv(adapter_case, tmp_path / "out")
    argv[argv.index(str(adapter_case["adapter"]))] = str(bad)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()
