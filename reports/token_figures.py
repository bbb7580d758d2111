"""Sentences with their tokens shaded by attribution: base and tuned model, one shared colour scale."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors

from .figures import fig_to_uri

__all__ = ["token_grid"]


def token_grid(ex: dict, classes: list[str], method: str, rows: list[int]) -> str:
    """A PNG data URI: for each sentence in ``rows`` two lines (base, tuned), every word token on a box
    shaded by its signed relevance (red positive, blue negative, one scale ``[-v, v]`` for the whole
    figure, ``v`` the largest absolute relevance shown); decisive tokens are underlined."""
    shown = np.concatenate([ex["base"][rows], ex["tuned"][rows]])
    vmax = float(np.abs(shown).max()) or 1.0
    norm = colors.Normalize(-vmax, vmax)
    cmap = plt.get_cmap("RdBu_r")
    height = 0.62 * len(rows) * 2 + 0.9
    fig = plt.figure(figsize=(11, height), dpi=110)
    ax = fig.add_axes((0, 0.55 / height, 1, 1 - 0.75 / height))
    ax.set_axis_off()
    ax.set_xlim(0, 100)
    ax.set_ylim(len(rows) * 2 * 1.0 + 0.2, -0.3)

    def name(c) -> str:
        c = int(c)
        return classes[c] if 0 <= c < len(classes) else str(c)

    y = 0.0
    for i in rows:
        toks = [t for t in ex["tokens"][i] if t]
        for who in ("base", "tuned"):
            pred = ex[f"{who}_pred"][i]
            ax.text(0.5, y, f"{who} -> {name(pred)}", fontsize=8.5, va="center", ha="left", color="#333")
            x = 17.0
            for j, t in enumerate(toks):
                if t in ("[CLS]", "[SEP]"):
                    continue
                v = float(ex[who][i, j])
                w = 1.1 + 0.95 * len(t)
                ax.text(
                    x,
                    y,
                    t,
                    fontsize=10,
                    va="center",
                    ha="left",
                    family="monospace",
                    bbox={"boxstyle": "square,pad=0.25", "fc": cmap(norm(v)), "ec": "none"},
                )
                if ex["decisive"][i, j] > 0:
                    ax.plot([x, x + w - 1.0], [y + 0.32, y + 0.32], color="black", lw=1.4)
                x += w
            y += 0.8
        ax.text(
            99.5,
            y - 1.2,
            f"true: {name(ex['labels'][i])}\nsimilarity {ex['similarity'][i]:.2f}",
            fontsize=8,
            ha="right",
            va="center",
            color="#555",
        )
        y += 0.4
    cax = fig.add_axes((0.3, 0.12 / height, 0.4, 0.18 / height))
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cb.set_label(f"{method}: share of the sentence's relevance (one scale, both models)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig_to_uri(fig, "png")
