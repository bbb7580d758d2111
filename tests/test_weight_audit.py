"""``tunelens weights``: the streaming weight audit against the in-memory analyses, planted changes, PEFT adapters,
sharded folders, torchrun, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tunelens.analysis.engine.weight_audit import AuditOptions, assign_ranks, plan_audit, run_audit
from tunelens.analysis.io.tensor_pairing import pair_names
from tunelens.analysis.measures.intruders import intruder_dimensions
from tunelens.analysis.measures.tensor_measures import entry_stats, randomized_svd
from tunelens.analysis.measures.weights import weight_deltas
from tunelens.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["norm_base", "frobenius", "relative", "cosine", "max_abs", "spectral", "stable_rank", "effective_rank"]


def _model_sd(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A two-layer Llama-like state dict, every dimension below 64 (so the in-memory analysis is float64 too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(50, 24, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        for n in "qkvo":
            sd[p + f"self_attn.{n}_proj.weight"] = torch.randn(24, 24, generator=g) / 5
        sd[p + "mlp.up_proj.weight"] = torch.randn(40, 24, generator=g) / 5
        sd[p + "mlp.down_proj.weight"] = torch.randn(24, 40, generator=g) / 5
        sd[p + "mlp.up_proj.bias"] = torch.randn(40, generator=g)
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(24, generator=g)
    sd["model.norm.weight"] = torch.ones(24)
    sd["lm_head.weight"] = torch.randn(50, 24, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def _tuned_sd(base: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}


def _audit(base, tuned, **opts) -> pd.DataFrame:
    return run_audit(plan_audit(base, tuned), AuditOptions(**opts))


def _pair(tmp_path: Path, base: dict, tuned: dict) -> tuple[Path, Path]:
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def test_audit_equals_in_memory_weight_deltas_and_intruders(tmp_path):
    base = _model_sd()
    tuned = _tuned_sd(base)
    tuned["model.layers.1.self_attn.k_proj.weight"] = base["model.layers.1.self_attn.k_proj.weight"].clone()
    got = _audit(*_pair(tmp_path, base, tuned)).set_index("name")
    ref = weight_deltas(base, tuned).set_index("name")
    assert sorted(got.index) == sorted(ref.index)
    ref = ref.loc[got.index]
    assert (got["kind"] == ref["kind"]).all() and (got["shape"] == ref["shape"]).all()
    for col in SHARED:
        np.testing.assert_allclose(
            got[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-6, atol=1e-12, err_msg=col
        )
    w = got[got["kind"] == "weight"]
    assert (w["rank_method"].isin(["exact", "zero update"])).all()
    intr = intruder_dimensions(base, tuned).set_index("layer")
    changed = w[~w["identical"]]
    for name, row in changed.iterrows():
        assert row["intruders"] == intr.loc[name, "intruders"]
        assert row["min_max_cos"] == pytest.approx(intr.loc[name, "min_max_cos"], abs=1e-6)
    assert got.loc["model.layers.1.self_attn.k_proj.weight", "identical"]
    assert int(got["identical"].sum()) == 1


@pytest.mark.parametrize("exact_max_numel", [1 << 20, 100])  # exact spectra; randomized top-k
def test_planted_low_rank_update_and_identical_tensor_are_found(tmp_path, exact_max_numel):
    g = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.mlp.up_proj.weight": torch.randn(96, 64, generator=g) for i in range(3)}
    base["layers.0.norm.weight"] = torch.ones(64)
    tuned = {k: v.clone() for k, v in base.items()}
    w0 = base["layers.1.mlp.up_proj.weight"]
    d = torch.randn(96, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 64, generator=g, dtype=torch.float64)
    d *= 0.05 * float(w0.double().norm()) / float(d.norm())  # relative size 5%, rank 4
    tuned["layers.1.mlp.up_proj.weight"] = (w0.double() + d).float()
    tuned["layers.2.mlp.up_proj.weight"] = base["layers.2.mlp.up_proj.weight"] + 1e-3 * torch.randn(96, 64, generator=g)
    t = _audit(*_pair(tmp_path, base, tuned), exact_max_numel=exact_max_numel, rank_k=8).set_index("name")
    planted = t.loc["layers.1.mlp.up_proj.weight"]
    assert planted["relative"] == pytest.approx(0.05, rel=1e-5)
    assert planted["numerical_rank"] == 4
    assert 1 <= planted["stable_rank"] <= 4 and 1 <= planted["effective_rank"] <= 4
    assert planted["changed_share"] == 1.0 and not planted["identical"]
    assert planted["rank_method"] == ("exact" if exact_max_numel > 6144 else "top-8")
    noisy = t.loc["layers.2.mlp.up_proj.weight"]
    assert noisy["numerical_rank"] == (64 if exact_max_numel > 6144 else 8)
    assert noisy["effective_rank"] > (40 if exact_max_numel > 6144 else 7)
    same = t.loc["layers.0.mlp.up_proj.weight"]
    assert same["identical"] and same["frobenius"] == 0 and same["changed_share"] == 0 and same["cosine"] == 1
    assert t.loc["layers.0.norm.weight", "identical"]


def test_changed_share_counts_only_changes_beyond_the_stored_rounding():
    w0 = torch.tensor([1.0, 1.0, 0.0, 4.0], dtype=torch.bfloat16)
    d = torch.tensor([2.0**-9, 2.0**-7, 1e-30, 2.0**-7])  # bf16 eps/2 = 2^-8: below, above, from 0, below 4 * 2^-8
    assert entry_stats(w0, d, torch.bfloat16)["changed_share"] == 0.5
    assert entry_stats(w0.float(), d, torch.float32)["changed_share"] == 1.0  # float32's rounding is finer


def test_randomized_spectrum_matches_the_exact_top_values_and_bf16_storage():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g) + 1e-3 * torch.randn(300, 200, generator=g)
    u, s = randomized_svd(m, 6, seed=1)
    exact = torch.linalg.svdvals(m.double())[:6]
    np.testing.assert_allclose(s.double().numpy(), exact.numpy(), rtol=1e-4)
    assert torch.allclose(u.T @ u, torch.eye(6), atol=1e-5)
    _, s16 = randomized_svd(m.bfloat16(), 6, seed=1)  # converted block by block: the same as converting first
    _, s32 = randomized_svd(m.bfloat16().float(), 6, seed=1)
    np.testing.assert_allclose(s16.numpy(), s32.numpy(), rtol=1e-5)


def test_sharded_folder_and_pt_equal_the_single_file(tmp_path):
    base, tuned = _model_sd(dtype=torch.bfloat16), _tuned_sd(_model_sd(dtype=torch.bfloat16))
    single = _audit(*_pair(tmp_path, base, tuned))
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = list(tuned)
    parts = [names[:5], names[5:11], names[11:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        f = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: tuned[k] for k in part}, str(folder / f))
        weight_map.update(dict.fromkeys(part, f))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pd.testing.assert_frame_equal(_audit(tmp_path / "base.safetensors", folder), single, check_exact=True)
    (folder / "model.safetensors.index.json").unlink()  # shards found by their names
    pd.testing.assert_frame_equal(_audit(tmp_path / "base.safetensors", folder), single, check_exact=True)
    torch.save(tuned, tmp_path / "tuned.pt")
    pd.testing.assert_frame_equal(
        _audit(tmp_path / "base.safetensors", tmp_path / "tuned.pt"), single, check_exact=True
    )


def test_prefixes_are_paired_and_missing_extra_listed(tmp_path):
    base = _model_sd()
    tuned = {f"module.{k.removeprefix('model.')}": v for k, v in _tuned_sd(base).items()}
    del tuned["module.lm_head.weight"]
    tuned["module.score.weight"] = torch.zeros(2, 24)
    p = pair_names(base, tuned)
    assert ("model.layers.0.self_attn.q_proj.weight", "module.layers.0.self_attn.q_proj.weight") in p.renamed
    assert p.missing == ["lm_head.weight"] and p.extra == ["module.score.weight"]
    out = tmp_path / "out"
    assert main(["weights", "--base", str(_pair(tmp_path, base, tuned)[0]), "--tuned", str(tmp_path / "tuned.safetensors"),
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    pairing = pd.read_csv(out / "results" / "weight_pairing.csv")
    assert set(pairing["status"]) == {"renamed", "missing", "extra"}
    assert len(pd.read_csv(out / "results" / "weight_deltas.csv")) == len(base) - 1
    html = (out / "report" / "index.html").read_text()
    assert 'id="weights"' in html and 'id="weight-audit"' in html and 'id="similarity"' not in html


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 12)
        self.emb = nn.Embedding(30, 16)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.v(self.q(self.emb(x))))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_equals_peft_merge(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _Tiny()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q", "v", "emb"], init_lora_weights=False, use_rslora=rslora)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    plan = plan_audit(tmp_path / "base.safetensors", tmp_path / "adapter")
    for target in ("q.weight", "v.weight", "emb.weight"):
        d = plan.adapter.delta(target, tuple(base[target].shape))
        assert float((d - (merged[target] - base[target])).abs().max()) < 1e-6
    got = run_audit(plan, AuditOptions()).set_index("name")
    ref = weight_deltas(base, merged).set_index("name").loc[got.index]
    for col in ["frobenius", "relative", "cosine", "spectral", "stable_rank"]:
        np.testing.assert_allclose(
            got[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-5, atol=1e-7, err_msg=col
        )
    assert got.loc["q.weight", "numerical_rank"] == 4 and got.loc["emb.weight", "numerical_rank"] == 4
    assert got.loc["out.weight", "identical"] and got.loc["q.bias", "identical"]
    assert not got.loc["q.weight", "identical"]


def test_assign_ranks_greedy_by_bytes():
    sizes = [100, 10, 60, 50, 5, 40]
    r = assign_ranks(sizes, 2)
    loads = [sum(s for s, k in zip(sizes, r, strict=True) if k == i) for i in range(2)]
    # 100 -> 0, 60 -> 1, 50 -> 1 (110), 40 -> 0 (140), 10 -> 1 (120), 5 -> 1 (125)
    assert r == [0, 1, 1, 1, 1, 0]
    assert loads == [140, 125]
    assert assign_ranks(sizes, 1) == [0] * 6


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_bit_for_bit(tmp_path):
    base, tuned = _model_sd(dtype=torch.bfloat16), _tuned_sd(_model_sd(dtype=torch.bfloat16))
    b, t = _pair(tmp_path, base, tuned)
    args = [
        "weights",
        "--base",
        str(b),
        "--tuned",
        str(t),
        "--device",
        "cpu",
        "--no-progress",
        "--threads",
        "1",
        "--exact-max-numel",
        "700",
    ]  # fmt: skip  (some tensors exact, some randomized)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELENS_DIST_TIMEOUT": "60"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    one = subprocess.run([sys.executable, "-m", "tunelens", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tunelens", *args,
         "--out", str(tmp_path / "two")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("report:") == 1  # only rank 0 writes
    a = (tmp_path / "one" / "results" / "weight_deltas.csv").read_text()
    c = (tmp_path / "two" / "results" / "weight_deltas.csv").read_text()
    assert a == c  # every float written with all its digits: equal text = equal bits
    df = pd.read_csv(tmp_path / "two" / "results" / "weight_deltas.csv")
    assert set(df["rank_method"].dropna()) == {"exact", "top-32"}


def _bad_shape(tmp: Path) -> list[str]:
    base = _model_sd()
    tuned = dict(base, **{"lm_head.weight": torch.zeros(51, 24)})
    return [str(p) for p in _pair(tmp, base, tuned)]


def _bad_dtype(tmp: Path) -> list[str]:
    base = _model_sd()
    return [str(p) for p in _pair(tmp, base, {k: v.half() for k, v in base.items()})]


def _shards(tmp: Path, index: bool) -> Path:
    sd = _model_sd()
    folder = tmp / "tuned"
    folder.mkdir()
    names = list(sd)
    weight_map = {}
    for i, part in enumerate([names[:8], names[8:]], 1):
        f = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / f))
        weight_map.update(dict.fromkeys(part, f))
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(sd, str(tmp / "base.safetensors"))
    return folder


def _missing_shard(tmp: Path) -> list[str]:
    folder = _shards(tmp, index=False)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return [str(tmp / "base.safetensors"), str(folder)]


def _index_names_missing_file(tmp: Path) -> list[str]:
    folder = _shards(tmp, index=True)
    (folder / "model-00001-of-00002.safetensors").unlink()
    return [str(tmp / "base.safetensors"), str(folder)]


def _truncated(tmp: Path) -> list[str]:
    b, t = _pair(tmp, _model_sd(), _tuned_sd(_model_sd()))
    data = t.read_bytes()
    t.write_bytes(data[: len(data) - 100])
    return [str(b), str(t)]


def _adapter_with(tmp: Path, **change) -> list[str]:
    """A PEFT adapter of :class:`_Tiny` whose adapter_config.json holds ``change``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _Tiny()
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(tmp / "base.safetensors"))
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(tmp / "adapter"))
    path = tmp / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return [str(tmp / "base.safetensors"), str(tmp / "adapter")]


def _same_folder(tmp: Path) -> list[str]:
    folder = _shards(tmp, index=True)
    return [str(folder), str(folder) + "/"]


@pytest.mark.parametrize(
    "make,words",
    [
        (_bad_shape, "shape"),
        (_bad_dtype, "float16 in --tuned"),
        (_missing_shard, "shard 2 of 2 is missing"),
        (_index_names_missing_file, "not in the folder"),
        (_truncated, "truncated"),
        (_same_folder, "same checkpoint"),
        (lambda tmp: _adapter_with(tmp, lora_alpha="abc"), 'lora_alpha must be a positive finite number, got "abc"'),
        (lambda tmp: _adapter_with(tmp, r=1e12), "r must be a positive integer (the LoRA rank)"),
        (lambda tmp: _adapter_with(tmp, lora_alpha=1e38), "beyond 10000"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, make, words):
    base, tuned = make(tmp_path)
    out = tmp_path / "out"
    rc = main(["weights", "--base", base, "--tuned", tuned, "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("tunelens: error:") and words in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_device_cuda_without_a_gpu_is_bad_input(tmp_path, capsys):
    b, t = _pair(tmp_path, _model_sd(), _tuned_sd(_model_sd()))
    rc = main(["weights", "--base", str(b), "--tuned", str(t), "--out", str(tmp_path / "o"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no usable CUDA GPU" in err and not (tmp_path / "o").exists()


def test_relative_size_and_cosine_of_a_known_change(tmp_path):
    """A tensor scaled by 1.1: relative change 0.1 exactly, cosine 1."""
    base = {"w.weight": torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()}
    tuned = {"w.weight": (base["w.weight"].double() * 1.1).float()}
    row = _audit(*_pair(tmp_path, base, tuned)).iloc[0]
    assert row["relative"] == pytest.approx(0.1, rel=1e-6) and row["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert row["numerical_rank"] == 8 and math.isclose(row["norm_tuned"], 1.1 * row["norm_base"], rel_tol=1e-6)


def test_nonfinite_tensor_is_reported_not_decomposed(tmp_path):
    base = {"a.weight": torch.ones(8, 8), "b.weight": torch.ones(8, 8)}
    tuned = {"a.weight": torch.ones(8, 8), "b.weight": torch.ones(8, 8)}
    tuned["a.weight"][2, 3] = float("nan")
    t = _audit(*_pair(tmp_path, base, tuned)).set_index("name")
    assert math.isnan(t.loc["a.weight", "frobenius"]) and t.loc["a.weight", "rank_method"] == "not finite"
    assert t.loc["b.weight", "identical"] and t.loc["b.weight", "frobenius"] == 0
