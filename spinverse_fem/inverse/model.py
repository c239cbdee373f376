r"""The model of the inverse problem: one object joins the parameter map, the signal misfit and
the geometric priors, and is all an optimiser sees (cf. hIPPYlib's Model, pyadjoint's
ReducedFunctional):

    Phi(x) = J_d(kappa(x)) + w_c C(x; w_ij) + w_m Mfd(x),     x = log10(kappa / (1 um/ms))

J_d: a `SignalMisfit` (reduced or full order); C: continuity prior with weights w_ij held fixed
between `update_prior_weights` calls (they are evaluated at a reference point and not
differentiated); Mfd: the manifold prior. The gradient is exact: the misfit's adjoint pulled
back through the parameter map, plus the priors' analytic gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinverse_fem.inverse.parameters import ParameterMap
from spinverse_fem.inverse.priors import GeometricPriors


@dataclass
class PriorWeights:
    """w_c (continuity) and w_m (manifold), dimensionless."""

    continuity: float
    manifold: float


class Model:
    """params: ParameterMap; misfit: a SignalMisfit (cost / cost_and_gradient in kappa);
    priors: GeometricPriors on all faces with the active mask; weights: PriorWeights;
    reference_x: where the continuity weights w_ij are first evaluated.

    All methods are collective; x (params.size,) must be identical on every rank.
    """

    def __init__(self, params: ParameterMap, misfit, priors: GeometricPriors,
                 weights: PriorWeights, reference_x: np.ndarray):
        self.params = params
        self.misfit = misfit
        self.priors = priors
        self.weights = PriorWeights(weights.continuity, weights.manifold)
        self.continuity_w = None
        self.last_terms: dict = {}
        self._cache = None  # (x bytes, weights) -> (total, grad, terms)
        self.update_prior_weights(reference_x, self.weights.manifold)

    @property
    def num_modes(self) -> int | None:
        return self.misfit.num_modes

    @property
    def counters(self):
        return self.misfit.counters

    def set_num_modes(self, num_modes: int) -> None:
        """A mode re-selection (reduced misfits only): the objective changes here."""
        self.misfit.set_num_modes(num_modes)
        self._cache = None

    def refresh_basis(self, x: np.ndarray) -> int:
        """A frozen-basis misfit's refresh at x (`inverse.frozen_basis`): the objective changes
        here. Returns the mode count."""
        self._cache = None
        self._set_tissue(x)
        return self.misfit.refresh(self.params.to_kappa(x))

    def _set_tissue(self, x: np.ndarray) -> None:
        """The compartment parameters of x into the forward operators (when they are fitted)."""
        t = self.params.tissue
        if t is not None:
            self.misfit.set_tissue(*t.cell_fields(self.params.tissue_part(x)))

    def update_prior_weights(self, x: np.ndarray, manifold: float) -> None:
        """Re-evaluate w_ij = clip(1 - |p_i - p_j|, 0, 1) at x (then held fixed) and set the
        manifold weight (the driver's ramp)."""
        self.continuity_w = self.priors.continuity_weights(self.params.full_log10(x))
        self.weights.manifold = float(manifold)
        self._cache = None

    def _priors(self, xf: np.ndarray):
        jc, gc = self.priors.continuity(xf, self.continuity_w)
        jm, gm = self.priors.manifold(xf)
        return jc, gc, jm, gm

    def cost(self, x: np.ndarray) -> float:
        """Phi(x) (dimensionless)."""
        kappa = self.params.to_kappa(x)
        self._set_tissue(x)
        jd = self.misfit.cost(kappa)
        jc, _, jm, _ = self._priors(np.log10(kappa))
        return float(jd + self.weights.continuity * jc + self.weights.manifold * jm)

    def cost_and_gradient(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """(Phi(x), dPhi/dx (params.size,)); the terms are kept in `last_terms`."""
        key = (np.asarray(x).tobytes(), self.weights.continuity, self.weights.manifold)
        if self._cache is not None and self._cache[0] == key:
            self.last_terms = dict(self._cache[3])
            return self._cache[1], self._cache[2].copy()
        p = self.params
        kappa = p.to_kappa(x)
        self._set_tissue(x)
        jd, gk = self.misfit.cost_and_gradient(kappa)
        grad = p.pullback(kappa, gk)
        jc, gc, jm, gm = self._priors(np.log10(kappa))
        w = self.weights
        total = jd + w.continuity * jc + w.manifold * jm
        grad = grad + w.continuity * gc[p.active] + w.manifold * gm[p.active]
        if p.tissue is not None:
            # the same adjoint, paired cell by cell (ReducedMisfit.tissue_gradient)
            grad = np.concatenate([grad, p.tissue.pullback(
                p.tissue_part(x), *self.misfit.tissue_gradient(kappa))])
        cut = self.misfit.last_cut
        self.last_terms = dict(misfit=jd, continuity=jc, manifold=jm, total=total,
                               continuity_weight=w.continuity, manifold_weight=w.manifold,
                               modes=cut.modes if cut else np.nan,
                               mode_gap=cut.rel_gap if cut else np.nan)
        self._cache = (key, float(total), grad.copy(), dict(self.last_terms))
        return float(total), grad

    def gradient(self, x: np.ndarray) -> np.ndarray:
        return self.cost_and_gradient(x)[1]
