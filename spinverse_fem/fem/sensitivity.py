r"""Per-face sensitivities of bilinear forms in kappa, assembled from UFL on the face space.

Because L(kappa) = A + sum_f kappa_f B_f, for any pairs of broken-P1 vectors (a_j, b_j)

    d/dkappa_f  sum_j a_j^T L(kappa) b_j  =  sum_j a_j^T B_f b_j
                                          =  sum_j <[a_j], [b_j]>_f      (interior face f)
                                          =  sum_j <a_j, b_j>_f          (outer face f, robin).

All faces at once: one vector assembly of  w([a] . [b]) dS (+ w (a . b) ds)  with w the per-face
test function and a, b blocked (vector-valued) broken-P1 functions carrying `chunk` columns.
The cost is one assembly per chunk of columns, independent of the number of faces.
"""

from __future__ import annotations

import dolfinx_solver  # noqa: F401
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from petsc4py import PETSc

from spinverse_fem.fem.operators import BlochTorreyOperators
from spinverse_fem.forms import bloch_torrey as bt


class _BlockedPairs:
    """The two blocked broken-P1 functions a, b (`chunk` columns each) that a sensitivity
    form pairs, filled chunk by chunk from local owned rows (n_owned, k)."""

    def __init__(self, ops: BlochTorreyOperators, chunk: int = 16):
        self.ops = ops
        self.chunk = int(chunk)
        V = ops.space.V
        Vk = fem.functionspace(ops.space.mesh, ("DG", 1, (self.chunk,)))
        if not np.array_equal(Vk.dofmap.list, V.dofmap.list):
            raise RuntimeError("blocked and scalar broken-P1 dof layouts differ")
        self.n_owned = V.dofmap.index_map.size_local
        self.a = fem.Function(Vk)
        self.b = fem.Function(Vk)

    def _fill(self, f: fem.Function, X: np.ndarray) -> None:
        block = np.zeros((self.n_owned, self.chunk))
        block[:, : X.shape[1]] = X
        f.x.array[: self.n_owned * self.chunk] = block.ravel()
        f.x.scatter_forward()

    def _check(self, A: np.ndarray, B: np.ndarray) -> int:
        """The number of column chunks every rank assembles (collective: the same on all)."""
        from mpi4py import MPI

        if A.shape != B.shape or A.shape[0] != self.n_owned:
            raise ValueError(f"expected two ({self.n_owned}, k) arrays, got {A.shape}, {B.shape}")
        return self.ops.comm.allreduce(A.shape[1], op=MPI.MAX)


class FaceSensitivity(_BlockedPairs):
    """Callable: (A, B) local owned rows (n_owned, k) -> (F,) canonical, replicated."""

    def __init__(self, ops: BlochTorreyOperators, chunk: int = 16):
        super().__init__(ops, chunk)
        space = ops.space
        w = ufl.TestFunction(space.Q)
        L = bt.interior_face_sensitivity(w, self.a, self.b, ops.dS)
        if ops.outer == "robin":
            L = L + bt.outer_face_sensitivity(w, self.a, self.b, ops.ds)
        self.form = fem.form(L, entity_maps=[space.entity_map])
        self.vec = fem_petsc.create_vector(space.Q)
        self.n_q_owned = space.Q.dofmap.index_map.size_local

    def owned(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Sensitivities on this rank's owned faces (in Q owned-dof order)."""
        ncols = self._check(A, B)
        out = np.zeros(self.n_q_owned)
        for c0 in range(0, ncols, self.chunk):
            self._fill(self.a, A[:, c0:c0 + self.chunk])
            self._fill(self.b, B[:, c0:c0 + self.chunk])
            with self.vec.localForm() as loc:
                loc.set(0.0)
            fem_petsc.assemble_vector(self.vec, self.form)
            self.vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            out += self.vec.array_r[: self.n_q_owned]
        return out

    def __call__(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """(F,) canonical-order sum_j A[:, j]^T B_f B[:, j], identical on every rank."""
        return self.ops.space.gather_face_vector(self.owned(A, B))


class CellSensitivity(_BlockedPairs):
    """Callable: (A, B) local owned rows (n_owned, k) -> (stiffness (T,), mass (T,)), input
    tetrahedron order, replicated:

        stiffness_t = sum_j A[:, j]^T A_t B[:, j]   (A_t: the stiffness of cell t with D = 1,
                                                     um; d/dD_t of sum_j a_j^T L b_j)
        mass_t      = sum_j A[:, j]^T M_t B[:, j]   (M_t: the mass of cell t, um^3;
                                                     d/dr_t, r = 1/T2 in 1/ms)

    Because L = sum_t D_t A_t + B(kappa) + sum_t r_t M_t, these are the sensitivities of
    the same pairings as `FaceSensitivity`, cell by cell (the compartment parameters)."""

    def __init__(self, ops: BlochTorreyOperators, chunk: int = 16):
        super().__init__(ops, chunk)
        space = ops.space
        W0 = fem.functionspace(space.mesh, ("DG", 0))
        w = ufl.TestFunction(W0)
        self.forms = [fem.form(bt.cell_stiffness_sensitivity(w, self.a, self.b, ops.dx)),
                      fem.form(bt.cell_mass_sensitivity(w, self.a, self.b, ops.dx))]
        self.vec = fem_petsc.create_vector(W0)
        cmap = space.mesh.topology.index_map(3)
        owned = np.arange(cmap.size_local, dtype=np.int32)
        self.owned_dofs = W0.dofmap.list[owned, 0]
        self.original = np.asarray(space.mesh.topology.original_cell_index)[owned]
        self.num_cells = cmap.size_global

    def __call__(self, A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mpi4py import MPI

        ncols = self._check(A, B)
        out = [np.zeros(self.num_cells), np.zeros(self.num_cells)]
        for c0 in range(0, ncols, self.chunk):
            self._fill(self.a, A[:, c0:c0 + self.chunk])
            self._fill(self.b, B[:, c0:c0 + self.chunk])
            for o, form in zip(out, self.forms):
                with self.vec.localForm() as loc:
                    loc.set(0.0)
                fem_petsc.assemble_vector(self.vec, form)
                self.vec.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
                o[self.original] += self.vec.array_r[self.owned_dofs]
        # each cell is owned by one rank: the sums are exact
        return tuple(self.ops.comm.allreduce(o, op=MPI.SUM) for o in out)
