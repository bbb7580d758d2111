"""A 2-process gloo run, sharded by batch, equals the single-process CKA (and statistics) to 1e-9."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _distributed import WORLD, run_two_ranks, single_thread

from tunelens.analysis.measures.cka import StreamingCKA
from tunelens.analysis.measures.cka_models import cka_matrix
from tunelens.finetune.models import build_model


def _image_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sizes = [8, 8, 8, 3, 8, 6, 8]  # the 3-sample batch is skipped (and counted) on whichever rank gets it
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long)) for n in sizes]


def _feature_batches() -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(1)
    out = []
    for n in [10, 7, 12, 9, 10, 5]:
        a = np.maximum(rng.standard_normal((n, 4, 3, 3)) + 0.2, 0)
        b = a.reshape(n, -1) @ rng.standard_normal((36, 6))
        out.append(
            (
                {"p": torch.from_numpy(a), "q": torch.from_numpy(rng.standard_normal((n, 5)))},
                {"r": torch.from_numpy(np.maximum(b, 0)), "s": torch.from_numpy(b[:, :2])},
            )
        )
    return out


def _models():
    return build_model("tiny_resnet", 6, seed=0), build_model("tiny_resnet", 10, seed=1)


def _run(batches_img, batches_feat) -> dict:
    m = StreamingCKA()
    for fa, fb in batches_feat:
        m.update(fa, fb)
    ab, aa, bb = m.compute_all()
    a, b = _models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cka_matrix(a, b, batches_img, device="cpu", n_boot=300, seed=2)
    return {
        "ab": ab,
        "aa": aa,
        "bb": bb,
        "diag": m.bootstrap_diagonal(n_boot=300, seed=1),
        "res_ab": res.ab,
        "res_aa": res.aa,
        "res_bb": res.bb,
        "res_diag": res.diagonal,
        "acts": res.activations,
        "attrs": {"n_samples": res.n_samples, "skipped_samples": res.skipped_samples},
    }


def _run_on_rank(rank: int) -> dict:
    # shard by batch, not by sample: minibatch CKA depends on which samples share a batch
    return _run(_image_batches()[rank::WORLD], _feature_batches()[rank::WORLD])


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path):
    dd = run_two_ranks(_run_on_rank, tmp_path)
    single = single_thread(_run, _image_batches(), _feature_batches())
    for key in ("ab", "aa", "bb", "res_ab", "res_aa", "res_bb"):
        assert dd[key].index.equals(single[key].index) and dd[key].columns.equals(single[key].columns)
        np.testing.assert_allclose(dd[key].to_numpy(), single[key].to_numpy(), rtol=0, atol=1e-9)
    for key in ("diag", "res_diag"):  # the bootstrap does not depend on sharding either
        cols = ["cka", "ci_low", "ci_high"]
        np.testing.assert_allclose(dd[key][cols].to_numpy(), single[key][cols].to_numpy(), rtol=0, atol=1e-9)
    assert dd["attrs"]["n_samples"] == single["attrs"]["n_samples"] == 46
    assert dd["attrs"]["skipped_samples"] == single["attrs"]["skipped_samples"] == 3
    cols = ["mean", "std", "frac_zero", "n_values"]
    np.testing.assert_allclose(
        dd["acts"][cols].to_numpy(float), single["acts"][cols].to_numpy(float), rtol=1e-12, atol=1e-12
    )
