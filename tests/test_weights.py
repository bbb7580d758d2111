import math

import numpy as np
import pytest
import torch
from torch import nn

from tunelens.analysis.weights import ArchitectureMismatch, aggregate_deltas, first_conv_filters, weight_deltas


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
