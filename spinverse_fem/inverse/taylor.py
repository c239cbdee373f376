"""Taylor tests of gradients: the check every gradient of the package passes.

For a functional with `cost(m)` and `cost_and_gradient(m) -> (J, dJ/dm)`, a seeded random
direction d and steps h_i = h0 / 2^i:

    r0_i = |J(m_h) - J(m)|                          (first order: no gradient)
    r1_i = |J(m_h) - J(m) - h_i <dJ/dm_h, d>|        (second order)

with m_h = m + h d (additive, e.g. the model's x = log10 kappa) or m_h = m e^{h d}
(`multiplicative=True`, for kappa itself: a step in ln kappa, slope <m * dJ/dm, d>). The
observed rates log2(r_i / r_{i+1}) must approach 1 and 2. Round-off shows as r1 levelling off
near eps |J|; choose h0 so that the halvings stay above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaylorResult:
    """h (n,); cost values J(m_h) (n,); J0; slope <grad, d>; remainders r0, r1 (n,); rates
    (n-1,) of each (NaN where a remainder is exactly 0)."""

    h: np.ndarray
    values: np.ndarray
    J0: float
    slope: float
    r0: np.ndarray
    r1: np.ndarray
    rates0: np.ndarray
    rates1: np.ndarray

    @property
    def reaches_roundoff(self) -> bool:
        return bool(np.min(self.r1) < 1e3 * np.finfo(float).eps * max(abs(self.J0), 1e-300))


def observed_rates(r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2(r[:-1] / r[1:])


#: consecutive second-order rates closer than this count as asymptotic
ASYMPTOTIC_SPREAD = 0.05


def taylor_test(functional, m, *, direction=None, seed: int = 0, h0: float = 1e-2,
                halvings: int = 4, multiplicative: bool = False,
                max_extra_halvings: int = 0) -> TaylorResult:
    """The Taylor remainders and rates of `functional` at m along `direction` (default: seeded
    standard normal).

    max_extra_halvings: keep halving h (at most this many more times) while the last two
    second-order rates still differ by more than ASYMPTOTIC_SPREAD and the remainder is above
    round-off: near a close pair of eigenvalues the remainders become quadratic only for h
    well below the gap, so the asymptotic part starts later.
    """
    m = np.asarray(m, dtype=float)
    d = (np.random.default_rng(seed).standard_normal(m.shape) if direction is None
         else np.asarray(direction, dtype=float))
    J0, grad = functional.cost_and_gradient(m)
    slope = float(np.dot(grad * m, d)) if multiplicative else float(np.dot(grad, d))
    floor = 1e3 * np.finfo(float).eps * max(abs(J0), 1e-300)

    def cost_at(h):
        return functional.cost(m * np.exp(h * d) if multiplicative else m + h * d)

    hs = list(h0 / 2.0 ** np.arange(halvings + 1))
    values = [cost_at(h) for h in hs]
    for _ in range(max_extra_halvings):
        r1 = np.abs(np.array(values) - J0 - np.array(hs) * slope)
        rates = observed_rates(r1)
        if (rates.size < 2 or abs(rates[-1] - rates[-2]) <= ASYMPTOTIC_SPREAD
                or r1[-1] <= floor):
            break
        hs.append(hs[-1] / 2.0)
        values.append(cost_at(hs[-1]))
    hs, values = np.array(hs), np.array(values)
    r0 = np.abs(values - J0)
    r1 = np.abs(values - J0 - hs * slope)
    return TaylorResult(h=hs, values=values, J0=float(J0), slope=slope, r0=r0, r1=r1,
                        rates0=observed_rates(r0), rates1=observed_rates(r1))
