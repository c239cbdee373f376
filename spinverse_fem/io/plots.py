"""Figures people would rather look at than read (matplotlib, Agg backend, rank 0 only; each
written atomically)."""

from __future__ import annotations

import numpy as np

from spinverse_fem.io.atomic import save_figure_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_signal_decay(table, path, title: str = "") -> None:
    """|S/S0| against b for each sequence: direction mean (line) and min-max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, name in enumerate(table.sequence_names):
        rows = table.rows_of(k)
        b = table.b_s_per_mm2[rows]
        mag = np.abs(table.signal[rows])
        bs = np.unique(b)
        mean = np.array([mag[b == x].mean() for x in bs])
        lo = np.array([mag[b == x].min() for x in bs])
        hi = np.array([mag[b == x].max() for x in bs])
        line, = ax.semilogy(bs, mean, "o-", label=f"{name} ms")
        ax.fill_between(bs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("b (s/mm$^2$)")
    ax.set_ylabel("|S / S$_0$|")
    ax.set_title(title or "Signal decay (band: spread over directions)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="delta/Delta")
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)
