"""The forward model: permeabilities -> eigenbasis -> reduced system -> normalised signals."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from spinverse_fem.config import EigenConfig, PhysicsConfig
from spinverse_fem.errors import SolverError
from spinverse_fem.fem.face_space import create_face_space
from spinverse_fem.fem.operators import BlochTorreyOperators
from spinverse_fem.forward.eigenbasis import Eigenbasis, cutoff_eigenvalue, solve_eigenbasis
from spinverse_fem.forward.reduced_model import (
    ReducedSystem,
    b0_signal,
    project,
    reduced_signals,
    shifted,
)
from spinverse_fem.geometry.phantom import Phantom


class ForwardModel:
    """Owns the distributed discretisation of one phantom and evaluates signals for any kappa.

    comm: communicator; phantom: grid, faces, outer condition, D, 1/T2 and spin density (from
    [physics] or per tetrahedron from [[compartment]]); physics: [physics] (kept for
    reference; the phantom's values are used); eigen: the mode-count rule (length scale l
    in um, cap, or a fixed count).
    """

    def __init__(self, comm: MPI.Comm, phantom: Phantom, physics: PhysicsConfig,
                 eigen: EigenConfig):
        self.comm = comm
        self.phantom = phantom
        self.physics = physics
        self.eigen = eigen
        self.space = create_face_space(comm, phantom.grid.points, phantom.grid.tets)
        # D and 1/T2 from the phantom: [physics], or per tetrahedron from [[compartment]]
        self.ops = BlochTorreyOperators(self.space, phantom.diffusivity, outer=phantom.outer,
                                        relaxation_per_ms=phantom.relaxation,
                                        diffusion_tensor=phantom.diffusion_tensor,
                                        spin_density=phantom.spin_density)
        # the cutoff of the fastest compartment (more modes, never fewer than any one needs)
        self.lam_max = cutoff_eigenvalue(phantom.max_diffusivity, eigen.length_scale_um)
        if phantom.relaxation is not None:
            # relaxation shifts the spectrum by between its smallest and largest rate
            self.lam_max += float(np.max(phantom.relaxation))

    def eigenbasis(self, kappa: np.ndarray, num_modes: int | None = None) -> Eigenbasis:
        """Eigenpairs for face permeabilities kappa (F,) um/ms (collective)."""
        self.ops.set_kappa(kappa)
        n = num_modes if num_modes is not None else self.eigen.num_modes
        # a uniform relaxation rate shifts every eigenvalue and changes no eigenvector: the
        # cut's relative gaps are measured above the smallest rate
        shift = 0.0 if self.phantom.relaxation is None else float(
            np.min(self.phantom.relaxation))
        return solve_eigenbasis(self.ops.L, self.ops.M, lam_max=self.lam_max, num_modes=n,
                                max_modes=self.eigen.max_modes, tol=self.eigen.tolerance,
                                gap_shift=shift)

    def reduce(self, kappa: np.ndarray, num_modes: int | None = None
               ) -> tuple[Eigenbasis, ReducedSystem]:
        basis = self.eigenbasis(kappa, num_modes)
        return basis, project(self.ops, basis)

    @staticmethod
    def normalised_signals(system: ReducedSystem, sequences) -> list[np.ndarray]:
        """S/S0 per sequence, S0 = the b = 0 signal of the same geometry at the echo time
        (computed on the shifted system: no underflow). SolverError if any is not finite."""
        system = shifted(system)
        out = []
        for seq in sequences:
            s = reduced_signals(system, seq) / b0_signal(system, seq.echo_time_ms)
            if not np.all(np.isfinite(s)):
                raise SolverError(f"the signals of sequence {seq.name!r} are not finite "
                                  f"(S0 = {b0_signal(system, seq.echo_time_ms):.3g} um^3 "
                                  "relative to exp(-TE lambda_1)); check T2, the echo time "
                                  "and the permeabilities")
            out.append(s)
        return out
