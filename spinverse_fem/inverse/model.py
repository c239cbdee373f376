r"""The inverse problem: data misfit + geometric priors on x = log10(kappa / (1 um/ms)).

    Phi(x) = w_d J_d(kappa(x)) + w_c C(x; w_ij) + w_m(t) Mfd(x)

x lives on the active faces (interior faces, plus outer faces when they are robin); inactive
faces keep a fixed kappa. The optimiser sees only `cost` and `gradient` and the bounds.
dJ/dx = dJ/dkappa * kappa * ln 10.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinverse_fem.inverse.priors import GeometricPriors

LN10 = np.log(10.0)


@dataclass(frozen=True)
class FaceParameters:
    """active: (F,) bool; lower/upper: log10 bounds (um/ms); fixed_kappa: (F,) values used on
    inactive faces."""

    active: np.ndarray
    lower: float
    upper: float
    fixed_kappa: np.ndarray

    @property
    def size(self) -> int:
        return int(np.sum(self.active))

    def kappa(self, x: np.ndarray) -> np.ndarray:
        k = self.fixed_kappa.copy()
        k[self.active] = 10.0 ** np.asarray(x)
        return k

    def x_of(self, kappa: np.ndarray) -> np.ndarray:
        return np.log10(np.asarray(kappa)[self.active])

    def full_log10(self, x: np.ndarray) -> np.ndarray:
        """(F,) log10 kappa on every face (inactive faces from fixed_kappa)."""
        return np.log10(self.kappa(x))


@dataclass
class PriorWeights:
    continuity: float
    manifold: float


class InverseProblem:
    """misfit: SignalMisfit-like (objective_and_gradient in kappa); priors: GeometricPriors on
    all faces with the active mask; weights may change between optimiser segments."""

    def __init__(self, params: FaceParameters, misfit, priors: GeometricPriors,
                 weights: PriorWeights):
        self.params = params
        self.misfit = misfit
        self.priors = priors
        self.weights = weights
        self.continuity_w = None
        self.last_terms: dict = {}
        self._cache = None  # (x bytes, weights) -> (total, grad, terms)

    def refresh_continuity_weights(self, x: np.ndarray) -> None:
        """w_ij = clip(1 - |p_i - p_j|, 0, 1) at x, then held fixed (not differentiated)."""
        self.continuity_w = self.priors.continuity_weights(self.params.full_log10(x))
        self._cache = None

    def cost_and_gradient(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        key = (np.asarray(x).tobytes(), self.weights.continuity, self.weights.manifold)
        if self._cache is not None and self._cache[0] == key:
            self.last_terms = dict(self._cache[3])
            return self._cache[1], self._cache[2].copy()
        p = self.params
        kappa = p.kappa(x)
        jd, gk = self.misfit.objective_and_gradient(kappa)
        grad = gk[p.active] * kappa[p.active] * LN10
        xf = np.log10(kappa)
        if self.continuity_w is None:
            self.refresh_continuity_weights(x)
        jc, gc = self.priors.continuity(xf, self.continuity_w)
        jm, gm = self.priors.manifold(xf)
        total = jd + self.weights.continuity * jc + self.weights.manifold * jm
        grad = grad + self.weights.continuity * gc[p.active] + self.weights.manifold * gm[p.active]
        self.last_terms = dict(misfit=jd, continuity=jc, manifold=jm, total=total,
                               continuity_weight=self.weights.continuity,
                               manifold_weight=self.weights.manifold)
        self._cache = (key, float(total), grad.copy(), dict(self.last_terms))
        return float(total), grad
