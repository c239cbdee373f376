r"""The matrix-formalism (reduced) model: project the sparse system on the Laplace eigenbasis.

With m = Phi nu and Phi^T M Phi = I the semi-discrete system becomes

    d nu/dt = -(Lambda + i q f(t) sum_i g_i W_i) nu,   nu(0) = nu0,
    W_i = Phi^T J_i Phi (um),   nu0 = Phi^T M rho (um^{3/2}),   S = a^T nu(TE) (um^3),
    a = Phi^T M 1 (the read-out; a = nu0 when the spin density rho is uniform, 1),

a small dense K x K problem solved by `forward.propagator`. S0 (b = 0) is a^T e^{-TE Lambda} nu0
(`b0_signal`). `simulate` and the misfits both go through
`project_with_products` and `propagator`: there is one forward path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from spinverse_fem.fem.operators import BlochTorreyOperators
from spinverse_fem.forward.eigenbasis import Eigenbasis, apply
from spinverse_fem.forward.propagator import UNIT_ROUNDOFF, SequencePropagator


@dataclass(frozen=True)
class ReducedSystem:
    """lam (K,) 1/ms; W (3, K, K) um; nu0 (K,) um^{3/2} the initial state; volume um^3;
    readout (K,) um^{3/2} the read-out vector a, or None when it is nu0 (uniform spin
    density). Replicated on all ranks."""

    lam: np.ndarray
    W: np.ndarray
    nu0: np.ndarray
    volume: float
    readout: np.ndarray | None = None

    @property
    def num_modes(self) -> int:
        return int(self.lam.shape[0])


@dataclass(frozen=True)
class Products:
    """Distributed products of a projection that the adjoint reuses (local owned rows):
    JPhi: the three J_i Phi (n_owned, K) in um; m1: M 1 (n_owned,) in um^3; m_init: M rho
    (n_owned,) in um^3, or None when the spin density is uniform (it is m1)."""

    JPhi: list
    m1: np.ndarray
    m_init: np.ndarray | None = None


def project_with_products(ops: BlochTorreyOperators, basis: Eigenbasis
                          ) -> tuple[ReducedSystem, Products]:
    """The reduced system and the distributed products J_i Phi, M 1 it was built from
    (collective)."""
    comm = ops.comm
    phi = basis.phi
    JPhi = [apply(J, phi) for J in ops.J]
    W = np.stack([comm.allreduce(phi.T @ jp, op=MPI.SUM) for jp in JPhi])
    W = 0.5 * (W + W.transpose(0, 2, 1))
    m1 = ops.mass_ones.getArray()
    a = comm.allreduce(phi.T @ m1, op=MPI.SUM)
    if ops.mass_initial is None:
        return (ReducedSystem(lam=basis.lam.copy(), W=W, nu0=a, volume=ops.volume()),
                Products(JPhi=JPhi, m1=m1))
    m_init = ops.mass_initial.getArray()
    nu0 = comm.allreduce(phi.T @ m_init, op=MPI.SUM)
    return (ReducedSystem(lam=basis.lam.copy(), W=W, nu0=nu0, volume=ops.volume(), readout=a),
            Products(JPhi=JPhi, m1=m1, m_init=m_init))


def project(ops: BlochTorreyOperators, basis: Eigenbasis) -> ReducedSystem:
    """Projections of the moment and mass operators on the eigenbasis (collective)."""
    return project_with_products(ops, basis)[0]


def propagator(system: ReducedSystem, sequence, tol: float = UNIT_ROUNDOFF
               ) -> SequencePropagator:
    """The dense propagator of one sequence on the reduced system (signals and their VJP)."""
    return SequencePropagator(system.lam, system.W, system.nu0, sequence.segments,
                              sequence.q_per_um_ms(), sequence.directions,
                              readout=system.readout, tol=tol)


def split_measurements(sequence, parts: int) -> list[np.ndarray]:
    """The measurement indices of `sequence` in `parts` groups of about equal propagation cost
    (ascending indices in each). Columns with q = 0 cost nothing (closed form) and are spread
    evenly; the others are ordered by direction (up to sign) and then q, and cut into
    contiguous runs of equal count, so that columns sharing a direction, which the propagator
    batches together, mostly stay on one rank."""
    q = np.asarray(sequence.q_per_um_ms(), dtype=float)
    d = np.asarray(sequence.directions, dtype=float)
    # direction up to sign: make the first nonzero component positive
    sgn = np.sign(d[np.arange(d.shape[0]), np.argmax(np.abs(d) > 1e-12, axis=1)])
    key = np.round(d * sgn[:, None], 12)
    moving = np.flatnonzero(q != 0.0)
    order = moving[np.lexsort((q[moving], key[moving, 2], key[moving, 1], key[moving, 0]))]
    still = np.flatnonzero(q == 0.0)
    return [np.sort(np.concatenate([chunk, still[i::parts]])).astype(np.int64)
            for i, chunk in enumerate(np.array_split(order, parts))]


class DistributedPropagator:
    """The propagator of one sequence with its measurements split over the ranks of `comm`
    (`split_measurements`): each rank propagates its own columns; `signals` gathers all of
    them (replicated, in the sequence's order) and `vjp` sums the ranks' cotangents. The dense
    exponential actions, replicated work otherwise, so scale with the rank count; the results
    equal the one-rank propagator's up to the summation order of the cotangents."""

    def __init__(self, comm, system: ReducedSystem, sequence, tol: float = UNIT_ROUNDOFF):
        self.comm = comm
        self.n = int(sequence.num_measurements)
        parts = split_measurements(sequence, comm.size)
        self.index = parts[comm.rank]
        q = np.asarray(sequence.q_per_um_ms(), dtype=float)[self.index]
        dirs = np.asarray(sequence.directions, dtype=float)[self.index]
        self._parts = parts
        self._prop = (SequencePropagator(system.lam, system.W, system.nu0, sequence.segments,
                                         q, dirs, readout=system.readout, tol=tol)
                      if self.index.size else None)
        self._K = system.num_modes
        self._separate = system.readout is not None

    def signals(self) -> np.ndarray:
        """S (n,) complex in um^3, replicated on every rank."""
        local = (self._prop.signals() if self._prop is not None
                 else np.zeros(0, dtype=np.complex128))
        if self.comm.size == 1:
            return local
        S = np.empty(self.n, dtype=np.complex128)
        for idx, part in zip(self._parts, self.comm.allgather(local)):
            S[idx] = part
        return S

    def vjp(self, S_bar, full_lam: bool = False):
        """`SequencePropagator.vjp` of the whole sequence: S_bar (n,) replicated; returns the
        summed (lam_bar, W_bar, nu0_bar[, readout_bar]), replicated."""
        K = self._K
        if self._prop is not None:
            out = self._prop.vjp(np.asarray(S_bar)[self.index], full_lam=full_lam)
        else:
            out = (np.zeros((K, K) if full_lam else K), np.zeros((3, K, K)), np.zeros(K))
            out += (np.zeros(K),) if self._separate else ()
        if self.comm.size == 1:
            return out
        packed = self.comm.allreduce(np.concatenate([x.ravel() for x in out]), op=MPI.SUM)
        ends = np.cumsum([x.size for x in out])[:-1]
        return tuple(p.reshape(x.shape) for p, x in zip(np.split(packed, ends), out))


def reduced_signals(system: ReducedSystem, sequence) -> np.ndarray:
    """(n,) complex signals S_c (um^3) of one sequence (unnormalised)."""
    return propagator(system, sequence).signals()


def shifted(system: ReducedSystem) -> ReducedSystem:
    """The system with Lambda - lambda_1 I: every signal (S and S0 alike) is multiplied by
    exp(TE lambda_1), so S/S0 is unchanged while neither underflows (a short T2 or a long echo
    time with a sink at the outer faces makes exp(-TE lambda_1) underflow)."""
    return ReducedSystem(lam=system.lam - system.lam[0], W=system.W, nu0=system.nu0,
                         volume=system.volume, readout=system.readout)


def b0_signal(system: ReducedSystem, echo_time_ms: float) -> float:
    """S0 = a^T exp(-TE Lambda) nu0 (um^3): the b = 0 signal at the echo time."""
    a = system.nu0 if system.readout is None else system.readout
    return float(np.sum(a * system.nu0 * np.exp(-echo_time_ms * system.lam)))
