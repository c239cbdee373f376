r"""Signal misfits and their exact gradients with respect to every kappa_f.

    J(kappa) = w / N  sum_c | S_c(kappa) / S0_k - T_c |^2      (c over the active measurements,
                                                                k the sequence of c)

With `noise_sigma` (sigma = 1/SNR per real and imaginary component of the noise, relative to
S0 = 1) the model is compared as a Rician magnitude: the residual is
p_c - |T_c| with p_c = sqrt(|S_c / S0_k|^2 + 2 sigma^2), the root of E|S + n|^2 (magnitude
data carry that bias: fitting |S| to them reads a noise floor as slow diffusion).

S0_k: the reference's b = 0 signal of sequence k (normalisation "reference", as in the paper: a
constant in um^3) or the model's own b = 0 signal at the same echo time ("own": depends on
kappa). Two forward models give S_c: the reduced (eigenbasis) model, `ReducedMisfit`, and the
full-order Crank-Nicolson model, `FullOrderMisfit`. Both share `SignalMisfit`: the input checks,
the residuals, and the cotangents of the normalised signals,

    Sbar_c     = 2 w / N (S_c / S0_k - T_c) / S0_k                  (dJ/dRe S_c + i dJ/dIm S_c)
    dJ/dS0_k   = -(1 / S0_k) sum_c Re( conj(2 w / N r_c) S_c / S0_k )   ("own" only).

Reduced gradient (derivation in docs/adjoint.md): with Lbar (K x K, symmetric), Wbar_i, nu0bar
the cotangents of the reduced generator Phi^T L Phi, W_i = Phi^T J_i Phi and nu0 = Phi^T M 1,

    G = 2 sum_i J_i Phi Wbar_i + (M 1) nu0bar^T                       (N x K)
    (L - lambda_k M) a_k = P^T g_k,  Phi^T M a_k = 0                  (k = 1..K)
    dJ/dkappa_f = sum_k (Phi Lbar - A)_k^T B_f phi_k                  (one face assembly)

No division by eigenvalue gaps appears: exactly degenerate eigenvalues are handled exactly.
The mode count K is fixed by the caller (per optimisation stage) so that J stays smooth.

Full-order gradient: with "own" normalisation S0_k is computed by the same Crank-Nicolson
recursion as the signals, by appending one b = 0 measurement to sequence k (gradient vector 0:
the cheap real N x N path), so it is exactly the model's discrete b = 0 signal and its
sensitivity enters the same adjoint sweep through the appended row's real cotangent dJ/dS0_k.

All methods are collective; kappa (F,) in um/ms must be identical on every rank; gradients are
dJ/dkappa (F,) in 1/(um/ms), canonical face order, replicated.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from spinverse_fem.errors import SolverError
from spinverse_fem.fem.sensitivity import CellSensitivity, FaceSensitivity
from spinverse_fem.forward.full_order import FullOrderModel, with_b0_row
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.forward.propagator import exp_divided_differences
from spinverse_fem.forward.reduced_model import (
    DistributedPropagator,
    b0_signal,
    project_with_products,
    shifted,
)
from spinverse_fem.inverse.complement_solver import ComplementSolver

NORMALISATIONS = ("reference", "own")


@dataclass
class Counters:
    """Work done by a misfit: evaluations, solves, and wall time per phase (s)."""

    forward: int = 0
    adjoint: int = 0
    eigen_solves: int = 0
    linear_solves: int = 0          # right-hand sides through the adjoint preconditioner
    cg_iterations: int = 0
    timings: dict = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class ModeCut:
    """Where the reduced model cuts the spectrum at the last evaluation: K, lambda_K and
    lambda_{K+1} (1/ms; None if not computed), g_K = relative gap (`forward.mode_selection`)."""

    modes: int
    lam_k: float
    lam_next: float | None
    rel_gap: float


class SignalMisfit:
    """What every signal misfit shares: targets, weight, normalisation, residuals, cotangents.

    sequences: the active sequences; targets: list of (n_k,) complex S/S0; weight: w (paper:
    100); normalisation: "reference" (needs s0_reference, um^3 per sequence) or "own";
    noise_sigma: None (least squares on S/S0) or sigma = 1/SNR > 0 (the Rician magnitude
    model of the module docstring).
    Subclasses implement `_signals(kappa) -> (S per sequence (n_k,) um^3, S0 per sequence)` and
    `_gradient(kappa, state) -> dJ/dkappa`.
    """

    num_modes: int | None = None
    last_cut: ModeCut | None = None   # reduced models: the spectrum cut of the last evaluation

    def __init__(self, sequences, targets, *, weight: float, normalisation: str,
                 s0_reference, noise_sigma: float | None = None):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}")
        if normalisation == "reference" and s0_reference is None:
            raise ValueError("normalisation 'reference' needs s0_reference (um^3 per sequence)")
        self.sequences = list(sequences)
        self.targets = [np.asarray(t, dtype=complex) for t in targets]
        if len(self.targets) != len(self.sequences):
            raise ValueError(f"{len(self.targets)} targets for {len(self.sequences)} sequences")
        for seq, t in zip(self.sequences, self.targets):
            if t.shape != (seq.num_measurements,):
                raise ValueError(f"target for {seq.name!r} has shape {t.shape}, expected "
                                 f"({seq.num_measurements},)")
        self.weight = float(weight)
        self.normalisation = normalisation
        self.s0_reference = None if s0_reference is None else [float(s) for s in s0_reference]
        self.num_measurements = sum(s.num_measurements for s in self.sequences)
        if noise_sigma is not None and not (np.isfinite(noise_sigma) and noise_sigma > 0):
            raise ValueError(f"noise_sigma must be a positive number, got {noise_sigma!r}")
        self.noise_sigma = None if noise_sigma is None else float(noise_sigma)
        self.counters = Counters()
        self._cache_key = None
        self._state = None

    @property
    def scale(self) -> float:
        """w / N: the weight of one squared residual."""
        return self.weight / self.num_measurements

    def _evaluate(self, kappa: np.ndarray) -> dict:
        """The forward state at kappa (cached: the gradient reuses the cost's solve)."""
        kappa = np.asarray(kappa, dtype=np.float64)
        key = (kappa.tobytes(), self._version())
        if self._cache_key == key:
            return self._state
        state = self._signals(kappa)
        value, residuals, signals, directions = 0.0, [], [], []
        for S, s0, target in zip(state["S"], state["s0"], self.targets):
            shat = S / s0
            if self.noise_sigma is None:
                r = shat - target
                directions.append(None)
            else:
                p = np.sqrt(np.abs(shat) ** 2 + 2.0 * self.noise_sigma**2)
                r = p - np.abs(target)
                directions.append(shat / p)        # d p = Re(conj(shat / p) d shat)
            value += self.scale * float(np.sum(np.abs(r) ** 2))
            residuals.append(r)
            signals.append(shat)
        if not np.isfinite(value):
            raise SolverError("the misfit is not finite: the model's signals or S0 under- or "
                              "overflowed (check T2, the echo times and the permeabilities)")
        state.update(value=value, residuals=residuals, signals=signals, kappa=kappa,
                     directions=directions)
        self.counters.forward += 1
        self._state, self._cache_key = state, key
        return state

    def output_cotangents(self, state: dict, k: int) -> tuple[np.ndarray, float | None]:
        """(Sbar (n_k,) = dJ/dRe S + i dJ/dIm S in 1/um^3, dJ/dS0_k or None for "reference")."""
        shat_bar = 2.0 * self.scale * state["residuals"][k]      # cotangent of S / S0
        if state["directions"][k] is not None:                     # Rician magnitude model
            shat_bar = shat_bar * state["directions"][k]
        s0 = state["s0"][k]
        if self.normalisation != "own":
            return shat_bar / s0, None
        s0_bar = -float(np.sum(np.real(np.conj(shat_bar) * state["signals"][k]))) / s0
        return shat_bar / s0, s0_bar

    def _version(self) -> int:
        """Changes when the model's operators change other than through kappa (cache key)."""
        return 0

    # -- the functional --------------------------------------------------------------------
    def cost(self, kappa: np.ndarray) -> float:
        """J(kappa) (dimensionless)."""
        return self._evaluate(kappa)["value"]

    def signals(self, kappa: np.ndarray) -> list[np.ndarray]:
        """Normalised model signals S/S0 per sequence at kappa."""
        return self._evaluate(kappa)["signals"]

    def cost_and_gradient(self, kappa: np.ndarray) -> tuple[float, np.ndarray]:
        """(J, dJ/dkappa (F,) in 1/(um/ms), canonical face order, replicated)."""
        state = self._evaluate(kappa)
        grad = self._gradient(np.asarray(kappa, dtype=np.float64), state)
        self.counters.adjoint += 1
        return state["value"], grad

    def gradient(self, kappa: np.ndarray) -> np.ndarray:
        return self.cost_and_gradient(kappa)[1]



class ReducedMisfit(SignalMisfit):
    """The misfit of the reduced (eigenbasis) model.

    model: ForwardModel; num_modes: fixed mode count (None: the model's rule, re-evaluated each
    solve); adjoint_rtol: relative tolerance of the complement CG; taylor_tol: tolerance of the
    dense exponential actions (2^-53: exact to round-off, for Taylor tests).
    """

    def __init__(self, model: ForwardModel, sequences, targets, *, weight: float = 1.0,
                 normalisation: str = "own", s0_reference=None, num_modes: int | None = None,
                 adjoint_rtol: float = 1e-8, taylor_tol: float = 2.0**-53,
                 noise_sigma: float | None = None):
        super().__init__(sequences, targets, weight=weight, normalisation=normalisation,
                         s0_reference=s0_reference, noise_sigma=noise_sigma)
        self.model = model
        self.num_modes = num_modes
        # 1e-8: the gradient changes by ~1e-11 relative against 1e-11 (measured), far below the
        # 7e-8 agreement with finite differences, at about half the CG iterations
        self.adjoint_rtol = adjoint_rtol
        self.taylor_tol = taylor_tol
        self._sens = None

    @property
    def comm(self) -> MPI.Comm:
        return self.model.comm

    def set_num_modes(self, num_modes: int) -> None:
        """Change the fixed mode count (a re-selection: the objective changes here)."""
        self.num_modes = int(num_modes)
        self._cache_key = self._state = None
        self.last_cut = None    # the next evaluation reports the new cut

    def freeze_modes(self, kappa: np.ndarray) -> int:
        """Solve at kappa with the current rule (the [eigen] rule, or num_modes), then fix K to
        the count found: J is smooth in kappa only at a fixed K. Returns K."""
        self.num_modes = int(self._evaluate(kappa)["basis"].num_modes)
        return self.num_modes

    def _signals(self, kappa: np.ndarray) -> dict:
        with self.counters.timed("eigen"):
            basis = self.model.eigenbasis(kappa, self.num_modes)
        self.counters.eigen_solves += 1
        self.last_cut = ModeCut(basis.num_modes, float(basis.lam[-1]), basis.next_lam,
                                basis.rel_gap)
        with self.counters.timed("projection"):
            system, products = project_with_products(self.model.ops, basis)
        state = self._propagate(system)
        state.update(basis=basis, products=products)
        return state

    def _propagate(self, system) -> dict:
        """Signals and S0 of every sequence on a reduced system (the propagators are kept for
        the VJP)."""
        # "own": S and S0 on Lambda - lambda_1 I (both scaled by exp(TE lambda_1), the ratio
        # and its gradient unchanged, nothing underflows); "reference" needs S in um^3
        own = self.normalisation == "own"
        prop_system = shifted(system) if own else system
        props, S, s0 = [], [], []
        with self.counters.timed("propagation"):
            for k, seq in enumerate(self.sequences):
                prop = DistributedPropagator(self.comm, prop_system, seq, tol=self.taylor_tol)
                props.append(prop)
                S.append(prop.signals())
                s0.append(b0_signal(prop_system, seq.echo_time_ms) if own
                          else self.s0_reference[k])
        return dict(system=system, prop_system=prop_system, props=props, S=S, s0=s0)

    def reduced_cotangents(self, kappa) -> tuple[np.ndarray, ...]:
        """(Lbar (K,K), Wbar (3,K,K), nu0bar (K,), abar (K,) or None): dJ with respect to the
        reduced quantities; abar, the read-out's, only with a non-uniform spin density (else
        it is part of nu0bar)."""
        st = self._evaluate(kappa)
        system = st["prop_system"]
        lam, nu0 = system.lam, system.nu0
        separate = system.readout is not None
        a = system.readout if separate else nu0
        K = lam.size
        Lbar, Wbar, nbar, abar = np.zeros((K, K)), np.zeros((3, K, K)), np.zeros(K), np.zeros(K)
        with self.counters.timed("propagation_vjp"):
            for k, (seq, prop) in enumerate(zip(self.sequences, st["props"])):
                sbar, s0_bar = self.output_cotangents(st, k)
                lb, wb, nb, *ab = prop.vjp(sbar, full_lam=True)
                Lbar += lb
                Wbar += wb
                nbar += nb
                if separate:
                    abar += ab[0]
                if s0_bar is not None:
                    # S0 = a^T exp(-TE Lambda) nu0 also depends on kappa
                    te = seq.echo_time_ms
                    e = np.exp(-te * lam)
                    Lbar += s0_bar * np.outer(a, nu0) * exp_divided_differences(lam, te)
                    nbar += s0_bar * a * e
                    if separate:
                        abar += s0_bar * nu0 * e
                    else:
                        nbar += s0_bar * nu0 * e
        return 0.5 * (Lbar + Lbar.T), Wbar, nbar, (abar if separate else None)

    def _adjoint_pair(self, st: dict) -> tuple[np.ndarray, np.ndarray]:
        """(X, Phi), X = Phi Lbar - A (n_owned, K): dJ = sum_k x_k^T dL phi_k for any change dL
        of L at fixed M, J (kappa, D or 1/T2); A from the complement solves. Cached."""
        if "adjoint_x" in st:
            return st["adjoint_x"], st["basis"].phi
        basis, products = st["basis"], st["products"]
        phi = basis.phi
        Lbar, Wbar, nbar, abar = self.reduced_cotangents(st["kappa"])
        # nu0 = Phi^T M rho and a = Phi^T M 1 (one vector when rho is uniform)
        G = 2.0 * sum(products.JPhi[i] @ Wbar[i] for i in range(3))
        if abar is None:
            G += np.outer(products.m1, nbar)
        else:
            G += np.outer(products.m_init, nbar) + np.outer(products.m1, abar)
        ops = self.model.ops
        with self.counters.timed("adjoint_solve"):
            solver = ComplementSolver(ops.L, ops.M, basis.lam, phi, basis.extra_lam,
                                      basis.extra_phi, sigma=basis.sigma, rtol=self.adjoint_rtol)
            try:
                A = solver.solve(G)
            finally:
                solver.destroy()
        self.counters.linear_solves += solver.solves
        self.counters.cg_iterations += solver.iterations
        st["adjoint_x"] = phi @ Lbar - A
        return st["adjoint_x"], phi

    def _gradient(self, kappa: np.ndarray, st: dict) -> np.ndarray:
        X, phi = self._adjoint_pair(st)
        with self.counters.timed("sensitivity"):
            if self._sens is None:
                self._sens = FaceSensitivity(self.model.ops)
            return self._sens(X, phi)

    def set_tissue(self, diffusivity_um2_per_ms=None, relaxation_per_ms=None) -> None:
        """Change D (um^2/ms) and / or 1/T2 (1/ms) per tetrahedron (`ops.set_tissue`); the
        next evaluation solves anew (the operators' tissue version is part of the cache key;
        unchanged values change nothing)."""
        self.model.ops.set_tissue(diffusivity_um2_per_ms, relaxation_per_ms)

    def _version(self) -> int:
        return self.model.ops.tissue_version

    def tissue_gradient(self, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dJ/dD_t in ms/um^2, dJ/dr_t in ms) per tetrahedron t (input order, replicated),
        r = 1/T2: the same adjoint as the kappa gradient, paired cell by cell
        (`fem.sensitivity.CellSensitivity`). At a fixed mode count this is the exact
        derivative of the model evaluated."""
        st = self._evaluate(kappa)
        X, phi = self._adjoint_pair(st)
        with self.counters.timed("sensitivity"):
            if getattr(self, "_cell_sens", None) is None:
                self._cell_sens = CellSensitivity(self.model.ops)
            return self._cell_sens(X, phi)


class FullOrderMisfit(SignalMisfit):
    """The misfit of the full-order Crank-Nicolson model (no modal reduction).

    model: FullOrderModel. Cost: `cost` is one forward sweep per sequence; the gradient needs
    the signals before it can form the cotangents, so it is one forward sweep (reused if `cost`
    was just called at the same kappa) plus one forward-and-backward sweep per sequence.
    """

    def __init__(self, model: FullOrderModel, sequences, targets, *, weight: float = 1.0,
                 normalisation: str = "own", s0_reference=None,
                 noise_sigma: float | None = None):
        super().__init__(sequences, targets, weight=weight, normalisation=normalisation,
                         s0_reference=s0_reference, noise_sigma=noise_sigma)
        self.model = model
        # the sequences actually simulated (with the b = 0 row for "own")
        self._sim = [with_b0_row(s) if normalisation == "own" else s for s in self.sequences]

    @property
    def comm(self) -> MPI.Comm:
        return self.model.comm

    def _signals(self, kappa: np.ndarray) -> dict:
        with self.counters.timed("forward"):
            raw = [self.model.signals(seq, kappa=kappa) for seq in self._sim]
        S, s0 = [], []
        for k, seq in enumerate(self.sequences):
            n = seq.num_measurements
            if self.normalisation == "own":
                S.append(raw[k][:n])
                s0.append(float(raw[k][n].real))
            else:
                S.append(raw[k])
                s0.append(self.s0_reference[k])
        return dict(S=S, s0=s0)

    def cotangents(self, kappa: np.ndarray) -> list[np.ndarray]:
        """Per simulated sequence, Sbar = dJ/dRe S + i dJ/dIm S of its rows (incl. the b = 0 row
        for "own")."""
        st = self._evaluate(kappa)
        out = []
        for k in range(len(self.sequences)):
            sbar, s0_bar = self.output_cotangents(st, k)
            out.append(sbar if s0_bar is None else np.append(sbar, s0_bar + 0.0j))
        return out

    def _gradient(self, kappa: np.ndarray, st: dict) -> np.ndarray:
        grad = None
        with self.counters.timed("adjoint"):
            for seq, sbar in zip(self._sim, self.cotangents(kappa)):
                _, g = self.model.signals_and_vjp(seq, sbar, kappa=kappa)
                grad = g if grad is None else grad + g
        return grad
