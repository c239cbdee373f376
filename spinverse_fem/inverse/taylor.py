"""Taylor tests of gradients in log kappa (the optimiser's variable).

For a seeded random direction d and steps h_i = h0 / 2^i:

    r0_i = |J(kappa e^{h_i d}) - J(kappa)|                      (first order: no gradient)
    r1_i = |J(kappa e^{h_i d}) - J(kappa) - h_i <kappa * dJ/dkappa, d>|   (second order)

observed rates log2(r_i / r_{i+1}) must approach 1 and 2. Round-off shows as r1 levelling off
near eps |J|; choose h0 so four halvings stay above it.
"""

from __future__ import annotations

import warnings

import numpy as np


def taylor_test(functional, kappa, *, seed: int = 0, h0: float = 1e-2, halvings: int = 4,
                direction=None, with_first_order: bool = False):
    """Return (rates (halvings,), remainders (halvings+1,)) [+ first-order rates].

    functional: has objective(kappa) and objective_and_gradient(kappa) -> (J, dJ/dkappa).
    """
    kappa = np.asarray(kappa, dtype=float)
    if direction is None:
        direction = np.random.default_rng(seed).standard_normal(kappa.shape)
    d = np.asarray(direction, dtype=float)
    J0, grad = functional.objective_and_gradient(kappa)
    slope = float(np.dot(grad * kappa, d))
    hs = h0 / 2.0 ** np.arange(halvings + 1)
    r0, r1 = [], []
    for h in hs:
        Jh = functional.objective(kappa * np.exp(h * d))
        r0.append(abs(Jh - J0))
        r1.append(abs(Jh - J0 - h * slope))
    r0, r1 = np.array(r0), np.array(r1)
    if np.min(r1) < 1e3 * np.finfo(float).eps * max(abs(J0), 1e-300):
        warnings.warn("Taylor remainders reach round-off; increase h0", stacklevel=2)
    rates = np.log2(r1[:-1] / r1[1:])
    if with_first_order:
        return rates, r1, np.log2(r0[:-1] / r0[1:])
    return rates, r1
