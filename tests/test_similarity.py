"""CKA against plain numpy float64 references (Kornblith 2019 feature-space formula, Song 2012 explicit
unbiased HSIC), invariances, estimator bias, and the pitfalls of existing CKA packages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tunelens.analysis.measures.cka import StreamingCKA, estimator_name, linear_cka
from tunelens.analysis.measures.cka_models import cka_against_chance, cka_matrix, randomly_initialised
from tunelens.analysis.measures.layers import iterate_features, iterate_pair, resolve_layers
from tunelens.finetune.models import build_model

# ---------------------------------------------------------------- references (plain numpy, float64)


def ref_cka_biased(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al. 2019, eq. in feature space: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred."""
    X = X.reshape(len(X), -1).astype(np.float64)
    Y = Y.reshape(len(Y), -1).astype(np.float64)
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, the explicit formula: [tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1]/(n(n-3))."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    return (
        np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def ref_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    """Gretton et al. 2005: tr(K H L H) / (n-1)^2."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def gram(X: np.ndarray) -> np.ndarray:
    X = X.reshape(len(X), -1).astype(np.float64)
    return X @ X.T


def ref_cka_unbiased(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = gram(X), gram(Y)
    return ref_hsic_unbiased(K, L) / np.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


def ref_minibatch(xs: list[np.ndarray], ys: list[np.ndarray], hsic=ref_hsic_unbiased) -> float:
    """Nguyen, Raghu and Kornblith 2021: sum_b HSIC(K_b, L_b) / sqrt(sum_b HSIC(K_b,K_b) sum_b HSIC(L_b,L_b))."""
    kl = kk = ll = 0.0
    for x, y in zip(xs, ys, strict=False):
        K, L = gram(x), gram(y)
        kl += hsic(K, L)
        kk += hsic(K, K)
        ll += hsic(L, L)
    return kl / np.sqrt(kk * ll)


def rand_feats(rng, n, *shape, relu=False):
    x = rng.standard_normal((n, *shape)) + 0.3
    return np.maximum(x, 0) if relu else x


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---------------------------------------------------------------- linear_cka


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_reference(debiased):
    rng = np.random.default_rng(0)
    for n, p, q in ((40, 7, 5), (20, 60, 30), (30, 4, 90)):  # feature-space and Gram-space branches
        X = rand_feats(rng, n, p, relu=True)
        Y = X @ rng.standard_normal((p, q)) + 0.5 * rng.standard_normal((n, q))
        ref = ref_cka_unbiased(X, Y) if debiased else ref_cka_biased(X, Y)
        for args, tol in (
            ((X, Y), 1e-12),
            ((torch.from_numpy(X), torch.from_numpy(Y)), 1e-12),
            ((X.astype(np.float32), Y), 1e-6),
        ):
            got = linear_cka(*args, debiased=debiased)
            assert got == pytest.approx(ref, abs=tol)
        assert type(got) is float and ("unbiased" in estimator_name(debiased)) == debiased


def test_linear_cka_flattens_conv_features():
    rng = np.random.default_rng(1)
    X, Y = rand_feats(rng, 12, 3, 4, 4, relu=True), rand_feats(rng, 12, 2, 5, 5)
    assert linear_cka(X, Y) == pytest.approx(ref_cka_biased(X, Y), abs=1e-12)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(ref_cka_unbiased(X, Y), abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    rng = np.random.default_rng(2)
    X = rand_feats(rng, 50, 10, relu=True)
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X @ Q, debiased) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, 37.5 * X, debiased) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, 0.01 * X @ Q + 0, debiased) == pytest.approx(1.0, abs=1e-6)
    A = Q @ np.diag(np.logspace(0, 2, 10)) @ np.linalg.qr(rng.standard_normal((10, 10)))[0]  # invertible
    assert abs(np.linalg.det(A)) > 1e-6
    assert abs(linear_cka(X, X @ A, debiased) - 1.0) > 1e-2
    # translation of the features changes nothing (centring)
    assert linear_cka(X, X + 5.0, debiased) == pytest.approx(1.0, abs=1e-9)


def test_linear_cka_nan_with_reason_and_small_n():
    X = np.ones((10, 3))
    Y = np.random.default_rng(3).standard_normal((10, 4))
    with pytest.warns(RuntimeWarning, match="constant"):
        v = linear_cka(X, Y, debiased=True)
    assert np.isnan(v)
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(Y[:3], Y[:3], debiased=True)
    with pytest.raises(ValueError, match="same number"):
        linear_cka(Y, Y[:5])


# ---------------------------------------------------------------- StreamingCKA


def _batches(seed=0, sizes=(16, 16, 9, 4)):
    rng = np.random.default_rng(seed)
    fa, fb = [], []
    for n in sizes:
        a1 = rand_feats(rng, n, 4, 3, 3, relu=True)
        a2 = rand_feats(rng, n, 6)
        fa.append({"conv": a1, "fc": a2})
        b = a1.reshape(n, -1) @ rng.standard_normal((36, 8))
        fb.append({"x": np.maximum(b, 0), "y": rng.standard_normal((n, 5)), "z": a2[:, :3] * 2})
    return fa, fb


@pytest.mark.parametrize("debiased", [True, False])
def test_streaming_equals_reference_minibatch(debiased):
    fa, fb = _batches()
    m = StreamingCKA(debiased=debiased)
    for a, b in zip(fa, fb, strict=False):
        m.update({k: torch.from_numpy(v) for k, v in a.items()}, {k: torch.from_numpy(v) for k, v in b.items()})
    ab, aa, bb = m.compute_all()
    hsic = ref_hsic_unbiased if debiased else ref_hsic_biased
    assert list(ab.index) == ["conv", "fc"] and list(ab.columns) == ["x", "y", "z"]
    for ka in ("conv", "fc"):
        for kb in ("x", "y", "z"):
            ref = ref_minibatch([a[ka] for a in fa], [b[kb] for b in fb], hsic)
            assert ab.loc[ka, kb] == pytest.approx(ref, abs=1e-9)
        assert aa.loc[ka, "conv"] == pytest.approx(
            ref_minibatch([a[ka] for a in fa], [a["conv"] for a in fa], hsic), abs=1e-9
        )
    assert bb.loc["y", "z"] == pytest.approx(ref_minibatch([b["y"] for b in fb], [b["z"] for b in fb], hsic), abs=1e-9)
    assert np.allclose(np.diag(aa), 1.0, atol=1e-12) and np.allclose(aa, aa.T, atol=1e-14)
    assert m.summary()["estimator"] == m.estimator and ("unbiased" in m.estimator) == debiased
    assert m.summary()["n_samples"] == 45 and m.summary()["n_batches"] == 4
    # reset forgets everything; compute() is repeatable
    assert m.compute().equals(ab)
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


def test_streaming_single_batch_equals_linear_cka():
    fa, fb = _batches(sizes=(30,))
    m = StreamingCKA()
    m.update(fa[0], fb[0])  # numpy arrays are accepted too
    assert m.compute().loc["conv", "x"] == pytest.approx(
        linear_cka(fa[0]["conv"], fb[0]["x"], debiased=True), abs=1e-12
    )


def test_independent_data_unbiased_near_zero_biased_not():
    rng = np.random.default_rng(5)
    unb, bia = StreamingCKA(debiased=True), StreamingCKA(debiased=False)
    for _ in range(200):
        a = {"a": torch.from_numpy(rand_feats(rng, 16, 64, relu=True))}
        b = {"b": torch.from_numpy(rand_feats(rng, 16, 32, relu=True))}
        unb.update(a, b)
        bia.update(a, b)
    u, bi = float(unb.compute().iloc[0, 0]), float(bia.compute().iloc[0, 0])
    assert abs(u) < 0.03, u
    assert bi > 0.3, bi
    assert "biased HSIC_0" in (bia.compute(), bia.summary())[1]["estimator"]


def test_negative_estimates_stay():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal((8, 5)) for _ in range(3)]
        ys = [rng.standard_normal((8, 5)) for _ in range(3)]
        ref = ref_minibatch(xs, ys)
        if ref < -0.01:
            break
    else:
        pytest.fail("no negative reference found")
    m = StreamingCKA()
    for x, y in zip(xs, ys, strict=False):
        m.update({"x": x}, {"y": y})
    assert m.compute().iloc[0, 0] == pytest.approx(ref, abs=1e-12) and ref < 0


def test_small_batches_skipped_and_counted():
    fa, fb = _batches(sizes=(8, 3, 8))
    m = StreamingCKA()
    with pytest.warns(RuntimeWarning, match="n >= 4"):
        for a, b in zip(fa, fb, strict=False):
            m.update(a, b)
    ab = m.compute()
    info = m.summary()
    assert info["skipped_samples"] == 3 and info["skipped_batches"] == 1 and info["n_samples"] == 16
    ref = ref_minibatch([fa[0]["fc"], fa[2]["fc"]], [fb[0]["y"], fb[2]["y"]])
    assert ab.loc["fc", "y"] == pytest.approx(ref, abs=1e-9)
    m2 = StreamingCKA()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2.update(fa[1], fb[1])
    with pytest.raises(ValueError, match="no batch had at least 4"):
        m2.compute()


def test_constant_layer_gives_nan_with_reason():
    rng = np.random.default_rng(7)
    m = StreamingCKA()
    for _ in range(3):
        x = rng.standard_normal((10, 6))
        m.update({"ok": x, "dead": np.zeros((10, 6)) + 0.0 * x, "const": np.full((10, 4), 3.0)}, {"y": x[:, :2]})
    with pytest.warns(RuntimeWarning, match="self-HSIC"):
        ab = m.compute()
    assert np.isnan(ab.loc["dead", "y"]) and np.isnan(ab.loc["const", "y"])
    assert np.isfinite(ab.loc["ok", "y"])
    assert set(m.summary()["nan_reasons"]) == {"A:dead", "A:const"}


def test_bootstrap_ci_and_order_invariance():
    fa, fb = _batches(sizes=(10,) * 12)
    fb = [{"conv": b["x"], "fc": b["z"]} for b in fb]
    m, r = StreamingCKA(), StreamingCKA()
    for a, b in zip(fa, fb, strict=False):
        m.update(a, b)
    for a, b in list(zip(fa, fb, strict=False))[::-1]:
        r.update(a, b)
    d, dr = m.bootstrap_diagonal(n_boot=500, seed=3), r.bootstrap_diagonal(n_boot=500, seed=3)
    assert list(d.layer_a) == ["conv", "fc"] and (d.ci_low <= d.cka).all() and (d.cka <= d.ci_high).all()
    assert np.allclose(d[["cka", "ci_low", "ci_high"]], dr[["cka", "ci_low", "ci_high"]], atol=1e-12)
    assert (d.estimator == m.estimator).all()


# ---------------------------------------------------------------- on models


def _loader(n=48, size=32, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.zeros(n, dtype=torch.long)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_cka_matrix_equals_streaming_on_copied_features():
    a, b = build_model("tiny_resnet", 6, seed=0), build_model("tiny_resnet", 10, seed=1)  # different heads
    a.train()
    b.eval()
    loader = _loader()
    res = cka_matrix(a, b, loader, device="cpu", n_boot=200)
    assert a.training and not b.training and _no_hooks(a) and _no_hooks(b)
    la, lb = resolve_layers(a), resolve_layers(b)
    assert list(res.ab.index) == la and list(res.ab.columns) == lb and res.ab.shape == (7, 7)
    ref = StreamingCKA()
    for fa, fb, _, _ in iterate_pair(a, b, loader, la, lb):
        ref.update(fa, fb)
    rab, raa, rbb = ref.compute_all()
    assert np.allclose(res.ab, rab, atol=1e-9) and np.allclose(res.aa, raa, atol=1e-9)
    assert np.allclose(res.bb, rbb, atol=1e-9)
    assert np.isfinite(res.ab.loc["fc", "fc"])
    assert res.n_samples == 48 and "unbiased" in res.estimator
    assert list(res.diagonal.layer_a) == la and (res.diagonal.estimator == res.estimator).all()
    # activation statistics from the same pass equal numpy on copies
    feats = {k: [] for k in la}
    for f, _, _ in iterate_features(a, loader, la):
        for k in la:
            feats[k].append(f[k].double().numpy().ravel())
    st = res.activations.set_index(["model", "layer"])
    for k in la:
        v = np.concatenate(feats[k])
        assert st.loc[("base", k), "mean"] == pytest.approx(v.mean(), abs=1e-9)
        assert st.loc[("base", k), "std"] == pytest.approx(v.std(), abs=1e-9)
        assert st.loc[("base", k), "frac_zero"] == pytest.approx((v == 0).mean(), abs=1e-12)
    assert st.loc[("base", "layer1"), "frac_zero"] > 0.1  # post-ReLU
    # feature maps of a few example images, strongest channels side by side
    ch, maps = res.maps_a.strongest("layer2", k=3)
    chb, _mapsb = res.maps_b.strongest("layer2", k=3, reference=res.maps_a)
    assert maps.shape == (4, 3, 16, 16) and (chb == ch).all() and res.maps_a.images.shape == (4, 3, 32, 32)
    s = res.maps_a.strengths("layer2")
    assert (np.take_along_axis(s, ch, 1)[:, 0] == s.max(1)).all()
    fig = res.plot_feature_maps("layer2", k=2, path=None)
    assert len(fig.axes) == 4 * 5
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_same_model_diagonal_is_one_and_type_layers():
    a = build_model("tiny_resnet", 6, seed=0)
    b = build_model("tiny_resnet", 6, seed=0)
    res = cka_matrix(a, b, _loader(n=32), layers=nn.BatchNorm2d, device="cpu", n_examples=0)
    assert np.allclose(np.diag(res.ab), 1.0, atol=1e-12) and "bn1" in res.ab.index
    self_res = cka_matrix(a, a, _loader(n=32), device="cpu", n_examples=0)  # one model, run once per batch
    assert np.allclose(self_res.ab, self_res.aa, atol=1e-12) and _no_hooks(a)


def test_inplace_relu_pitfall_on_resnet18():
    a, b = build_model("resnet18", 10, seed=0), build_model("resnet18", 10, seed=1)
    loader = _loader(n=24, bs=8)
    res = cka_matrix(a, b, loader, layers=["bn1"], device="cpu", n_examples=0)
    # what a hook that keeps `out.detach()` sees: overwritten by the in-place ReLU that follows bn1
    seen = {}
    h = a.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn1", o.detach()))
    a.eval(), b.eval()
    with torch.no_grad():
        x0 = next(iter(loader))[0]
        a(x0)
        h.remove()
        true_bn1 = a.bn1(a.conv1(x0))
    assert torch.equal(seen["bn1"], torch.relu(true_bn1)) and (true_bn1 < 0).any()
    xs, ys, rs, ss = [], [], [], []
    with torch.no_grad():
        for x, _ in loader:
            fa, fb = a.bn1(a.conv1(x)).numpy(), b.bn1(b.conv1(x)).numpy()
            xs.append(fa), ys.append(fb), rs.append(np.maximum(fa, 0)), ss.append(np.maximum(fb, 0))
    assert res.ab.loc["bn1", "bn1"] == pytest.approx(ref_minibatch(xs, ys), abs=1e-9)
    assert abs(res.ab.loc["bn1", "bn1"] - ref_minibatch(rs, ss)) > 1e-3
    assert res.activations.query("layer == 'bn1'").frac_zero.max() < 0.01  # pre-ReLU: no zeros


def test_double_firing_module_and_loose_names_refused():
    a, b = build_model("resnet18", 10, seed=0), build_model("resnet18", 10, seed=1)
    a.train()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        cka_matrix(a, b, _loader(n=8, bs=8), layers=["layer1.0.relu"], layers_tuned=["layer1"], device="cpu")
    assert _no_hooks(a) and _no_hooks(b) and a.training
    assert resolve_layers(a, ["conv1"]) == ["conv1"]  # exactly one module, not every block's conv1
    with pytest.raises(ValueError, match="Close matches"):
        cka_matrix(a, b, _loader(n=8), layers=["layer1.conv1"], device="cpu")


def test_cka_against_chance_table():
    base, tuned = build_model("tiny_resnet", 6, seed=0), build_model("tiny_resnet", 6, seed=1)
    t = cka_against_chance(base, tuned, _loader(n=64), device="cpu", n_boot=200, seed=4)
    assert list(t.columns) == [
        "layer",
        "cka_base_tuned",
        "ci_low",
        "ci_high",
        "cka_base_random",
        "cka_tuned_scratch",
        "estimator",
    ]
    assert t.cka_tuned_scratch.isna().all() and t.cka_base_random.notna().all()
    assert (t.ci_low <= t.cka_base_tuned).all() and (t.cka_base_tuned <= t.ci_high).all()
    state = torch.random.get_rng_state()
    rnd = randomly_initialised(base, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert not torch.equal(rnd.conv1.weight, base.conv1.weight)
    assert torch.equal(rnd.conv1.weight, randomly_initialised(base, seed=4).conv1.weight)
    scratch = build_model("tiny_resnet", 6, seed=2)
    t2 = cka_against_chance(
        base, tuned, _loader(n=64), random_model=rnd, scratch=scratch, device="cpu", n_boot=200, seed=4
    )
    assert np.allclose(t2.cka_base_random, t.cka_base_random, atol=1e-12) and t2.cka_tuned_scratch.notna().all()
    direct = cka_matrix(tuned, scratch, _loader(n=64), device="cpu", n_examples=0, n_boot=10).ab
    assert np.allclose(t2.cka_tuned_scratch, np.diag(direct), atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    fa, fb = _batches()
    cpu, gpu = StreamingCKA(), StreamingCKA()
    for a, b in zip(fa, fb, strict=False):
        cpu.update(a, b)
        gpu.update(
            {k: torch.from_numpy(v).cuda() for k, v in a.items()}, {k: torch.from_numpy(v).cuda() for k, v in b.items()}
        )
    assert np.allclose(cpu.compute(), gpu.compute(), atol=1e-9)
    a, b = build_model("tiny_resnet", 6, seed=0), build_model("tiny_resnet", 6, seed=1)
    rc = cka_matrix(a, b, _loader(), device="cpu", n_boot=50)
    rg = cka_matrix(a, b, _loader(), device="cuda", n_boot=50)
    assert np.allclose(rc.ab, rg.ab, atol=1e-4) and np.allclose(rc.diagonal.cka, rg.diagonal.cka, atol=1e-4)
    assert np.allclose(
        rc.activations[["mean", "std", "frac_zero"]], rg.activations[["mean", "std", "frac_zero"]], atol=1e-4
    )
