"""Figures from result tables, returned as ``data:`` URIs ready to inline (SVG for charts, PNG for images).

Pure functions of tables and arrays; no analysis is computed here.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

plt.rcParams.update({"svg.hashsalt": "tunelens", "figure.dpi": 100, "font.size": 9, "axes.titlesize": 10})
sns.set_theme(style="whitegrid", context="paper")

__all__ = ["bar_chart", "fig_to_uri", "filter_grid", "heatmap", "image_grid", "line_chart", "to_display"]


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
            if contours and contours[i] is not None and j == 0:
                ax.contour(contours[i].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
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
