"""Past one process: sharded loaders, 2-process gloo analyses equal to one process, torchrun fine-tuning.

The 2-process tests run on CPU with the gloo backend: the analyses in processes spawned by the test,
fine-tuning under ``python -m torch.distributed.run`` (torchrun) as a subprocess, which is how users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from _distributed import TINY, WORLD, run_two_ranks, single_thread
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from tunelens.analysis.engine.sharding import ShardedBatchSampler, gather_rows, per_sample_batch_size, shard_loader

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- sharded batches (no process group needed)


def _dataset(n: int = 70, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(x, torch.randint(0, 5, (n,), generator=g))


def test_single_process_shard_loader_is_a_plain_dataloader():
    ds = _dataset()
    ours, plain = shard_loader(ds, 16), DataLoader(ds, batch_size=16, shuffle=False)
    assert type(ours) is DataLoader and not isinstance(ours.batch_sampler, ShardedBatchSampler)
    assert [b[1].tolist() for b in ours] == [b[1].tolist() for b in plain]
    shuffled = [b[1].tolist() for b in shard_loader(ds, 16, shuffle=True, seed=3)]
    assert shuffled == [b[1].tolist() for b in shard_loader(ds, 16, shuffle=True, seed=3)]  # seeded
    assert shard_loader(ds, 16, device="cpu").pin_memory is False
    assert per_sample_batch_size(10, 256) == 256


@pytest.mark.parametrize("n,bs,world", [(70, 16, 2), (70, 16, 3), (64, 16, 4), (20, 16, 3), (5, 2, 2)])
def test_sharded_batches_are_the_single_process_batches_in_rank_order(n, bs, world):
    whole = list(BatchSampler(SequentialSampler(range(n)), bs, drop_last=False))
    parts = [
        ShardedBatchSampler(BatchSampler(SequentialSampler(range(n)), bs, drop_last=False), r, world)
        for r in range(world)
    ]
    got = [list(p) for p in parts]
    assert [b for p in got for b in p] == whole  # same batches, none repeated or padded, rank order = order
    assert [len(p) for p in parts] == [len(g) for g in got]
    assert max(map(len, got)) - min(map(len, got)) <= 1  # balanced
    for p, g in zip(parts, got, strict=False):  # offsets: where each batch starts in the single-process order
        assert p.offsets() == [b[0] for b in g]
    with pytest.raises(ValueError):
        ShardedBatchSampler(BatchSampler(SequentialSampler(range(n)), bs, drop_last=False), world, world)


def test_gather_rows_single_process():
    """One process: the rows as they are, sorted (stably) when ``sort_by`` is given, as with several ranks."""
    rows = [{"index": 2, "v": 1.0}, {"index": 0, "v": 2.0}, {"index": 2, "v": 3.0}]
    pd.testing.assert_frame_equal(gather_rows(rows), pd.DataFrame(rows))
    want = pd.DataFrame([rows[1], rows[0], rows[2]])
    pd.testing.assert_frame_equal(gather_rows(rows, sort_by="index"), want)


# ---------------------------------------------------------------- 2 processes, spawned (gloo)


def _models():
    from tunelens.finetune.models import build_model

    return build_model("tiny_resnet", 5, seed=0).eval(), build_model("tiny_resnet", 5, seed=1).eval()


def _analyses(loader_for) -> dict:
    """Evaluation, CKA, predictions and probe features over ``loader_for(batch_size)`` (sharded or not)."""
    from tunelens.analysis.measures.cka_models import cka_matrix
    from tunelens.analysis.measures.probes import layer_features
    from tunelens.analysis.suite import predictions_table
    from tunelens.core.evaluation import evaluate

    a, b = _models()
    out = {"eval": evaluate(b, loader_for(16), "cpu"), "eval_a": evaluate(a, loader_for(32), "cpu")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = cka_matrix(a, b, loader_for(17), device="cpu", n_boot=200, seed=1)  # 4 x 17 + a skipped 2
    out.update(ab=r.ab, aa=r.aa, bb=r.bb, diag=r.diagonal, n_samples=r.n_samples, skipped=r.skipped_samples)
    out["pred"] = predictions_table({"a": a, "b": b}, loader_for(16), torch.device("cpu"))
    feats, labels = layer_features(b, loader_for(16), ["layer1", "fc"], "cpu")
    out["feats"], out["labels"] = feats, labels
    out["rows"] = gather_rows(
        [{"index": i, "rank": int(dist.get_rank()) if dist.is_initialized() else 0} for i in range(3)], sort_by="index"
    )
    return out


def _sharded_analyses(rank: int) -> dict:
    ds = _dataset()
    res = _analyses(lambda bs: shard_loader(ds, bs))
    # 70 images in 16s: 5 batches, the short one last -> ranks get 3 and 2 batches
    res["n_local_batches"] = len(shard_loader(ds, 16))
    return res


@pytest.mark.slow
def test_two_process_analyses_equal_single_process(tmp_path):
    dd = run_two_ranks(_sharded_analyses, tmp_path, timeout_s=60)
    ds = _dataset()
    single = single_thread(_analyses, lambda bs: DataLoader(ds, batch_size=bs, shuffle=False))
    assert dd["n_local_batches"] == 3
    for key in ("eval", "eval_a"):  # sums of correct counts and losses over ranks, not averages of averages
        assert dd[key]["n"] == single[key]["n"] == 70
        assert dd[key]["acc"] == single[key]["acc"]
        assert abs(dd[key]["loss"] - single[key]["loss"]) <= 1e-9
    for key in ("ab", "aa", "bb"):
        assert dd[key].index.equals(single[key].index) and dd[key].columns.equals(single[key].columns)
        np.testing.assert_allclose(dd[key].to_numpy(), single[key].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        dd["diag"][["cka", "ci_low", "ci_high"]].to_numpy(),
        single["diag"][["cka", "ci_low", "ci_high"]].to_numpy(),
        rtol=0,
        atol=1e-9,
    )
    assert dd["n_samples"] == single["n_samples"] == 68 and dd["skipped"] == single["skipped"] == 2
    pd.testing.assert_frame_equal(dd["pred"], single["pred"])  # per-sample rows gathered, in order
    np.testing.assert_array_equal(dd["labels"], single["labels"])
    for k in single["feats"]:  # probe features gathered in single-process order
        np.testing.assert_array_equal(dd["feats"][k], single["feats"][k])
    assert dd["rows"]["index"].tolist() == [0, 0, 1, 1, 2, 2] and dd["rows"]["rank"].tolist() == [0, 1] * 3


# ---------------------------------------------------------------- torchrun (subprocess)


def _torchrun(args: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port is picked by the c10d rendezvous)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELENS_DIST_TIMEOUT": "60", **(env or {})}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [e.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_finetune_writes_exactly_one_valid_checkpoint_per_model(tmp_path):
    from tunelens.finetune.checkpoints import load_checkpoint

    out = tmp_path / "run"
    p = _torchrun(["-m", "tunelens", "finetune", "--out", str(out), *TINY], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("[finetune] pretrained base") == 1  # only rank 0 logs
    ck = out / "checkpoints"
    names = {"base", "full", "scratch"}
    assert sorted(x.name for x in ck.iterdir() if not x.name.startswith(".")) == sorted(
        [f"{n}.safetensors" for n in names] + [f"{n}.json" for n in names] + ["manifest.json"]
    )
    index = json.loads((ck / "manifest.json").read_text())["checkpoints"]
    assert set(index) == names
    for name in names:
        _sd, man = load_checkpoint(ck / f"{name}.safetensors")  # sha256 verified
        assert man["sha256"] == index[name]["sha256"] and man["world_size"] == WORLD
        assert man["device"] == "cpu" and len(man["history"]) == 1
        n_test = 10 * 8 if name == "base" else 16 * 6  # evaluation sharded by batch: no padded duplicates
        assert man["metrics"]["test_n"] == n_test


_FAIL = textwrap.dedent("""
    import os, sys
    where, rank = os.environ["FAIL_WHERE"], int(os.environ["RANK"])
    if where == "train" and rank == 1:
        import tunelens.finetune.train as T
        def boom(*a, **k):
            raise RuntimeError("injected failure on rank 1 during training")
        T.augment_batch = boom
    if where == "save" and rank == 0:  # the weights are written, then writing the manifest fails
        import tunelens.finetune.checkpoints as C
        def boom(*a, **k):
            raise OSError("injected failure on rank 0 while saving")
        C.atomic_write_text = boom
    from tunelens.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where,rank", [("train", 1), ("save", 0)])
def test_torchrun_a_failing_rank_fails_the_run_and_leaves_no_checkpoint(tmp_path, where, rank):
    script = tmp_path / "fail.py"
    script.write_text(_FAIL)
    out = tmp_path / "run"
    p = _torchrun([str(script), "finetune", "--out", str(out), *TINY], tmp_path, env={"FAIL_WHERE": where})
    text = p.stdout + p.stderr
    assert p.returncode != 0, text[-3000:]
    msg = (
        "injected failure on rank 1 during training" if where == "train" else "injected failure on rank 0 while saving"
    )
    assert msg in text
    root = text[text.index("Root Cause") :]  # torchrun's summary names the failing rank and its error
    assert f"rank      : {rank} (local_rank: {rank})" in root and msg in root
    ck = out / "checkpoints"
    left = sorted(x.name for x in ck.iterdir()) if ck.exists() else []
    assert not [x for x in left if x.endswith((".safetensors", ".json"))], left
    assert not [x for x in left if x.endswith(".tmp")], left


def test_sync_batchnorm_is_reverted_to_plain_batchnorm_with_the_same_state():
    from torch import nn

    from tunelens.finetune.models import build_model
    from tunelens.finetune.train import _revert_sync_batchnorm

    m = build_model("tiny_resnet", 5, seed=0)
    m.layer1[0].bn1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    classes = {n: type(x) for n, x in m.named_modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)}
    m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    assert any(isinstance(x, nn.SyncBatchNorm) for x in m.modules())
    m = _revert_sync_batchnorm(m, classes)
    assert not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules())
    assert {n: type(x) for n, x in m.named_modules() if n in classes} == classes
    assert m.state_dict().keys() == before.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert not m.layer1[0].bn1.weight.requires_grad
    m.eval()(torch.randn(2, 3, 32, 32))  # runs without a process group


def test_cuda_device_per_rank_without_a_gpu(monkeypatch):
    """Device choice under torchrun, with CUDA faked (nothing here touches a GPU)."""
    from tunelens.core import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert runtime.resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "5")
    for spec in ("auto", "cuda", torch.device("cuda")):  # process 5 of a node with 4 GPUs -> GPU 1
        assert runtime.resolve_device(spec) == torch.device("cuda", 1)
        assert runtime.device_name(spec) == "cuda"  # the same string on every rank (cache keys agree)
    assert runtime.resolve_device("cuda:2") == torch.device("cuda", 2) and runtime.device_name("cuda:2") == "cuda:2"
    with pytest.raises(ValueError, match="only 4 GPU"):
        runtime.resolve_device("cuda:7")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="same GPU"):
        runtime.init_distributed("cuda:2")
    assert not dist.is_initialized()
