"""Sparse parallel matrices of the semi-discrete Bloch-Torrey system on the broken P1 space.

    M dm/dt = -(L(kappa) + i q f(t) (g . J)) m,
    L(kappa) = A + B(kappa) [+ R],   B(kappa) = sum_f kappa_f B_f   (linear in kappa).

M: mass (um^3), A: broken stiffness with D (um^3/ms), B: face coupling (um^3/ms),
J_i: first moments x_i (um^4), R: T2 relaxation. All assembled from the UFL forms in `forms/`.
"""

from __future__ import annotations

import dolfinx_solver  # noqa: F401
import numpy as np
import ufl
from dolfinx import fem
from dolfinx.fem import petsc as fem_petsc
from petsc4py import PETSc

from spinverse_fem.fem.face_space import FaceSpace
from spinverse_fem.forms import bloch_torrey as bt

OUTER_CONDITIONS = ("neumann", "robin")


class BlochTorreyOperators:
    """Owns M, J_x, J_y, J_z and L(kappa) for one face space.

    Parameters
    ----------
    space: FaceSpace
    diffusivity_um2_per_ms: float or (T,) per-tetrahedron values (input tet order)
    outer: "neumann" (sealed box) or "robin" (kappa_f u v on outer faces, kappa learnable)
    t2_ms: optional T2 relaxation time (ms), or
    relaxation_per_ms: 1/T2 in 1/ms, one value or (T,) per tetrahedron (input tet order;
    compartments), instead of t2_ms
    diffusion_tensor: optional (T, 3, 3) per-tetrahedron tensors in um^2/ms (anisotropic
    compartments); replaces diffusivity_um2_per_ms in the stiffness
    spin_density: optional (T,) relative initial magnetisation per tetrahedron (input order;
    compartments with different spin densities). Without it m(0) = 1.

    `initial` is m(0) on this rank's owned dofs (None: every dof 1) and `mass_initial` the
    vector M m(0) (None: it is `mass_ones`); the signal is always read out as (M 1)^T m(TE).
    """

    def __init__(self, space: FaceSpace, diffusivity_um2_per_ms, outer: str = "neumann",
                 t2_ms: float | None = None, relaxation_per_ms=None, diffusion_tensor=None,
                 spin_density=None):
        if outer not in OUTER_CONDITIONS:
            raise ValueError(f"outer must be one of {OUTER_CONDITIONS}, got {outer!r}")
        self.space = space
        self.outer = outer
        self.t2_ms = t2_ms
        msh, V = space.mesh, space.V
        self.dx = ufl.Measure("dx", domain=msh)
        self.dS = ufl.Measure("dS", domain=msh)
        self.ds = ufl.Measure("ds", domain=msh)
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        self.diffusivity = self._cell_coefficient(diffusivity_um2_per_ms,
                                                  "diffusivity_um2_per_ms")
        self.kappa = fem.Function(space.Q, name="kappa_um_per_ms")

        self.M = self._assemble(bt.mass(u, v, self.dx))
        self.J = [self._assemble(bt.moment(u, v, i, self.dx)) for i in range(3)]
        self.tensor = None
        if diffusion_tensor is not None:
            self.tensor = self._cell_tensor(diffusion_tensor)
            stiff = bt.anisotropic_stiffness(u, v, self.tensor, self.dx)
        else:
            stiff = bt.stiffness(u, v, self.diffusivity, self.dx)
        a = stiff + bt.face_coupling(u, v, self.kappa, self.dS)
        if outer == "robin":
            a = a + bt.robin_sink(u, v, self.kappa, self.ds)
        if t2_ms is not None and relaxation_per_ms is not None:
            raise ValueError("give t2_ms or relaxation_per_ms, not both")
        if t2_ms is not None:
            relaxation_per_ms = 1.0 / float(t2_ms)
        self.rate = None
        if relaxation_per_ms is not None:
            self.rate = rate = self._cell_coefficient(relaxation_per_ms, "relaxation_per_ms")
            a = a + bt.relaxation(u, v, rate, self.dx)
        self._a_L = fem.form(a, entity_maps=[space.entity_map])
        self.L = fem_petsc.create_matrix(self._a_L)
        self.L.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        ones = self.M.createVecRight()
        ones.set(1.0)
        self.mass_ones = self.M.createVecLeft()
        self.M.mult(ones, self.mass_ones)
        self.initial = self.mass_initial = None
        if spin_density is not None:
            self._set_initial(spin_density)
        self._kappa_values: np.ndarray | None = None
        self.tissue_version = 0   # incremented by every set_tissue that changes D or 1/T2

    def _cell_coefficient(self, d, name: str):
        """A constant, or a DG0 function from per-tetrahedron values (input tet order)."""
        d = np.asarray(d, dtype=np.float64)
        if d.ndim == 0:
            return fem.Constant(self.space.mesh, float(d))
        Vd = fem.functionspace(self.space.mesh, ("DG", 0))
        f = fem.Function(Vd, name=name)
        cmap = self.space.mesh.topology.index_map(3)
        cells = np.arange(cmap.size_local + cmap.num_ghosts, dtype=np.int32)
        original = np.asarray(self.space.mesh.topology.original_cell_index)[cells]
        f.x.array[Vd.dofmap.list[cells, 0]] = d[original]
        return f

    def _set_initial(self, spin_density) -> None:
        rho = np.asarray(spin_density, dtype=np.float64)
        if rho.ndim != 1 or not np.all(np.isfinite(rho)) or np.any(rho <= 0):
            raise ValueError("spin_density must be (T,) finite positive values per tetrahedron")
        # the cellwise constant is exactly representable in the broken P1 space
        m0 = fem.Function(self.space.V)
        m0.interpolate(self._cell_coefficient(rho, "spin_density"))
        x = m0.x.petsc_vec
        self.initial = x.getArray(readonly=True).copy()
        self.mass_initial = self.M.createVecLeft()
        self.M.mult(x, self.mass_initial)

    def _cell_tensor(self, tensors) -> fem.Function:
        """A DG0 3 x 3 tensor function from (T, 3, 3) values (input tet order)."""
        t = np.asarray(tensors, dtype=np.float64)
        Vt = fem.functionspace(self.space.mesh, ("DG", 0, (3, 3)))
        f = fem.Function(Vt, name="diffusion_tensor_um2_per_ms")
        cmap = self.space.mesh.topology.index_map(3)
        cells = np.arange(cmap.size_local + cmap.num_ghosts, dtype=np.int32)
        original = np.asarray(self.space.mesh.topology.original_cell_index)[cells]
        bs = 9
        dofs = Vt.dofmap.list[cells, 0]
        arr = f.x.array.reshape(-1, bs)
        arr[dofs] = t[original].reshape(-1, 9)
        return f

    def _set_cell_values(self, coef, d, name: str) -> None:
        d = np.asarray(d, dtype=np.float64)
        if isinstance(coef, fem.Constant):
            if d.ndim != 0:
                raise ValueError(f"{name} was one value; per-cell values need per-cell "
                                 "operators (build them with a (T,) array)")
            coef.value = float(d)
            return
        Vd = coef.function_space
        cmap = self.space.mesh.topology.index_map(3)
        cells = np.arange(cmap.size_local + cmap.num_ghosts, dtype=np.int32)
        original = np.asarray(self.space.mesh.topology.original_cell_index)[cells]
        values = np.broadcast_to(d, (cmap.size_global,)) if d.ndim == 0 else d
        coef.x.array[Vd.dofmap.list[cells, 0]] = values[original]

    def set_tissue(self, diffusivity_um2_per_ms=None, relaxation_per_ms=None) -> None:
        """New D (um^2/ms) and / or 1/T2 (1/ms), one value or (T,) per tetrahedron (input
        order), then L re-assembled at the current kappa. The relaxation term must exist
        (operators built with a relaxation). Values equal to the current ones change nothing;
        any change increments `tissue_version`."""
        current = getattr(self, "_tissue_values", (None, None))
        same = [new is None or (old is not None and np.array_equal(np.asarray(new), old))
                for new, old in zip((diffusivity_um2_per_ms, relaxation_per_ms), current)]
        if all(same):
            return
        self._tissue_values = tuple(
            old if new is None else np.array(new, dtype=np.float64)
            for new, old in zip((diffusivity_um2_per_ms, relaxation_per_ms), current))
        self.tissue_version += 1
        if diffusivity_um2_per_ms is not None and self.tensor is not None:
            raise ValueError("these operators use diffusion tensors: a scalar D cannot be set")
        if diffusivity_um2_per_ms is not None:
            self._set_cell_values(self.diffusivity, diffusivity_um2_per_ms,
                                  "diffusivity_um2_per_ms")
        if relaxation_per_ms is not None:
            if self.rate is None:
                raise ValueError("these operators have no relaxation term")
            self._set_cell_values(self.rate, relaxation_per_ms, "relaxation_per_ms")
        if self._kappa_values is not None:
            self.set_kappa(self._kappa_values)

    def _assemble(self, a) -> PETSc.Mat:
        A = fem_petsc.assemble_matrix(fem.form(a))
        A.assemble()
        A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        return A

    @property
    def comm(self):
        return self.space.comm

    def set_kappa(self, kappa_um_per_ms: np.ndarray) -> None:
        """Re-assemble L for canonical face permeabilities (F,) in um/ms (outer faces used by
        robin)."""
        k = np.asarray(kappa_um_per_ms, dtype=np.float64)
        if k.shape != (self.space.num_faces,):
            raise ValueError(f"kappa has shape {k.shape}, expected ({self.space.num_faces},)")
        if not np.all(np.isfinite(k)) or np.any(k < 0):
            raise ValueError("kappa must be finite and >= 0 on every face")
        self._kappa_values = k.copy()
        self.space.set_face_function(self.kappa, k)
        self.L.zeroEntries()
        fem_petsc.assemble_matrix(self.L, self._a_L)
        self.L.assemble()

    @property
    def kappa_values(self) -> np.ndarray:
        if self._kappa_values is None:
            raise RuntimeError("set_kappa has not been called")
        return self._kappa_values

    def volume(self) -> float:
        """Total volume (um^3) = 1^T M 1 (a collective)."""
        return float(self.mass_ones.sum())
