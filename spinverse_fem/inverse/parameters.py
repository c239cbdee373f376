"""The parameter map of the inversion: the optimisation vector x <-> face permeabilities kappa.

    x = log10(kappa / (1 um/ms))   on the active faces (interior faces, plus the outer faces
                                   when they are robin), lower <= x <= upper;
    kappa = fixed_kappa            on the inactive faces.

dJ/dx = dJ/dkappa * kappa * ln 10 (`pullback`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LN10 = np.log(10.0)


@dataclass(frozen=True)
class ParameterMap:
    """active: (F,) bool; lower/upper: bounds of x (log10 of um/ms); fixed_kappa: (F,) kappa
    (um/ms) used on inactive faces."""

    active: np.ndarray
    lower: float
    upper: float
    fixed_kappa: np.ndarray

    @property
    def size(self) -> int:
        """Number of unknowns (active faces)."""
        return int(np.sum(self.active))

    def to_kappa(self, x: np.ndarray) -> np.ndarray:
        """(F,) kappa in um/ms for the optimisation vector x (size,)."""
        k = self.fixed_kappa.copy()
        k[self.active] = 10.0 ** np.asarray(x)
        return k

    def from_kappa(self, kappa: np.ndarray) -> np.ndarray:
        """x (size,) for a per-face kappa (F,) in um/ms, clipped to the bounds."""
        return np.clip(np.log10(np.asarray(kappa, dtype=float)[self.active]), self.lower,
                       self.upper)

    def full_log10(self, x: np.ndarray) -> np.ndarray:
        """(F,) log10 kappa on every face (inactive faces from fixed_kappa)."""
        return np.log10(self.to_kappa(x))

    def pullback(self, kappa: np.ndarray, grad_kappa: np.ndarray) -> np.ndarray:
        """dJ/dx (size,) from dJ/dkappa (F,) in 1/(um/ms) at kappa = to_kappa(x)."""
        return grad_kappa[self.active] * kappa[self.active] * LN10
