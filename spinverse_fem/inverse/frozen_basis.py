r"""The misfit of the reduced model on a frozen (Galerkin) basis, with its exact gradient.

The eigenbasis misfit (`inverse.misfit.ReducedMisfit`) solves the eigenproblem at every kappa
and pays, in its adjoint, one complement solve per mode. Here the basis Phi_0 (K modes,
M-orthonormal) is computed once, at a refresh point kappa_0, and then held fixed: the model at
any kappa is the Galerkin projection of the Bloch-Torrey operator on span(Phi_0),

    L_r(kappa) = Phi_0^T L(kappa) Phi_0  (K x K, 1/ms),   W_i = Phi_0^T J_i Phi_0,
    nu0 = Phi_0^T M 1,                                      (fixed between refreshes)

    L_r = U Lambda U^T   (dense eigh),   the propagator runs on (Lambda, U^T W_i U, U^T nu0).

At kappa = kappa_0, L_r = diag(lambda) and the model is the eigenbasis model exactly; away from
it, it is the Rayleigh-Ritz model of the old subspace (eigenvalues are upper bounds). This is the
paper's "refresh the basis every 10 iterations and project in between", made exact for the model
that is actually evaluated:

    dJ/dkappa_f = sum_ij Lbar_ij (Phi_0^T B_f Phi_0)_ij,   Lbar = U Lbar' U^T,

Lbar' (K x K) the propagator's cotangent of its (full) generator in the rotated basis. The signals
are invariant under the choice of U (f(Q^T L Q, Q^T W Q, Q^T nu0) = f(L, W, nu0) for orthogonal Q),
so degenerate eigenvalues of L_r need no care, no eigenvalue gap enters, and J is smooth (analytic)
in kappa between refreshes: no mode cut can close inside an interval. W and nu0 do not depend on
kappa, so there is no complement solve: the gradient costs one propagator VJP and one face
assembly, the evaluation one sparse projection, one K x K eigh and the propagation.

Derivation and measured accuracy against the eigenbasis model: docs/frozen_basis.md.
"""

from __future__ import annotations

import warnings

import numpy as np

from spinverse_fem.fem.sensitivity import FaceSensitivity
from spinverse_fem.forward.eigenbasis import gram
from spinverse_fem.forward.reduced_model import ReducedSystem, project_with_products
from spinverse_fem.inverse.misfit import ModeCut, ReducedMisfit


class FrozenBasisMisfit(ReducedMisfit):
    """`ReducedMisfit` on a basis frozen at the last `refresh(kappa0)` (see the module docstring).

    The first evaluation without a basis refreshes at the kappa it is asked for; `set_num_modes`
    drops the basis (the next evaluation, or an explicit refresh, computes a new one). Same
    arguments as `ReducedMisfit` (adjoint_rtol is unused: there is no complement solve).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen = None      # dict(phi, W, nu0, volume, kappa, cut) of the last refresh
        self.refreshes = 0

    @property
    def basis_kappa(self) -> np.ndarray | None:
        """kappa_0 (F,) um/ms of the current basis, or None."""
        return None if self._frozen is None else self._frozen["kappa"]

    def set_num_modes(self, num_modes: int) -> None:
        super().set_num_modes(num_modes)
        self._frozen = None

    def refresh(self, kappa: np.ndarray) -> int:
        """Solve the eigenproblem at kappa (the fixed mode count, or the [eigen] rule if none)
        and freeze its K modes (collective). Returns K. The objective changes here."""
        kappa = np.array(kappa, dtype=np.float64, copy=True)
        with self.counters.timed("eigen"), warnings.catch_warnings():
            # the cap was announced when the stage chose K; not again at every refresh
            warnings.filterwarnings("ignore", message=".*eigenvalues lie below the cutoff")
            basis = self.model.eigenbasis(kappa, self.num_modes)
        self.counters.eigen_solves += 1
        with self.counters.timed("projection"):
            system, products = project_with_products(self.model.ops, basis)
        self._frozen = dict(phi=basis.phi, W=system.W, nu0=system.nu0, volume=system.volume,
                            readout=system.readout,
                            kappa=kappa, products=products,
                            cut=ModeCut(basis.num_modes, float(basis.lam[-1]), basis.next_lam,
                                        basis.rel_gap))
        self.last_cut = self._frozen["cut"]
        self.refreshes += 1
        self._cache_key = self._state = None
        return basis.num_modes

    def _signals(self, kappa: np.ndarray) -> dict:
        if self._frozen is None:
            self.refresh(kappa)
        fr = self._frozen
        self.last_cut = fr["cut"]
        ops = self.model.ops
        phi = fr["phi"]
        with self.counters.timed("projection"):
            ops.set_kappa(kappa)
            Lr = gram(phi, ops.L, phi, self.comm)
            # eigh of the replicated (identical on every rank) matrix: the same U everywhere
            lam, U = np.linalg.eigh(0.5 * (Lr + Lr.T))
            W = np.einsum("ka,ikl,lb->iab", U, fr["W"], U, optimize=True)
            system = ReducedSystem(lam=lam, W=0.5 * (W + W.transpose(0, 2, 1)),
                                   nu0=U.T @ fr["nu0"], volume=fr["volume"],
                                   readout=(None if fr["readout"] is None
                                            else U.T @ fr["readout"]))
        state = self._propagate(system)
        state.update(U=U, phi=phi)
        return state

    def _adjoint_pair(self, st: dict) -> tuple[np.ndarray, np.ndarray]:
        """(Phi0 Lbar, Phi0): the Galerkin model's L_r = Phi0^T L Phi0 is linear in L, so
        dJ = sum_k (Phi0 Lbar)_k^T dL phi0_k with no complement solve."""
        if "adjoint_x" not in st:
            Lbar_rot = self.reduced_cotangents(st["kappa"])[0]
            U, phi = st["U"], st["phi"]
            st["adjoint_x"] = phi @ (U @ Lbar_rot @ U.T)
        return st["adjoint_x"], st["phi"]

    def _gradient(self, kappa: np.ndarray, st: dict) -> np.ndarray:
        X, phi = self._adjoint_pair(st)
        with self.counters.timed("sensitivity"):
            if self._sens is None:
                self._sens = FaceSensitivity(self.model.ops)
            return self._sens(X, phi)
