import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from tunelens.analysis.measures.weights import ArchitectureMismatch, aggregate_deltas, first_conv_filters, weight_deltas


def _pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 4))
    b = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def test_hand_computed_linear():
    a = nn.Linear(2, 2, bias=True)
    b = nn.Linear(2, 2, bias=True)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        b.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]) + torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        a.bias.copy_(torch.tensor([1.0, 0.0]))
        b.bias.copy_(torch.tensor([0.0, 1.0]))
    df = weight_deltas(a, b).set_index("name")
    w = df.loc["weight"]
    # dW = diag(2, 1): ||dW||_F = sqrt(5), ||W0||_F = 5, singular values 2 and 1
    assert w["frobenius"] == pytest.approx(math.sqrt(5))
    assert w["relative"] == pytest.approx(math.sqrt(5) / 5)
    assert w["cosine"] == pytest.approx((3 * 5 + 4 * 5) / (5 * math.sqrt(50)))
    assert w["max_abs"] == pytest.approx(2.0)
    assert w["spectral"] == pytest.approx(2.0)
    assert w["stable_rank"] == pytest.approx(5 / 4)
    p = np.array([2 / 3, 1 / 3])
    assert w["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert w["top1_energy"] == pytest.approx(4 / 5)
    bi = df.loc["bias"]
    assert bi["kind"] == "bias"
    assert bi["frobenius"] == pytest.approx(math.sqrt(2))
    assert bi["cosine"] == pytest.approx(0.0)
    assert math.isnan(bi["spectral"])  # matrix quantities are undefined for vectors


def test_conv_reshaped_and_rank_one_delta():
    a, b = _pair()
    u = torch.tensor([1.0, 2.0, 0.0])
    v = torch.randn(2 * 3 * 3)
    with torch.no_grad():
        b[0].weight.add_((u[:, None] * v[None, :]).reshape(3, 2, 3, 3))
    row = weight_deltas(a, b).set_index("name").loc["0.weight"]
    assert row["shape"] == "3x2x3x3"
    assert row["stable_rank"] == pytest.approx(1.0)
    assert row["top1_energy"] == pytest.approx(1.0)
    assert row["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert row["spectral"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)


def test_identical_models_give_zero_and_cosine_one():
    a, b = _pair()
    df = weight_deltas(a, b)
    comp = df[df["status"] == "compared"]
    assert (comp["frobenius"] == 0).all() and (comp["relative"] == 0).all()
    nz = comp[comp["norm_base"] > 0]
    assert np.allclose(nz["cosine"], 1.0)
    st = aggregate_deltas(df)
    assert (st["relative"].fillna(0) == 0).all()


def test_bn_running_stats_get_rows():
    a, b = _pair()
    b[1].running_mean.add_(torch.tensor([3.0, 0.0, 4.0]))
    df = weight_deltas(a, b).set_index("name")
    assert df.loc["1.running_mean", "kind"] == "bn_stat"
    assert df.loc["1.running_mean", "frobenius"] == pytest.approx(5.0)
    assert "1.num_batches_tracked" not in df.index


def test_replaced_head_is_reported_not_compared():
    a, b = _pair()
    b[3] = nn.Linear(3, 7)
    df = weight_deltas(a, b).set_index("name")
    assert df.loc["3.weight", "status"] == "replaced"
    assert df.loc["3.weight", "shape"] == "4x3 -> 7x3"
    assert math.isnan(df.loc["3.weight", "frobenius"])
    assert df.loc["0.weight", "status"] == "compared"


def test_state_dicts_and_mismatch_error():
    a, b = _pair()
    df = weight_deltas(a.state_dict(), b.state_dict())
    assert (df[df.status == "compared"]["frobenius"] == 0).all()
    c = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 4))
    with pytest.raises(ArchitectureMismatch, match=r"1.weight"):
        weight_deltas(a, c)


def test_aggregate_is_norm_ratio():
    a, b = _pair()
    with torch.no_grad():
        b[0].weight.add_(1.0)
    df = weight_deltas(a, b)
    df["stage"] = "all"
    st = aggregate_deltas(df).iloc[0]
    c = df[(df.status == "compared") & (df.kind != "bn_stat")]
    assert st["relative"] == pytest.approx(np.sqrt((c.frobenius**2).sum()) / np.sqrt((c.norm_base**2).sum()))


def test_first_conv_filters():
    a, b = _pair()
    with torch.no_grad():
        b[0].weight.mul_(2)
    f = first_conv_filters(a, b)
    assert f["name"] == "0.weight"
    np.testing.assert_allclose(f["delta"], a[0].weight.detach().numpy(), rtol=1e-6)


# ---- against a plain float64 SVD, and invariants ----


def _reference_row(w0: torch.Tensor, w1: torch.Tensor) -> dict[str, float]:
    """The module docstring's formulas, computed the straightforward way in float64."""
    a, b = w0.double(), w1.double()
    d = b - a
    m = d.reshape(d.shape[0], -1)
    s = torch.linalg.svd(m, full_matrices=False).S
    p = s / s.sum()
    p = p[p > 0]
    return {
        "norm_base": float(a.norm()),
        "frobenius": float(d.norm()),
        "relative": float(d.norm() / a.norm()),
        "cosine": float((a * b).sum() / (a.norm() * b.norm())),
        "max_abs": float(d.abs().max()),
        "spectral": float(s[0]),
        "stable_rank": float((s**2).sum() / s[0] ** 2),
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "top1_energy": float(s[0] ** 2 / (s**2).sum()),
    }


def _random_layers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = nn.Sequential(
        nn.Conv2d(3, 16, 3),  # 16 x 27
        nn.Conv2d(16, 32, 3),  # 32 x 144
        nn.Conv2d(32, 32, 1),  # square 32 x 32
        nn.Flatten(),
        nn.Linear(256, 96),  # 96 x 256, wide: float32 Gram path (n >= 64)
        nn.Linear(96, 200),  # 200 x 96, tall
        nn.Linear(200, 200),  # square: deep tail, float64 path
    )
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p) * p.std())
    return a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_svd_reference(seed):
    a, b = _random_layers(seed)
    df = weight_deltas(a, b).set_index("name")
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:
        got = df.loc[name]
        ref = _reference_row(sa[name], sb[name])
        for col in ("norm_base", "frobenius", "relative", "cosine", "max_abs"):
            assert got[col] == pytest.approx(ref[col], rel=1e-6, abs=1e-12), (name, col)
        if sa[name].ndim >= 2:
            for col in ("spectral", "stable_rank", "effective_rank", "top1_energy"):
                assert got[col] == pytest.approx(ref[col], rel=1e-4), (name, col)
        else:
            assert math.isnan(got["spectral"])


def test_low_rank_delta_matches_reference():
    """A rank-3 update of a 300 x 128 weight: the deep tail takes the float64 SVD path."""
    torch.manual_seed(3)
    a = nn.Linear(128, 300, bias=False)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.weight.add_(torch.randn(300, 3) @ torch.randn(3, 128) * 1e-2)
    got = weight_deltas(a, b).iloc[0]
    ref = _reference_row(a.weight.detach(), b.weight.detach())
    for col in ("spectral", "stable_rank", "top1_energy"):
        assert got[col] == pytest.approx(ref[col], rel=1e-6)
    assert got["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-4)
    assert got["effective_rank"] < 3.01


def test_identical_random_layers_zero_deltas():
    a, _ = _random_layers()
    df = weight_deltas(a, copy.deepcopy(a))
    assert (df["frobenius"] == 0).all() and (df["relative"] == 0).all() and (df["max_abs"] == 0).all()
    np.testing.assert_allclose(df["cosine"], 1.0, rtol=0, atol=1e-12)
    w = df[df["kind"] == "weight"]
    assert (w["spectral"] == 0).all() and w["effective_rank"].isna().all()


def test_doubled_weights_relative_one_cosine_one():
    a, _ = _random_layers()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(2)
    df = weight_deltas(a, b)
    np.testing.assert_allclose(df["relative"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(df["cosine"], 1.0, rtol=0, atol=1e-12)
    # dW = W0: the delta's spectrum is the base's own
    sa = a.state_dict()
    for _, row in df[df["kind"] == "weight"].iterrows():
        s = torch.linalg.svdvals(sa[row["name"]].double().reshape(sa[row["name"]].shape[0], -1))
        assert row["spectral"] == pytest.approx(float(s[0]), rel=1e-5)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (300, 100), (100, 300)])
def test_rank_one_update_stable_and_effective_rank_one(shape):
    torch.manual_seed(0)
    u = torch.randn(shape[0], dtype=torch.float64)
    v = torch.randn(int(np.prod(shape[1:])), dtype=torch.float64)
    upd = (u[:, None] * v[None, :]).reshape(shape) * 1e-2
    # float64: dW is rank one up to ~1e-16 (in float32, W1 - W0 carries rounding noise of rank > 1)
    w0 = torch.randn(shape, dtype=torch.float64)
    row = weight_deltas({"w": w0}, {"w": w0 + upd}).iloc[0]
    assert row["stable_rank"] == pytest.approx(1.0, abs=1e-6)
    assert row["top1_energy"] == pytest.approx(1.0, abs=1e-6)
    assert row["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert row["spectral"] == pytest.approx(float(u.norm() * v.norm()) * 1e-2, rel=1e-6)
    # float32: same numbers as a float64 SVD of the rounded delta, effective rank ~1
    w0, w1 = w0.float(), w0.float() + upd.float()
    row = weight_deltas({"w": w0}, {"w": w1}).iloc[0]
    ref = _reference_row(w0, w1)
    for col in ("spectral", "stable_rank", "effective_rank", "top1_energy"):
        assert row[col] == pytest.approx(ref[col], rel=1e-6), col
    assert row["effective_rank"] == pytest.approx(1.0, abs=1e-3)


def test_threads_restored_and_inputs_untouched():
    a, b = _random_layers()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    sd64 = {k: v.double() for k, v in b.state_dict().items()}
    n = torch.get_num_threads()
    weight_deltas(a.state_dict(), sd64, num_threads=1)
    assert torch.get_num_threads() == n
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.equal(sd64[k], before[k].double())


def test_randomized_spectrum_above_the_exact_size():
    """Above ``exact_max_numel`` the top-32 singular values come from a randomized SVD (tensor_measures), and on a
    rank-3 update they agree with the exact ones; the table says which way each row was computed."""
    torch.manual_seed(3)
    a = nn.Linear(128, 300)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.weight.add_(torch.randn(300, 3) @ torch.randn(3, 128) * 1e-2)
        b.bias.add_(1e-3)
    exact = weight_deltas(a, b, exact_max_numel=None)
    top = weight_deltas(a, b, exact_max_numel=1000)
    w_exact, w_top = exact.iloc[0], top.iloc[0]
    assert (w_exact["rank_method"], w_top["rank_method"]) == ("exact", "top-32")
    assert w_top["spectral"] == pytest.approx(w_exact["spectral"], rel=1e-5)
    assert w_top["stable_rank"] == pytest.approx(w_exact["stable_rank"], rel=1e-4)
    assert w_top["effective_rank"] == pytest.approx(w_exact["effective_rank"], rel=1e-3)
    assert w_top["top1_energy"] == pytest.approx(w_exact["top1_energy"], rel=1e-4)
    assert w_top["frobenius"] == w_exact["frobenius"]  # entry-wise: the same computation
    assert exact.iloc[1]["kind"] == "bias" and not isinstance(exact.iloc[1]["rank_method"], str)
    # the default threshold keeps small models exact (results as before)
    assert (weight_deltas(a, b)["rank_method"].iloc[:1] == "exact").all()
