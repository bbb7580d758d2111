"""The report as a reader sees it: attribution grids without overlaps, long tables collapsed."""

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from tunelens.core.results import Results
from tunelens.reports import figures as fg
from tunelens.reports.render import render_html


def _grid(n: int) -> plt.Figure:
    rng = np.random.default_rng(n)
    inputs = [rng.random((32, 32, 3)) for _ in range(n)]
    base = rng.normal(size=(n, 32, 32))
    tuned = base + 0.3 * rng.normal(size=(n, 32, 32))
    masks = [rng.random((32, 32)) > 0.7 for _ in range(n)]
    labels = [f"most changed\ntrue: class_{i}\nbase: class_{i + 1}\ntuned: class_{i}\nsim 0.{i:02d}" for i in range(n)]
    return fg.attribution_grid(inputs, base, tuned, labels, title="integrated_gradients", masks=masks)


def _overlap(a: Bbox, b: Bbox, tol: float = 0.5) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def _is_cbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None or ax.get_label() == "<colorbar>"


def _texts(fig: plt.Figure):
    """Every visible, non-empty text a reader sees: titles, axis and row labels, colour-bar ticks and labels."""
    seen = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and t not in seen:
            seen.append(t)
    return seen


@pytest.mark.parametrize("n", [1, 3, 12])
def test_attribution_grid_has_no_overlaps(n):
    fig = _grid(n)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        cbars = [ax for ax in fig.axes if _is_cbar(ax)]
        images = [ax for ax in fig.axes if ax.images and ax not in cbars]
        assert len(cbars) == 2, "one colour bar for the shared base/tuned scale, one for the difference"
        assert len(images) == 4 * n
        boxes = {ax: ax.get_window_extent(r) for ax in fig.axes}
        # (a) colour bars sit outside every image panel
        for c in cbars:
            for ax in images:
                assert not _overlap(boxes[c], boxes[ax]), "a colour bar covers an image panel"
        # (b) every image panel has the same pixel size
        ws = [boxes[ax].width for ax in images]
        hs = [boxes[ax].height for ax in images]
        assert max(ws) - min(ws) <= 1 and max(hs) - min(hs) <= 1, (min(ws), max(ws), min(hs), max(hs))
        # no two image panels overlap each other
        for i, a in enumerate(images):
            for b in images[i + 1 :]:
                assert not _overlap(boxes[a], boxes[b])
        # (c) no two texts overlap
        texts = _texts(fig)
        ext = [(t, t.get_window_extent(r)) for t in texts]
        for i, (t1, e1) in enumerate(ext):
            for t2, e2 in ext[i + 1 :]:
                assert not _overlap(e1, e2), f"texts overlap: {t1.get_text()!r} / {t2.get_text()!r}"
            # and no text lies on an image panel
            for ax in images:
                assert not _overlap(e1, boxes[ax]), f"text {t1.get_text()!r} covers an image panel"
        # (d) every axes (and every text) lies inside the figure
        fb = fig.bbox
        for ax, b in boxes.items():
            assert b.x0 >= -0.5 and b.y0 >= -0.5 and b.x1 <= fb.x1 + 0.5 and b.y1 <= fb.y1 + 0.5, ax
        for t, e in ext:
            assert e.x0 >= -0.5 and e.y0 >= -0.5 and e.x1 <= fb.x1 + 0.5 and e.y1 <= fb.y1 + 0.5, t.get_text()
        # only the top row carries column titles
        titled = [ax for ax in images if ax.get_title()]
        assert len(titled) == 4
    finally:
        plt.close(fig)


def test_attribution_grid_keeps_shared_scales():
    fig = _grid(3)
    try:
        cbars = [ax for ax in fig.axes if _is_cbar(ax)]
        images = [ax for ax in fig.axes if ax.images and ax not in cbars]
        rows = [images[i : i + 4] for i in range(0, len(images), 4)]
        lims = {tuple(row[1].images[0].get_clim()) for row in rows} | {
            tuple(row[2].images[0].get_clim()) for row in rows
        }
        assert len(lims) == 1, "base and tuned maps share one colour scale"
        lo, hi = lims.pop()
        assert lo == -hi
        dl = {tuple(row[3].images[0].get_clim()) for row in rows}
        assert len(dl) == 1 and next(iter(dl))[0] == -next(iter(dl))[1], "difference is on one symmetric scale"
    finally:
        plt.close(fig)


def _results() -> Results:
    r = Results()
    r.summary = {
        "findings": [],
        "data": {"classes": ["a", "b"], "description": "d", "n_train": 1, "n_test": 1, "image_size": 8},
        "checkpoints": {"base": {"file": "base.safetensors", "sha256": "abc"}},
        "versions": {"torch": "2", "numpy": "1"},
    }
    r.tables["accuracy"] = pd.DataFrame(
        {"model": ["base", "tuned"], "acc": [0.5, 0.7], "loss": [1.0, 0.8], "n": [2, 2], "role": ["base", "tuned"]}
    )
    n = 40
    r.tables["weight_deltas"] = pd.DataFrame(
        {
            "model": ["tuned"] * n,
            "name": [f"layer{i}.weight" for i in range(n)],
            "kind": ["weight"] * n,
            "status": ["compared"] * n,
            "relative": np.linspace(0.01, 0.2, n),
        }
    )
    r.tables["weight_stages"] = pd.DataFrame(
        {"model": ["tuned"] * 3, "stage": ["stem", "layer1", "fc"], "depth": [0, 1, 2], "relative": [0.1, 0.2, 0.3]}
    )
    return r


def _blocks(html: str) -> tuple[set[str], set[str]]:
    """Ids of tables inside a <details> block, and of all tables."""
    inside = set()
    for body in re.findall(r"<details\b.*?</details>", html, flags=re.S):
        inside |= set(re.findall(r'id="(tbl-[^"]+)"', body))
    return inside, set(re.findall(r'id="(tbl-[^"]+)"', html))


def test_long_tables_collapsed_short_ones_open():
    html = render_html(_results())
    inside, all_ids = _blocks(html)
    assert {"tbl-weight-deltas", "tbl-accuracy", "tbl-weight-stages", "tbl-checkpoints"} <= all_ids
    assert "tbl-weight-deltas" in inside  # 40 rows
    assert "tbl-checkpoints" in inside and "tbl-versions" in inside  # reference material, collapsed by choice
    assert "tbl-accuracy" not in inside and "tbl-weight-stages" not in inside  # short tables stay open
    # the summary names the table and its row count, and keeps the CSV link visible
    summ = re.search(r"<summary>(.*?)</summary>", html[html.index('id="tbl-weight-deltas"') - 300 :], flags=re.S)
    assert summ and "Every tensor" in summ.group(1) and "40 rows" in summ.group(1)
    assert 'href="tables/weight_deltas.csv"' in summ.group(1)
    assert 'href="tables/accuracy.csv"' in html and 'href="tables/weight_stages.csv"' in html


def test_table_collapsed_flag():
    from tunelens.reports.model import Table

    short, long = pd.DataFrame({"a": range(3)}), pd.DataFrame({"a": range(40)})
    assert not Table("t", "t", short).is_collapsed and Table("t", "t", long).is_collapsed
    assert Table("t", "t", short, collapsed=True).is_collapsed
    assert not Table("t", "t", long, collapsed=False).is_collapsed


def test_navigation_lists_every_figure():
    html = render_html(_results())
    nav = html[html.index("<nav") : html.index("</nav>")]
    for fid in set(re.findall(r'<figure id="([^"]+)"', html)):
        assert f'href="#{fid}"' in nav, fid


def _panel_white_share(fig: plt.Figure, ax) -> float:
    """Share of an image panel's rendered pixels that are (near) white."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=float) / 255
    bb = ax.get_window_extent()
    h = rgba.shape[0]
    crop = rgba[int(h - bb.y1) + 2 : int(h - bb.y0) - 2, int(bb.x0) + 2 : int(bb.x1) - 2, :3]
    return float((crop.min(axis=-1) > 0.93).mean())


@pytest.mark.parametrize("overlay", [False, True])
def test_one_outlier_pixel_does_not_blank_the_maps(overlay):
    """A real network's map has a few huge pixels: with a linear scale to the maximum the panel is white;
    the percentile-clipped scale keeps the rest visible, and base and tuned still share one scale."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 32, 32))
    tuned = base + 0.5 * rng.normal(size=(1, 32, 32))
    base[0, 3, 3] = 1e4  # one outlier pixel
    inputs = [rng.random((32, 32, 3))]
    fig = fg.attribution_grid(inputs, base, tuned, ["row"], overlay=overlay)
    raw = fg.attribution_grid(inputs, base, tuned, ["row"], clip_percentile=100.0)  # the scale reaches the outlier
    try:
        panels = [ax for ax in fig.axes if ax.images and not _is_cbar(ax)]
        assert _panel_white_share(fig, panels[1]) < 0.5 and _panel_white_share(fig, panels[2]) < 0.5
        raw_panels = [ax for ax in raw.axes if ax.images and not _is_cbar(ax)]
        assert _panel_white_share(raw, raw_panels[1]) > 0.9, "the unclipped scale does wash the map out"
        lims = {panels[k].images[-1].get_clim() for k in (1, 2)}
        assert len(lims) == 1
        lo, hi = lims.pop()
        assert hi == -lo == pytest.approx(fg.display_limit(base, tuned)) and hi < 10
        labels = " ".join(t.get_text() for t in _texts(fig))
        assert "clipped at p99" in labels
    finally:
        plt.close(fig)
        plt.close(raw)


def test_display_limit_is_the_percentile_of_both_maps():
    a = np.arange(50, dtype=float).reshape(5, 10)
    b = -np.arange(50, 100, dtype=float).reshape(5, 10)
    assert fg.display_limit(a, b) == pytest.approx(np.percentile(np.arange(100), 99))  # 98.01
    assert fg.display_limit(np.zeros((3, 3))) == 1.0
    sparse = np.zeros(1000)
    sparse[0] = 5.0
    assert fg.display_limit(sparse) == 5.0  # the 99th percentile is 0: fall back to the largest value
