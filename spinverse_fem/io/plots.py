"""Figures people would rather look at than read (matplotlib, Agg backend, rank 0 only; each
written atomically, with the mode the user's umask gives: `io.atomic.save_figure_atomic`).

Signals against b: at each b-value a sequence measures several gradient directions; the figures
draw their mean |S/S0| as a line and their spread (min to max over the directions) as a band,
and their legends say so.
"""

from __future__ import annotations

import math

import numpy as np

from spinverse_fem.io.atomic import save_figure_atomic

MEAN_LABEL = "line: mean over directions"
SPREAD_LABEL = "band: min-max over directions"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def direction_spread(b, signal) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(b-values, mean, min, max) of |signal| over the measurements of each distinct b."""
    b = np.asarray(b, dtype=float)
    mag = np.abs(np.asarray(signal))
    bs = np.unique(b)
    mean = np.array([mag[b == x].mean() for x in bs])
    lo = np.array([mag[b == x].min() for x in bs])
    hi = np.array([mag[b == x].max() for x in bs])
    return bs, mean, lo, hi


def _spread_legend(ax, handles, labels, **kwargs):
    """A legend with the given entries plus two gray entries saying what line and band are."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [*handles, Line2D([], [], color="0.3"), Patch(color="0.3", alpha=0.2)]
    labels = [*labels, MEAN_LABEL, SPREAD_LABEL]
    return ax.legend(handles, labels, **kwargs)


def plot_signal_decay(table, path, title: str = "") -> None:
    """|S/S0| against b for each sequence: direction mean (line) and min-max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    handles, labels = [], []
    for k, name in enumerate(table.sequence_names):
        rows = table.rows_of(k)
        bs, mean, lo, hi = direction_spread(table.b_s_per_mm2[rows], table.signal[rows])
        line, = ax.semilogy(bs, mean, "o-")
        ax.fill_between(bs, lo, hi, color=line.get_color(), alpha=0.2)
        handles.append(line)
        labels.append(f"{name} ms")
    ax.set_xlabel("b (s/mm$^2$)")
    ax.set_ylabel("|S / S$_0$|")
    ax.set_title(title or "Signal decay")
    ax.grid(True, which="both", alpha=0.3)
    _spread_legend(ax, handles, labels, title="sequence (delta/Delta)", fontsize=8)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)


def plot_fit(path, fit: dict, title: str = "") -> None:
    """fit.png of an inversion: per sequence (one panel each), |S/S0| against b, measured
    (targets: markers and a solid band) and predicted at the final kappa (dashed line and a
    hatched band); lines are means over the directions of each b, bands their min-max.

    fit: names, b, target, predicted (lists over the sequences), as `io.outputs.write_result`
    takes it.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = list(fit["names"])
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    height = 3.4 * rows + 0.6  # inches; the bottom 0.6 for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height), squeeze=False)
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        b = fit["b"][k]
        bs, mean, lo, hi = direction_spread(b, fit["target"][k])
        ax.semilogy(bs, mean, "o", color="C0", ms=4)
        ax.fill_between(bs, lo, hi, color="C0", alpha=0.2, lw=0)
        bs, mean, lo, hi = direction_spread(b, fit["predicted"][k])
        ax.semilogy(bs, mean, "--", color="C3")
        ax.fill_between(bs, lo, hi, facecolor="none", edgecolor="C3", hatch="///", lw=0,
                        alpha=0.6)
        ax.set_title(f"{name} ms", fontsize=10)
        ax.set_xlabel("b (s/mm$^2$)")
        ax.set_ylabel("|S / S$_0$|")
        ax.grid(True, which="both", alpha=0.3)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    handles = [Line2D([], [], color="C0", marker="o", ls="none", ms=4),
               Patch(color="C0", alpha=0.2),
               Line2D([], [], color="C3", ls="--"),
               Patch(facecolor="none", edgecolor="C3", hatch="///")]
    labels = ["measured: mean over directions", "measured: min-max over directions",
              "predicted: mean over directions", "predicted: min-max over directions"]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title or "Measured and predicted signals", fontsize=10)
    fig.tight_layout(rect=(0, 0.55 / height, 1, 1))
    try:
        save_figure_atomic(fig, path, dpi=110)
    finally:
        plt.close(fig)
