r"""The matrix-formalism (reduced) model: project the sparse system on the Laplace eigenbasis.

With m = Phi nu and Phi^T M Phi = I the semi-discrete system becomes

    d nu/dt = -(Lambda + i q f(t) sum_i g_i W_i) nu,   nu(0) = nu0,
    W_i = Phi^T J_i Phi (um),   nu0 = Phi^T M 1 (um^{3/2}),   S = nu0^T nu(TE) (um^3),

a small dense K x K problem solved by `forward.propagator`. S0 (b = 0) is nu0^T e^{-TE Lambda} nu0
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
    """lam (K,) 1/ms; W (3, K, K) um; nu0 (K,) um^{3/2}; volume um^3 (replicated on all ranks)."""

    lam: np.ndarray
    W: np.ndarray
    nu0: np.ndarray
    volume: float

    @property
    def num_modes(self) -> int:
        return int(self.lam.shape[0])


@dataclass(frozen=True)
class Products:
    """Distributed products of a projection that the adjoint reuses (local owned rows):
    JPhi: the three J_i Phi (n_owned, K) in um; m1: M 1 (n_owned,) in um^3."""

    JPhi: list
    m1: np.ndarray


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
    nu0 = comm.allreduce(phi.T @ m1, op=MPI.SUM)
    system = ReducedSystem(lam=basis.lam.copy(), W=W, nu0=nu0, volume=ops.volume())
    return system, Products(JPhi=JPhi, m1=m1)


def project(ops: BlochTorreyOperators, basis: Eigenbasis) -> ReducedSystem:
    """Projections of the moment and mass operators on the eigenbasis (collective)."""
    return project_with_products(ops, basis)[0]


def propagator(system: ReducedSystem, sequence, tol: float = UNIT_ROUNDOFF
               ) -> SequencePropagator:
    """The dense propagator of one sequence on the reduced system (signals and their VJP)."""
    return SequencePropagator(system.lam, system.W, system.nu0, sequence.segments,
                              sequence.q_per_um_ms(), sequence.directions, tol=tol)


def reduced_signals(system: ReducedSystem, sequence) -> np.ndarray:
    """(n,) complex signals S_c (um^3) of one sequence (unnormalised)."""
    return propagator(system, sequence).signals()


def shifted(system: ReducedSystem) -> ReducedSystem:
    """The system with Lambda - lambda_1 I: every signal (S and S0 alike) is multiplied by
    exp(TE lambda_1), so S/S0 is unchanged while neither underflows (a short T2 or a long echo
    time with a sink at the outer faces makes exp(-TE lambda_1) underflow)."""
    return ReducedSystem(lam=system.lam - system.lam[0], W=system.W, nu0=system.nu0,
                         volume=system.volume)


def b0_signal(system: ReducedSystem, echo_time_ms: float) -> float:
    """S0 = nu0^T exp(-TE Lambda) nu0 (um^3): the b = 0 signal at the echo time."""
    return float(np.sum(system.nu0**2 * np.exp(-echo_time_ms * system.lam)))
