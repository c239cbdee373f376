"""Full-order signals and adjoint gradient on the paper's n = 4 BCC grid, for the 1-vs-2-rank test.

Run as `mpiexec -n 2 python full_order_parity.py OUT.npz`: rank 0 writes S (n,) complex and
kappa_bar (F,) (canonical face order, so comparable across partitions). `compute(comm)` is
imported by tests/test_full_order.py to produce the serial result from the same inputs.
"""

from __future__ import annotations

import sys

import dolfinx_solver  # noqa: F401  (before dolfinx/petsc4py)
import numpy as np
from mpi4py import MPI

# the paper's grid, from the paper-mesh folder ($SPINVERSE_PAPER_MESHES or its default)
PAPER_GRID_FILE = "019_torus_majr10_minr6.npz"


def compute(comm: MPI.Comm) -> dict[str, np.ndarray]:
    """Robin outer faces, seeded random kappa (um/ms), a 2/4 ms PGSE with 4 measurements."""
    from spinverse_fem.config.protocol import Sequence
    from spinverse_fem.fem.face_space import create_face_space
    from spinverse_fem.fem.operators import BlochTorreyOperators
    from spinverse_fem.forward.full_order import FullOrderModel
    from spinverse_fem.meshes.paper import paper_meshes_dir

    data = np.load(paper_meshes_dir() / PAPER_GRID_FILE)
    space = create_face_space(comm, data["points"].T, data["elements"].T)
    ops = BlochTorreyOperators(space, 2.0, outer="robin")
    rng = np.random.default_rng(20240611)
    kappa = 10.0 ** rng.uniform(-1.5, 1.5, space.num_faces)
    seq = Sequence.pgse(2.0, 4.0, [0.0, 1500.0], [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    n = seq.num_measurements
    S_bar = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    model = FullOrderModel(ops, 0.5, checkpoint_interval=3)
    S, kappa_bar = model.signals_and_vjp(seq, S_bar, kappa=kappa)
    model.destroy()
    return {"S": S, "kappa_bar": kappa_bar}


if __name__ == "__main__":
    out = compute(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        np.savez(sys.argv[1], **out)
