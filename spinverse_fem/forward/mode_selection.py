r"""How many eigenmodes the reduced model keeps: never cut a (near-)degenerate cluster.

The reduced model at a fixed mode count K depends on the invariant subspace of the K smallest
eigenpairs. That subspace, and with it the objective, is a smooth function of kappa while the
cut is open, lambda_K < lambda_{K+1}; its derivative grows like 1 / (lambda_{K+1} - lambda_K)
as the pair closes, and where the two cross the K-th mode changes identity and the objective
has a kink. So the cut goes where the spectrum has a real gap, measured relatively:

    g_K = (lambda_{K+1} - lambda_K) / lambda_{K+1}                     (dimensionless, in [0, 1])

Rule (docs/mode_selection.md has the measurements behind the numbers):
- Selection: from the target count K_t (all eigenvalues below the length-scale cutoff, capped
  at max_modes) choose K in the window [K_t - w, K_t], w = max(4, ceil(0.15 K_t)), with the
  largest g_K; if that gap is below `MIN_SELECT_GAP`, widen the window down until one is found.
  Near K = 120 on the paper's grid the mean relative spacing is ~6e-3 (Weyl: 1 / (1.5 K));
  the largest gap of ~18 spacings is typically 2-5 times that. At the paper's uniform start
  the cubic symmetry makes most eigenvalues triple (g = 1e-16): the rule picks 111 where the
  cap is 120 (g = 3.1e-2), where the old rule kept 120 (g = 2.0e-4).
- Re-selection along an optimisation path: the count is kept fixed (the objective is smooth)
  until g_K at an iterate falls below `RESELECT_GAP`; then it is selected again by the same
  rule at that iterate, logged and recorded. That is the only place where the objective
  changes non-smoothly, and it is announced. 3e-3 rather than 1e-3: steps from cuts with gaps
  just above 1e-3 amplified round-off enough to part the 1- and 2-thread default runs.
- Certification: a gradient check at a point with g_K below `RESELECT_GAP` is refused: an
  optimiser would not use the model there, and the Taylor remainders see the near-crossing.

All decisions compare replicated eigenvalues against thresholds far above their round-off
(1e-10 relative), so every rank, thread count and run makes the same choice.
"""

from __future__ import annotations

import math

import numpy as np

#: a selected cut must have at least this relative gap (~3x the re-selection threshold)
MIN_SELECT_GAP = 1e-2
#: below this relative gap the cut is re-selected (and a gradient is not certified)
RESELECT_GAP = 3e-3


def relative_gaps(lam: np.ndarray) -> np.ndarray:
    """g_K for K = 1 .. len(lam) - 1: (lam[K] - lam[K-1]) / lam[K] (0 where lam[K] <= 0)."""
    lam = np.asarray(lam, dtype=float)
    num = lam[1:] - lam[:-1]
    den = lam[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def window(k_target: int) -> int:
    return max(4, math.ceil(0.15 * k_target))


def select_mode_count(lam: np.ndarray, k_target: int) -> int:
    """K <= k_target with the largest relative gap in the window below k_target (see module
    docstring). lam: ascending eigenvalues, at least k_target + 1 of them when available."""
    lam = np.asarray(lam, dtype=float)
    k_target = min(int(k_target), lam.size - 1) if lam.size > 1 else lam.size
    if k_target <= 1:
        return max(k_target, 1)
    g = relative_gaps(lam)          # g[K - 1] is the gap after mode K
    lo = max(1, k_target - window(k_target))
    while True:
        ks = np.arange(lo, k_target + 1)
        best = ks[np.argmax(g[ks - 1])]   # ties: the smaller K (np.argmax is first-wins)
        if g[best - 1] >= MIN_SELECT_GAP or lo == 1:
            return int(best)
        lo = max(1, lo - window(k_target))


def gap_at(lam_k: float, lam_next: float | None) -> float:
    """g_K from lambda_K and lambda_{K+1} (NaN when lambda_{K+1} is unknown)."""
    if lam_next is None or not lam_next > 0:
        return float("nan")
    return float((lam_next - lam_k) / lam_next)
