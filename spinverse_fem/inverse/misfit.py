r"""Signal misfit of the reduced model and its exact gradient with respect to every kappa_f.

    J(kappa) = w / N  sum_c | S_c(kappa) / S0_c - T_c |^2      (c over the active measurements)

S0_c: the reference's b = 0 signal (normalisation "reference", as in the paper: a constant) or
the model's own b = 0 signal at the same echo time ("own": depends on kappa).

Gradient (derivation in docs/adjoint.md): with Lbar (K x K, symmetric), Wbar_i, nu0bar the
cotangents of the reduced generator Phi^T L Phi, W_i = Phi^T J_i Phi and nu0 = Phi^T M 1,

    G = 2 sum_i J_i Phi Wbar_i + (M 1) nu0bar^T                       (N x K)
    (L - lambda_k M) a_k = P^T g_k,  Phi^T M a_k = 0                  (k = 1..K)
    dJ/dkappa_f = sum_k (Phi Lbar - A)_k^T B_f phi_k                  (one face assembly)

No division by eigenvalue gaps appears: exactly degenerate eigenvalues are handled exactly.
The mode count K is fixed by the caller (per optimisation stage) so that J stays smooth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from spinverse_fem.inverse.complement_solver import ComplementSolver
from spinverse_fem.forward.eigenbasis import apply
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.forward.propagator import SequencePropagator, exp_divided_differences
from spinverse_fem.fem.sensitivity import FaceSensitivity

NORMALISATIONS = ("reference", "own")


def set_misfit_inputs(misfit, sequences, targets, weight, normalisation, s0_reference) -> None:
    """Check shapes and the normalisation choice, then set misfit.sequences, .targets (complex),
    .weight, .normalisation and .s0_reference (um^3 per sequence or None)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}")
    if normalisation == "reference" and s0_reference is None:
        raise ValueError("normalisation 'reference' needs s0_reference (um^3 per sequence)")
    sequences = list(sequences)
    targets = [np.asarray(t, dtype=complex) for t in targets]
    if len(targets) != len(sequences):
        raise ValueError(f"{len(targets)} targets for {len(sequences)} sequences")
    for seq, t in zip(sequences, targets):
        if t.shape != (seq.num_measurements,):
            raise ValueError(f"target for {seq.name!r} has shape {t.shape}, expected "
                             f"({seq.num_measurements},)")
    misfit.sequences, misfit.targets = sequences, targets
    misfit.weight = float(weight)
    misfit.normalisation = normalisation
    misfit.s0_reference = None if s0_reference is None else [float(s) for s in s0_reference]


@dataclass
class Counters:
    forward: int = 0
    adjoint: int = 0
    eigen_solves: int = 0
    linear_solves: int = 0          # right-hand sides through the adjoint preconditioner
    cg_iterations: int = 0
    timings: dict = field(default_factory=dict)


class SignalMisfit:
    """J(kappa) and dJ/dkappa for a set of sequences and target signals.

    model: ForwardModel; sequences: the active sequences; targets: list of (n_k,) complex S/S0;
    weight: w (paper: 100); normalisation: "reference" (needs s0_reference, um^3 per sequence)
    or "own"; num_modes: fixed mode count (None: the model's rule, re-evaluated each solve).
    """

    def __init__(self, model: ForwardModel, sequences, targets, *, weight: float = 1.0,
                 normalisation: str = "own", s0_reference=None, num_modes: int | None = None,
                 adjoint_rtol: float = 1e-8, taylor_tol: float = 2.0**-53):
        self.model = model
        set_misfit_inputs(self, sequences, targets, weight, normalisation, s0_reference)
        self.num_modes = num_modes
        # 1e-8: the gradient changes by ~1e-11 relative against 1e-11 (measured), far below the
        # 7e-8 agreement with finite differences, at about half the CG iterations
        self.adjoint_rtol = adjoint_rtol
        self.taylor_tol = taylor_tol
        self.num_measurements = sum(s.num_measurements for s in self.sequences)
        self.counters = Counters()
        self._sens = None
        self._cache_key = None
        self._state = None

    @property
    def comm(self) -> MPI.Comm:
        return self.model.comm

    # -- forward ---------------------------------------------------------------------------
    def _forward(self, kappa: np.ndarray):
        kappa = np.asarray(kappa, dtype=np.float64)
        key = kappa.tobytes()
        if self._cache_key == key:
            return self._state
        basis = self.model.eigenbasis(kappa, self.num_modes)
        self.counters.eigen_solves += 1
        ops = self.model.ops
        JPhi = [apply(J, basis.phi) for J in ops.J]
        W = np.stack([self.comm.allreduce(basis.phi.T @ jp, op=MPI.SUM) for jp in JPhi])
        W = 0.5 * (W + W.transpose(0, 2, 1))
        m1 = ops.mass_ones.getArray()
        nu0 = self.comm.allreduce(basis.phi.T @ m1, op=MPI.SUM)
        lam = basis.lam
        value = 0.0
        props, s0s, residuals, signals = [], [], [], []
        scale = self.weight / self.num_measurements
        for k, (seq, target) in enumerate(zip(self.sequences, self.targets)):
            prop = SequencePropagator(lam, W, nu0, seq.segments, seq.q_per_um_ms(),
                                      seq.directions, tol=self.taylor_tol)
            S = prop.signals()
            if self.normalisation == "own":
                s0 = float(np.sum(nu0**2 * np.exp(-seq.echo_time_ms * lam)))
            else:
                s0 = self.s0_reference[k]
            r = S / s0 - target
            value += scale * float(np.sum(np.abs(r) ** 2))
            props.append(prop)
            s0s.append(s0)
            residuals.append(r)
            signals.append(S / s0)
        self.counters.forward += 1
        self._state = dict(basis=basis, JPhi=JPhi, W=W, nu0=nu0, m1=m1, props=props, s0=s0s,
                           residuals=residuals, signals=signals, value=value)
        self._cache_key = key
        return self._state

    def clear_cache(self) -> None:
        """Forget the cached forward state (the next call re-solves the eigenproblem)."""
        self._cache_key = None
        self._state = None

    def objective(self, kappa: np.ndarray) -> float:
        return self._forward(kappa)["value"]

    def signals(self, kappa: np.ndarray) -> list[np.ndarray]:
        """Normalised model signals S/S0 per sequence at kappa."""
        return self._forward(kappa)["signals"]

    # -- adjoint ---------------------------------------------------------------------------
    def reduced_cotangents(self, kappa):
        """(Lbar (K,K), Wbar (3,K,K), nu0bar (K,)): dJ with respect to the reduced quantities."""
        st = self._forward(kappa)
        lam, nu0 = st["basis"].lam, st["nu0"]
        K = lam.size
        Lbar, Wbar, nbar = np.zeros((K, K)), np.zeros((3, K, K)), np.zeros(K)
        scale = self.weight / self.num_measurements
        for seq, prop, s0, r, S in zip(self.sequences, st["props"], st["s0"], st["residuals"],
                                       st["signals"]):
            shat_bar = 2.0 * scale * r                   # cotangent of S/S0
            lb, wb, nb = prop.vjp(shat_bar / s0, full_lam=True)
            Lbar += lb
            Wbar += wb
            nbar += nb
            if self.normalisation == "own":
                # S0 = nu0^T exp(-TE Lambda) nu0 also depends on kappa
                s0_bar = -float(np.sum(np.real(np.conj(shat_bar) * S))) / s0
                te = seq.echo_time_ms
                Lbar += s0_bar * np.outer(nu0, nu0) * exp_divided_differences(lam, te)
                nbar += s0_bar * 2.0 * nu0 * np.exp(-te * lam)
        return 0.5 * (Lbar + Lbar.T), Wbar, nbar

    def objective_and_gradient(self, kappa: np.ndarray) -> tuple[float, np.ndarray]:
        """(J, dJ/dkappa (F,) in 1/(um/ms), canonical face order, replicated)."""
        st = self._forward(kappa)
        basis = st["basis"]
        phi = basis.phi
        Lbar, Wbar, nbar = self.reduced_cotangents(kappa)
        G = 2.0 * sum(st["JPhi"][i] @ Wbar[i] for i in range(3)) + np.outer(st["m1"], nbar)
        ops = self.model.ops
        solver = ComplementSolver(ops.L, ops.M, basis.lam, phi, basis.extra_lam, basis.extra_phi,
                                  sigma=basis.sigma, rtol=self.adjoint_rtol)
        try:
            A = solver.solve(G)
        finally:
            solver.destroy()
        self.counters.linear_solves += solver.solves
        self.counters.cg_iterations += solver.iterations
        if self._sens is None:
            self._sens = FaceSensitivity(ops)
        grad = self._sens(phi @ Lbar - A, phi)
        self.counters.adjoint += 1
        return st["value"], grad

    def gradient(self, kappa: np.ndarray) -> np.ndarray:
        return self.objective_and_gradient(kappa)[1]
