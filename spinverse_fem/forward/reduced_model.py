r"""The matrix-formalism (reduced) model: project the sparse system on the Laplace eigenbasis.

With m = Phi nu and Phi^T M Phi = I the semi-discrete system becomes

    d nu/dt = -(Lambda + i q f(t) sum_i g_i W_i) nu,   nu(0) = nu0,
    W_i = Phi^T J_i Phi (um),   nu0 = Phi^T M 1 (um^{3/2}),   S = nu0^T nu(TE) (um^3),

a small dense K x K problem solved by `matrix_formalism`. S0 (b = 0) is nu0^T e^{-TE Lambda} nu0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from spinverse_fem.forward.eigenbasis import Eigenbasis, apply, gram
from spinverse_fem.fem.operators import BlochTorreyOperators


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


def project(ops: BlochTorreyOperators, basis: Eigenbasis) -> ReducedSystem:
    """Projections of the moment and mass operators on the eigenbasis (collective)."""
    comm = ops.comm
    phi = basis.phi
    W = np.stack([gram(phi, J, phi, comm) for J in ops.J])
    W = 0.5 * (W + W.transpose(0, 2, 1))
    m1 = ops.mass_ones.getArray()
    nu0 = comm.allreduce(phi.T @ m1, op=MPI.SUM)
    return ReducedSystem(lam=basis.lam.copy(), W=W, nu0=nu0, volume=ops.volume())


def reduced_signals(system: ReducedSystem, sequence) -> np.ndarray:
    """(n,) complex signals S_c (um^3) of one sequence (unnormalised)."""
    from spinverse_fem.forward.propagator import propagate

    return propagate(system.lam, system.W, system.nu0, sequence.segments,
                     sequence.q_per_um_ms(), sequence.directions)


def b0_signal(system: ReducedSystem, echo_time_ms: float) -> float:
    """S0 = nu0^T exp(-TE Lambda) nu0 (um^3): the b = 0 signal at the echo time."""
    return float(np.sum(system.nu0**2 * np.exp(-echo_time_ms * system.lam)))


def modal_field(basis: Eigenbasis, coefficients: np.ndarray) -> np.ndarray:
    """Local owned dof values of Phi c for coefficients c (K,) or (K, n)."""
    return basis.phi @ coefficients


__all__ = ["ReducedSystem", "project", "reduced_signals", "b0_signal", "apply"]
