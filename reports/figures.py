"""Figures from result tables, returned as ``data:`` URIs ready to inline (SVG for charts, PNG for images).

Pure functions of tables and arrays; no analysis is computed here.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.font_manager import FontProperties

plt.rcParams.update({"svg.hashsalt": "tunelens", "figure.dpi": 100, "font.size": 9, "axes.titlesize": 10})
sns.set_theme(style="whitegrid", context="paper")

__all__ = [
    "attribution_grid",
    "bar_chart",
    "display_limit",
    "fig_to_uri",
    "filter_grid",
    "heatmap",
    "image_grid",
    "line_chart",
    "to_display",
]


def fig_to_uri(fig: plt.Figure, fmt: str = "svg") -> str:
    buf = io.BytesIO()
    meta = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buf, format=fmt, bbox_inches="tight", metadata=meta)
    plt.close(fig)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def line_chart(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    title: str = "",
    ylabel: str | None = None,
    band: tuple[str, str] | None = None,
    logy: bool = False,
    style: str | None = None,
    size: tuple[float, float] = (6.4, 3.2),
    xorder: list | None = None,
) -> str:
    fig, ax = plt.subplots(figsize=size)
    groups = df.groupby(hue, sort=False) if hue else [(None, df)]
    for _i, (key, g) in enumerate(groups):
        g = g.copy()
        if xorder is not None:
            g[x] = pd.Categorical(g[x], categories=xorder, ordered=True)
            g = g.sort_values(x)
        xs = list(range(len(g))) if xorder is not None else g[x]
        ls = "--" if style and key is not None and str(key) == style else "-"
        ax.plot(xs, g[y], marker="o", ms=3, lw=1.5, ls=ls, label=None if key is None else str(key))
        if band is not None:
            ax.fill_between(xs, g[band[0]], g[band[1]], alpha=0.2)
    if xorder is not None:
        ax.set_xticks(range(len(xorder)))
        ax.set_xticklabels(xorder, rotation=30, ha="right")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    if hue:
        ax.legend(fontsize=7, frameon=False)
    return fig_to_uri(fig)


def bar_chart(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    title: str = "",
    ylabel: str | None = None,
    logy: bool = False,
    size: tuple[float, float] = (6.4, 3.2),
    order: list | None = None,
) -> str:
    fig, ax = plt.subplots(figsize=size)
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax, order=order, errorbar=None)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel or y)
    ax.tick_params(axis="x", rotation=30)
    if title:
        ax.set_title(title)
    if hue:
        ax.legend(fontsize=7, frameon=False)
    return fig_to_uri(fig)


def heatmap(
    mat: pd.DataFrame,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma",
    annot: bool = True,
    size: tuple[float, float] | None = None,
    fmt: str = ".2f",
    xlabel: str = "",
    ylabel: str = "",
    center: float | None = None,
) -> str:
    h, w = mat.shape
    fig, ax = plt.subplots(figsize=size or (1.0 + 0.6 * w, 0.8 + 0.45 * h))
    sns.heatmap(
        mat.astype(float),
        annot=annot,
        fmt=fmt,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        ax=ax,
        center=center,
        annot_kws={"fontsize": 7},
        cbar_kws={"shrink": 0.8},
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return fig_to_uri(fig)


def to_display(img: np.ndarray) -> np.ndarray:
    """C x H x W (any range) -> H x W x C in [0, 1], min-max scaled per image."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a.squeeze()


def image_grid(
    rows: list[list[np.ndarray]],
    row_labels: list[str],
    col_labels: list[str],
    title: str = "",
    cmaps: list[str | None] | None = None,
    vranges: list[tuple[float, float] | None] | None = None,
    contours: list[np.ndarray | None] | None = None,
    cell: float = 1.3,
) -> str:
    """A grid of images; column j uses ``cmaps[j]`` / ``vranges[j]`` (a shared colour scale per column)."""
    nr, nc = len(rows), len(col_labels)
    fig, axes = plt.subplots(nr, nc, figsize=(cell * nc, cell * nr + 0.3), squeeze=False)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            ax = axes[i][j]
            cm = cmaps[j] if cmaps else None
            vr = vranges[j] if vranges else None
            kw = {"vmin": vr[0], "vmax": vr[1]} if vr else {}
            ax.imshow(im, cmap=cm, interpolation="nearest", **kw)
            c = contours[i] if contours else None
            if c is not None and j == 0:
                ax.contour(c.astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig_to_uri(fig, "png")


def filter_grid(base: np.ndarray, tuned: np.ndarray, delta: np.ndarray, max_filters: int = 16) -> str:
    """First-layer kernels of both models and their difference; base and tuned share one colour scale."""
    n = min(base.shape[0], max_filters)
    show = (lambda w: to_display(w)) if base.shape[1] == 3 else (lambda w: w[0])
    lim = float(max(np.abs(base[:n]).max(), np.abs(tuned[:n]).max()))
    dlim = float(np.abs(delta[:n]).max()) or 1.0
    fig, axes = plt.subplots(3, n, figsize=(0.7 * n, 2.4), squeeze=False)
    for j in range(n):
        for i, (w, lbl) in enumerate(((base, "base"), (tuned, "tuned"), (delta, "tuned - base"))):
            ax = axes[i][j]
            if i < 2:
                img = (np.clip(w[j].transpose(1, 2, 0) / lim, -1, 1) + 1) / 2 if base.shape[1] == 3 else show(w[j])
                ax.imshow(img, interpolation="nearest")
            else:
                ax.imshow(np.abs(w[j]).sum(0), cmap="viridis", vmin=0, vmax=dlim * w.shape[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(lbl, fontsize=7)
    fig.tight_layout()
    return fig_to_uri(fig, "png")


CLIP_PERCENTILE = 99.0  # attribution colour scales end at this percentile of |value| (Captum: outlier_perc=1)


def display_limit(*maps: np.ndarray, percentile: float = CLIP_PERCENTILE) -> float:
    """Half-range of a symmetric colour scale shared by ``maps``: the ``percentile``-th percentile of their
    absolute finite values together (Captum's ``_normalize_attr`` with ``outlier_perc = 100 - percentile``).
    Falls back to the largest value when the percentile is 0 (sparse maps), and to 1 for all-zero maps."""
    vals = np.concatenate([np.abs(np.asarray(m, dtype=float)).ravel() for m in maps])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return 1.0
    lim = float(np.percentile(vals, percentile))
    return lim if lim > 0 else (float(vals.max()) or 1.0)


def _grey(img: np.ndarray) -> np.ndarray:
    """An H x W (x C) display image in [0, 1] as one grey channel (the luminance mean), for overlays."""
    a = np.asarray(img, dtype=float)
    return a.mean(axis=-1) if a.ndim == 3 else a


def _text_width_in(lines: list[str], fontsize: float, dpi: float = 100.0) -> float:
    """Width in inches of the widest of ``lines`` at ``fontsize`` (measured with the Agg renderer)."""
    r = RendererAgg(10, 10, dpi)
    prop = FontProperties(size=fontsize)
    return max((r.get_text_width_height_descent(s, prop, ismath=False)[0] for s in lines if s), default=0.0) / dpi


def attribution_grid(
    inputs: list[np.ndarray],
    base: np.ndarray,
    tuned: np.ndarray,
    row_labels: list[str],
    title: str = "",
    masks: list[np.ndarray | None] | None = None,
    col_titles: tuple[str, str, str, str] = ("input", "base", "tuned", "tuned - base"),
    cell: float = 1.35,
    fontsize: float = 7.0,
    clip_percentile: float = CLIP_PERCENTILE,
    overlay: bool = False,
) -> plt.Figure:
    """Input, base map, tuned map and their difference per row, on a fixed grid that nothing overlaps.

    Colour scales are clipped at the ``clip_percentile``-th percentile of the absolute values
    (:func:`display_limit`; Captum's ``visualize_image_attr(outlier_perc=100 - clip_percentile)``), so that
    a few outlier pixels of a real network's map do not wash the rest out to white; the values beyond it
    are drawn in the end colour. With ``overlay`` the base and tuned maps are blended over the input in grey,
    each pixel's opacity growing with its |attribution| (Captum's ``blended_heat_map``). Display only: the
    statistics of the maps are computed on the raw values elsewhere.

    Every image panel has the same size; row labels sit in a left margin sized to the widest label;
    column titles appear once, above the top row; the two colour bars (one shared by the base and tuned
    maps, symmetric about 0; one for the difference, symmetric about 0) have their own axes below
    the grid, each under the columns it describes. Positions are computed in inches, so the layout is
    the same for 1 row or 20.
    """
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    n = len(inputs)
    if n == 0:
        raise ValueError("attribution_grid needs at least one row")
    lim = display_limit(base, tuned, percentile=clip_percentile)
    diff = tuned - base
    dlim = display_limit(diff, percentile=clip_percentile)
    h, w = np.asarray(inputs[0]).shape[:2]
    cw, ch = cell, cell * h / w if w else cell
    gap, rgap = 0.08, 0.1  # between columns, between rows (inches)
    line = fontsize * 1.25 / 72  # one line of text, inches
    label_w = _text_width_in([s for lbl in row_labels for s in str(lbl).split("\n")], fontsize) + 0.15
    left, right = max(0.6, label_w + 0.1), 0.5
    top = 0.12 + (line * 1.6 + 0.05 if title else 0) + line + 0.06
    cbar_h, bottom = 0.12, 0.12 + 0.12 + 2 * line + 0.1  # colour bar, then tick labels and the bar's label
    W = left + 4 * cw + 3 * gap + right
    H = top + n * ch + (n - 1) * rgap + bottom
    fig = plt.figure(figsize=(W, H))

    def box(x: float, y_top: float, bw: float, bh: float) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) in figure fractions from inches measured from the top left."""
        return (x / W, 1 - (y_top + bh) / H, bw / W, bh / H)

    grid_bottom = top + n * ch + (n - 1) * rgap
    for i in range(n):
        y = top + i * (ch + rgap)
        axes = [fig.add_axes(box(left + j * (cw + gap), y, cw, ch)) for j in range(4)]
        axes[0].imshow(inputs[i], interpolation="nearest", aspect="auto")
        if masks is not None and masks[i] is not None and np.asarray(masks[i]).any():
            axes[0].contour(np.asarray(masks[i], dtype=float), levels=[0.5], colors="yellow", linewidths=0.8)
        kw: dict[str, Any] = {"interpolation": "nearest", "aspect": "auto"}
        for ax, m in ((axes[1], base[i]), (axes[2], tuned[i])):
            if overlay:
                ax.imshow(_grey(inputs[i]), cmap="gray", vmin=0.0, vmax=1.0, alpha=0.45, **kw)
                kw_alpha = {"alpha": np.clip(np.abs(m) / lim, 0.0, 1.0) * 0.85}
            else:
                kw_alpha = {}
            ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, **kw, **kw_alpha)
        axes[3].imshow(diff[i], cmap="PuOr_r", vmin=-dlim, vmax=dlim, **kw)
        for j, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=fontsize + 1, pad=3)
        axes[0].text(
            -0.1 / cw, 0.5, row_labels[i], transform=axes[0].transAxes, ha="right", va="center", fontsize=fontsize
        )
    if title:
        fig.text(left / W, 1 - 0.12 / H, title, ha="left", va="top", fontsize=fontsize + 3, fontweight="bold")
    y = grid_bottom + 0.12
    inset = 0.2
    cax1 = fig.add_axes(box(left + cw + gap + inset, y, 2 * cw + gap - 2 * inset, cbar_h))
    cax2 = fig.add_axes(box(left + 3 * (cw + gap) + inset, y, cw - 2 * inset, cbar_h))
    for cax, cmap, v, label in (
        (cax1, "RdBu_r", lim, f"base and tuned, one scale clipped at p{clip_percentile:g}"),
        (cax2, "PuOr_r", dlim, f"tuned - base (p{clip_percentile:g})"),
    ):
        sm = ScalarMappable(norm=Normalize(-v, v), cmap=cmap)
        cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
        cb.set_ticks([-v, 0.0, v])
        cb.set_ticklabels([f"{-v:.2g}", "0", f"{v:.2g}"])
        cb.ax.tick_params(labelsize=fontsize, length=2, pad=1)
        cb.set_label(label, fontsize=fontsize, labelpad=2)
    return fig
