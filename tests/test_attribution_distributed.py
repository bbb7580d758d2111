"""The attribution study sharded over 2 gloo processes equals the single-process study."""
from __future__ import annotations

import pickle
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

METHODS = ("saliency", "integrated_gradients", "grad_cam")


def _study():
    from analysis.attribution_study import attribution_study
    from finetune.data import ShapesSpec, make_shapes
    from finetune.models import build_model

    data = make_shapes(ShapesSpec(task="target", train_per_class=2, val_per_class=1, test_per_class=2, seed=3))
    base, tuned = build_model("tiny_resnet", 6, seed=1), build_model("tiny_resnet", 6, seed=2)
    st = attribution_study(base, tuned, data["test"], methods=METHODS, n_images=9, seed=0, device="cpu",
                           n_boot=200, threads=1, faithfulness=True, faithfulness_steps=4)
    return {"comparisons": st.comparisons, "summary": st.summary, "maps": st.maps}


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        res = _study()
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_sharded_attribution_equals_single_process(tmp_path):
    out = tmp_path / "rank0.pkl"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    with open(out, "rb") as f:
        dd = pickle.load(f)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _study()
    finally:
        torch.set_num_threads(n)
    cols = [c for c in single["comparisons"].columns if c != "seconds"]
    pd.testing.assert_frame_equal(dd["comparisons"][cols], single["comparisons"][cols], rtol=1e-5, atol=1e-6)
    num = [c for c in single["summary"].columns if c not in ("seconds",) and single["summary"][c].dtype.kind == "f"]
    np.testing.assert_allclose(dd["summary"][num].to_numpy(), single["summary"][num].to_numpy(), rtol=1e-5, atol=1e-6)
    for m in METHODS:
        for key, arr in single["maps"][m].items():
            np.testing.assert_allclose(dd["maps"][m][key], arr, rtol=1e-5, atol=1e-6)
