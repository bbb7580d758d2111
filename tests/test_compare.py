"""Map comparison, localisation, faithfulness and the attribution study (small and on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tunelens.analysis.measures.attribution.faithfulness import deletion_insertion, gaussian_blur
from tunelens.analysis.measures.attribution.map_metrics import (
    SIMILARITIES,
    compare_maps,
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
    shared_scale,
    spearman_rows,
    ssim,
    to_maps,
    topk_intersection,
)
from tunelens.analysis.measures.attribution.study import (
    AttributionStudy,
    attribution_study,
    bootstrap_ci,
    change_index,
    collect_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def maps() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 3, 12, 12))


def test_identical_maps_give_one(maps):
    df = compare_maps(maps, maps)
    assert len(df) == 5
    for s in SIMILARITIES:
        np.testing.assert_allclose(df[s], 1.0, atol=1e-12, err_msg=s)


def test_negated_maps(maps):
    df = compare_maps(maps, -maps)
    np.testing.assert_allclose(df["spearman"], -1.0, atol=1e-12)
    np.testing.assert_allclose(df["cosine"], -1.0, atol=1e-12)
    # the absolute maps are identical
    np.testing.assert_allclose(df["spearman_abs"], 1.0, atol=1e-12)
    np.testing.assert_allclose(df["ssim"], 1.0, atol=1e-12)


def test_channel_reductions(maps):
    np.testing.assert_allclose(to_maps(maps, "signed"), maps.sum(1))
    np.testing.assert_allclose(to_maps(maps, "abs"), np.abs(maps).sum(1))
    t = torch.from_numpy(maps[:, 0])
    np.testing.assert_allclose(to_maps(t), maps[:, 0])


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    b[:, :10] = 0.0  # ties
    got = spearman_rows(a, b)
    for i in range(3):
        assert got[i] == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-12)
    assert np.isnan(spearman_rows(a[:1], np.zeros((1, 50))))[0]


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    a = np.abs(rng.normal(size=(4, 20, 17)))
    b = np.abs(a + 0.5 * rng.normal(size=a.shape))
    xa, xb = shared_scale(a, b)
    assert max(np.abs(xa[i]).max() for i in range(4)) <= 1.0
    got = ssim(xa, xb, win_size=7, data_range=1.0)
    want = [
        skm.structural_similarity(
            xa[i], xb[i], win_size=7, data_range=1.0, gaussian_weights=False, use_sample_covariance=True
        )
        for i in range(4)
    ]
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_topk_known():
    a = np.arange(10.0)[None]  # top 20%: pixels 9, 8
    b = np.array([[9.0, 8, 0, 0, 0, 0, 0, 0, 1, 0]])  # top 20%: pixels 0, 1 ... and 8 is third
    assert topk_intersection(a, a, 0.2)[0] == 1.0
    assert topk_intersection(a, b, 0.2)[0] == 0.0
    assert topk_intersection(a, b, 0.3)[0] == pytest.approx(1 / 3)


def test_mask_metrics_known():
    m = np.zeros((2, 4, 4), dtype=bool)
    m[:, :2, :2] = True  # 4 pixels in the mask
    r = np.zeros((2, 4, 4))
    r[0, 0, 0], r[0, 3, 3], r[0, 2, 2] = 3.0, 1.0, -5.0  # positive mass 3 in, 1 out; negative ignored
    r[1, 3, 3], r[1, 0, 1] = 2.0, 1.0  # argmax outside, 1 of the top-4 positive in the mask
    np.testing.assert_allclose(relevance_mass(r, m), [0.75, 1 / 3])
    np.testing.assert_allclose(pointing_game(r, m), [1.0, 0.0])
    # top-4 of sample 0: (0,0)=3, (3,3)=1, then zeros in row-major order (0,1), (0,2) -> (0,0), (0,1) in mask
    np.testing.assert_allclose(relevance_rank_accuracy(r, m), [0.5, 0.5])
    # pointing with a tolerance of 2 pixels reaches (3,3) from the mask's corner (1,1)
    assert pointing_game(r[1:], m[1:], tolerance=2)[0] == 1.0
    df = compare_maps(r, r, torch.from_numpy(m), names=("base", "tuned"))
    assert {"mass_base", "mass_tuned", "rank_acc_base", "pointing_tuned"} <= set(df.columns)
    np.testing.assert_allclose(df["mass_base"], [0.75, 1 / 3])


def test_mask_shape_checked():
    with pytest.raises(ValueError, match="masks"):
        relevance_mass(np.ones((2, 4, 4)), np.ones((3, 4, 4), dtype=bool))


def test_bootstrap_and_change_index():
    mean, lo, hi = bootstrap_ci(np.array([1.0, 2.0, 3.0, np.nan]), n_boot=500, seed=0)
    assert mean == 2.0 and 1.0 <= lo <= mean <= hi <= 3.0
    assert change_index(0.5, 0.9, 0.1) == pytest.approx(0.5)
    assert change_index(0.9, 0.9, 0.1) == pytest.approx(0.0)
    assert np.isnan(change_index(0.5, 0.3, 0.3))


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_deletion_insertion_prefers_the_true_map():
    torch.manual_seed(0)
    w = torch.zeros(2, 1 * 8 * 8)
    w[0] = torch.randn(64).abs()
    model = _Linear(w).eval()
    x = torch.rand(6, 1, 8, 8) + 0.5
    true_map = x * w[0].view(1, 1, 8, 8)
    good = deletion_insertion(model, x, true_map, torch.zeros(6, dtype=torch.long), steps=8, blur_sigma=0.0)
    bad = deletion_insertion(model, x, -true_map, torch.zeros(6, dtype=torch.long), steps=8, blur_sigma=0.0)
    assert good["deletion_curve"].shape == (6, 9)
    assert np.all((good["deletion_auc"] >= 0) & (good["deletion_auc"] <= 1))
    assert np.all(good["deletion_auc"] < bad["deletion_auc"])
    # blur_sigma=0: insertion starts from the image itself, so its curve is flat
    np.testing.assert_allclose(good["insertion_curve"], good["insertion_curve"][:, :1].repeat(9, 1), atol=1e-6)


def test_gaussian_blur_keeps_constants():
    x = torch.full((1, 3, 10, 10), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 2.0), x)


def _shapes(n_per_class: int = 2):
    from tunelens.finetune.data import ShapesSpec, make_shapes

    return make_shapes(ShapesSpec(task="target", train_per_class=6, val_per_class=1, test_per_class=n_per_class))


def test_collect_images_from_dataset_and_loader():
    ds = _shapes()["test"]
    x, y, m, idx = collect_images(ds, 5, seed=0)
    assert x.shape == (5, 3, 32, 32) and y.shape == (5,) and m.dtype == torch.bool and len(set(idx)) == 5
    x2, *_ = collect_images(ds, 5, seed=0)
    torch.testing.assert_close(x, x2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x3, _y3, m3, _ = collect_images(loader, 6)
    assert x3.shape[0] == 6 and m3.shape == (6, 32, 32)


def test_study_small_with_probe_head_and_masks():
    from tunelens.finetune.models import build_model

    data = _shapes(2)
    base = build_model("tiny_resnet", 8, seed=0)  # another task's head: a probe head is fitted
    tuned = build_model("tiny_resnet", 6, seed=1)
    res = attribution_study(
        base,
        tuned,
        data["test"],
        methods=("saliency", "smoothgrad", "grad_cam"),
        n_images=8,
        probe_data=data["train"],
        device="cpu",
        n_boot=50,
        faithfulness_steps=4,
        options={"smoothgrad": {"nt_samples": 2}},
    )
    assert isinstance(res, AttributionStudy)
    assert res.probe is not None and any("linear-probe head" in n for n in res.notes)
    assert len(res.comparisons) == 3 * 8
    assert {"spearman_abs", "ceiling_spearman_abs", "floor_ssim", "mass_base", "deletion_tuned"} <= set(
        res.comparisons.columns
    )
    s = res.summary.set_index("method")
    assert list(s.index) == ["saliency", "smoothgrad", "grad_cam"]
    for m in s.index:
        row = s.loc[m]
        assert row["gap"] == pytest.approx(row["ceiling"] - row["floor"])
        assert row["gap_top"] == pytest.approx(row["ceiling"] - row["floor_top"])
        assert row["informative"] == (row["gap"] >= row["threshold"] and row["gap_top"] >= row["threshold"])
        if row["gap"] != 0:
            assert row["change_index"] == pytest.approx((row["ceiling"] - row["ab"]) / row["gap"])
    assert set(res.localisation["metric"]) == {"mass", "rank_acc", "pointing"}
    assert set(res.faithfulness["game"]) == {"deletion", "insertion"}
    assert {"class", "ab", "ab_lo", "change_index", "mass_delta"} <= set(res.per_class.columns)
    ex = res.examples["grad_cam"]
    assert ex.kinds[:2] == ["largest_change", "smallest_change"]
    assert ex.base.shape == (len(ex.kinds), 32, 32) and ex.inputs.shape[1:] == (3, 32, 32)
    assert res.maps["saliency"]["floor"].shape == res.maps["saliency"]["floor_top"].shape == (8, 32, 32)
    assert res.settings["floor_top"].endswith("fc, layer4")
    assert res.timings["total"] > 0


def test_study_without_masks_and_same_heads():
    from tunelens.finetune.models import build_model

    data = _shapes(2)["test"]
    x = data.images[:6]
    y = data.labels[:6]
    model = build_model("tiny_resnet", 6, seed=0)
    before = torch.get_num_threads()
    res = attribution_study(
        model,
        model,
        [(x, y)],
        methods=("saliency",),
        n_images=6,
        device="cpu",
        n_boot=20,
        faithfulness=False,
        threads=2,
    )
    assert res.settings["threads"] == 2 and torch.get_num_threads() == before  # restored
    assert res.localisation is None and res.localisation_note and res.masks is None
    assert res.probe is None
    # the same model on both sides: identical maps
    np.testing.assert_allclose(res.comparisons["spearman"], 1.0)
    row = res.summary.iloc[0]
    assert row["ab"] == pytest.approx(1.0)
    if row["gap"] > 0:
        assert row["change_index"] <= 1e-9


def test_study_needs_probe_data_when_heads_differ():
    from tunelens.finetune.models import build_model

    data = _shapes(1)["test"]
    with pytest.raises(ValueError, match="probe_data"):
        attribution_study(
            build_model("tiny_resnet", 8),
            build_model("tiny_resnet", 6),
            data,
            methods=("saliency",),
            n_images=4,
            device="cpu",
        )
