import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tunelens.analysis import aggregate_intruders, intruder_control, intruder_dimensions


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 48), nn.Linear(48, 10))


def _orthonormal(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, cols, generator=g, dtype=torch.float64))
    return q


def _constructed(sigmas: list[float]) -> tuple[dict, dict]:
    """Base: rank 10 in R^40 x R^30 with singular values 5..1. Tuned: plus sigma_j u_j v_j^T with u_j, v_j
    orthogonal to the base's column and row spaces (so they are exact singular pairs of the tuned matrix)."""
    r, q = 10, len(sigmas)
    u = _orthonormal(40, r + q, 0)
    v = _orthonormal(30, r + q, 1)
    s = torch.linspace(5, 1, r, dtype=torch.float64)
    w0 = u[:, :r] @ torch.diag(s) @ v[:, :r].T
    upd = sum(sig * torch.outer(u[:, r + j], v[:, r + j]) for j, sig in enumerate(sigmas))
    return {"w": w0}, {"w": w0 + upd}


def test_base_against_itself_has_no_intruders():
    m = _model()
    df = intruder_dimensions(m, copy.deepcopy(m))
    assert list(df["layer"]) == ["0.weight", "3.weight", "4.weight"]
    assert list(df["shape"]) == ["16x3x3x3", "48x64", "10x48"]
    assert (df["intruders"] == 0).all()
    np.testing.assert_allclose(df["min_max_cos"], 1.0, atol=1e-8)
    assert list(df["k"]) == [10, 10, 10]
    assert list(df["stage"]) == ["0", "3", "4"]


def test_tiny_noise_gives_no_intruders():
    m = _model()
    t = copy.deepcopy(m)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(1e-6 * p.norm() / p.numel() ** 0.5 * torch.randn_like(p))
    df = intruder_dimensions(m, t)
    assert (df["intruders"] == 0).all()
    assert df["min_max_cos"].min() > 0.99


@pytest.mark.parametrize("sigmas", [[10.0], [10.0, 8.0], [12.0, 9.0, 7.0]])
def test_new_orthogonal_directions_are_counted_exactly(sigmas):
    base, tuned = _constructed(sigmas)
    row = intruder_dimensions(base, tuned, k=10).iloc[0]
    assert row["intruders"] == len(sigmas)
    assert row["k"] == 10
    assert row["min_max_cos"] < 1e-8  # orthogonal to every direction of the base
    base_row = intruder_dimensions(base, base, k=10).iloc[0]
    assert base_row["intruders"] == 0


def test_only_top_k_directions_count():
    base, tuned = _constructed([0.5])  # a new direction, but the smallest singular value of the tuned matrix
    assert intruder_dimensions(base, tuned, k=5).iloc[0]["intruders"] == 0
    row = intruder_dimensions(base, tuned, k=20).iloc[0]
    assert row["k"] == 11  # min(k, rank): 10 base directions + 1 new one
    assert row["intruders"] == 1


def test_lora_like_small_update_has_no_intruders():
    torch.manual_seed(0)
    base = nn.Linear(128, 64)
    tuned = copy.deepcopy(base)
    w = base.weight.detach()
    b, a = torch.randn(64, 4), torch.randn(4, 128)
    upd = b @ a
    with torch.no_grad():
        tuned.weight.add_(upd * (1e-3 * torch.linalg.matrix_norm(w, 2) / torch.linalg.matrix_norm(upd, 2)))
    df = intruder_dimensions(base, tuned, k=10)
    assert df.iloc[0]["intruders"] == 0
    ctl = intruder_control(base, like=tuned, k=10)
    assert ctl.iloc[0]["perturbation"] == pytest.approx(float((tuned.weight - base.weight).detach().double().norm()))


def test_models_are_not_touched():
    base, tuned = _model(0), _model(1)
    base.train()
    tuned.eval()
    tuned[3].weight.requires_grad_(False)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (base, tuned)]
    intruder_dimensions(base, tuned, k=5)
    intruder_control(base, like=tuned, k=5)
    assert base.training and not tuned.training
    assert not tuned[3].weight.requires_grad and base[3].weight.requires_grad
    for m, b in zip((base, tuned), before, strict=True):
        for k, v in m.state_dict().items():
            assert v.device.type == "cpu"
            assert torch.equal(v, b[k])


def test_control_matches_update_norm_and_is_seeded():
    base = _model(0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[3].weight.add_(0.1)
    c1 = intruder_control(base, like=tuned, k=5, seed=3)
    c2 = intruder_control(base, like=tuned, k=5, seed=3)
    assert c1.equals(c2)
    c1 = c1.set_index("layer")
    assert c1.loc["3.weight", "perturbation"] == pytest.approx(0.1 * (48 * 64) ** 0.5, rel=1e-6)
    assert c1.loc["0.weight", "perturbation"] == 0.0
    assert c1.loc["0.weight", "intruders"] == 0


def test_layers_selection_and_aggregate():
    base, tuned = _model(0), _model(1)
    df = intruder_dimensions(base, tuned, k=4, layers=["3", "4.weight"])
    assert list(df["layer"]) == ["3.weight", "4.weight"]
    with pytest.raises(ValueError, match="nope"):
        intruder_dimensions(base, tuned, layers=["nope"])
    full = intruder_dimensions(base, tuned, k=4)
    agg = aggregate_intruders(full)
    assert list(agg["stage"]) == ["0", "3", "4"]
    assert agg["intruders"].sum() == full["intruders"].sum()
    assert (agg["k"] == 4).all()
    assert agg["intruder_share"].between(0, 1).all()
    # two unrelated random models: most top directions are intruders
    assert full["intruders"].sum() > 0


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (12, 12)])
def test_gram_singular_vectors_span_what_an_svd_gives(shape):
    """The Gram-eigh shortcut gives the SVD's left singular vectors (up to sign), also rank-deficient ones."""
    from tunelens.analysis.measures.intruders import _left_vectors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w[:, 0] = 0.0
    w = w @ torch.diag(torch.linspace(1.0, 3.0, shape[1], dtype=torch.float64))
    low = torch.randn(shape[0], 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, shape[1], generator=g, dtype=torch.float64
    )
    eps = float(torch.finfo(torch.float32).eps)
    for m in (w, low):
        u_ref, s, _ = torch.linalg.svd(m, full_matrices=False)
        rank = int((s > max(m.shape) * eps * s[0]).sum())
        u = _left_vectors(m, eps)
        assert u.shape == (m.shape[0], rank)
        cos = (u.T @ u_ref[:, :rank]).abs().diagonal()
        assert torch.allclose(cos, torch.ones(rank, dtype=torch.float64), atol=1e-8)


def test_a_shared_cache_gives_the_same_counts():
    base, tuned = _constructed([10.0, 8.0])
    cache: dict = {}
    plain = intruder_dimensions(base, tuned, k=10)
    cached = intruder_dimensions(base, tuned, k=10, cache=cache)
    assert len(cache) == 1
    control = intruder_control(base, like=tuned, k=10, seed=3, cache=cache)
    assert len(cache) == 1  # the base was decomposed once
    pd.testing.assert_frame_equal(plain, cached)
    pd.testing.assert_frame_equal(control, intruder_control(base, like=tuned, k=10, seed=3))
    other = {"w": base["w"] * 2.0}
    intruder_dimensions(other, tuned, k=10, cache=cache)
    assert len(cache) == 2  # another base tensor is not read from the cache


def test_randomized_top_k_above_the_exact_size():
    """Above ``exact_max_numel`` the tuned matrix's top-k and the base's top ``base_k`` left singular vectors come
    from the randomized SVD (tensor_measures); on a rank-10 base with 3 constructed intruders the counts and
    max-cosines agree with the exact ones, and the table names the method."""
    from tunelens.analysis.measures.intruders import intruder_row

    base, tuned = _constructed([12.0, 9.0, 7.0])
    w0, w1 = base["w"], tuned["w"]
    cpu = torch.device("cpu")
    exact = intruder_row("w", w0, w1, 10, 0.5, cpu)
    top = intruder_row("w", w0, w1, 10, 0.5, cpu, exact_max_numel=100, base_k=10)
    assert (exact["method"], top["method"]) == ("exact", "top-10")
    assert exact["intruders"] == top["intruders"] == 3
    assert top["min_max_cos"] == pytest.approx(exact["min_max_cos"], abs=1e-4)
    assert top["mean_max_cos"] == pytest.approx(exact["mean_max_cos"], abs=1e-4)
    df = intruder_dimensions(_model(), _model(1), exact_max_numel=100)
    assert list(df["method"]) == ["top-16", "top-32", "top-10"]  # top-32, or all the directions a side has
    assert list(intruder_dimensions(_model(), _model(1))["method"]) == ["exact"] * 3
