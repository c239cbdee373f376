"""The discrete setting: a distributed tetrahedral mesh, the broken P1 magnetisation space, and a
per-face coefficient space (DG0 on the facet submesh) addressed by canonical face ids.

Face fields cross the boundary between the user (canonical order, replicated arrays) and
DOLFINx (local facets, owned + ghost) only here.
"""

from __future__ import annotations

from dataclasses import dataclass

import dolfinx_solver  # noqa: F401  (must precede dolfinx/petsc4py)
import basix.ufl
import numpy as np
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from mpi4py import MPI

from spinverse_fem.geometry.topology import FaceTable, build_face_table


@dataclass
class FaceSpace:
    """Broken-P1 space on a distributed mesh with per-face coefficients.

    comm:             communicator of the mesh.
    mesh:             the DOLFINx mesh (shared-facet ghosting, needed for interior-face integrals).
    V:                discontinuous P1 space (4 dofs per tetrahedron) for the magnetisation.
    facet_mesh:       submesh of all local facets (owned and ghost).
    Q:                DG0 on facet_mesh: one value per face.
    entity_map:       facet_mesh cells <-> mesh facets (for mixed-dimensional forms).
    faces:            the global canonical face table (replicated on every rank).
    points, tets:     the global input grid (replicated), um.
    q_face_ids:       (num Q dofs local incl. ghosts,) canonical face id of each Q dof.
    owned_q_dofs:     (num owned Q dofs,) their canonical face ids (each face owned by one rank).
    """

    comm: MPI.Comm
    mesh: dmesh.Mesh
    V: fem.FunctionSpace
    facet_mesh: dmesh.Mesh
    Q: fem.FunctionSpace
    entity_map: dmesh.EntityMap
    faces: FaceTable
    points: np.ndarray
    tets: np.ndarray
    q_face_ids: np.ndarray

    @property
    def num_faces(self) -> int:
        return self.faces.num_faces

    @property
    def owned_q_face_ids(self) -> np.ndarray:
        """Canonical ids of the faces owned by this rank (Q owned dofs)."""
        n = self.Q.dofmap.index_map.size_local * self.Q.dofmap.index_map_bs
        return self.q_face_ids[:n]

    @property
    def num_dofs_global(self) -> int:
        return self.V.dofmap.index_map.size_global * self.V.dofmap.index_map_bs

    def face_function(self, values: np.ndarray, name: str = "kappa") -> fem.Function:
        """A Q function holding a canonical-order face array (F,) (owned and ghost dofs set)."""
        f = fem.Function(self.Q, name=name)
        self.set_face_function(f, values)
        return f

    def set_face_function(self, f: fem.Function, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.num_faces,):
            raise ValueError(f"face field has shape {values.shape}, expected ({self.num_faces},)")
        f.x.array[:] = values[self.q_face_ids]

    def gather_face_vector(self, owned_values: np.ndarray) -> np.ndarray:
        """Canonical (F,) array on every rank from values on this rank's owned faces."""
        out = np.zeros(self.num_faces)
        out[self.owned_q_face_ids] = owned_values
        # each face is owned by exactly one rank, so the sum is exact (no round-off)
        return self.comm.allreduce(out, op=MPI.SUM)


def create_face_space(comm: MPI.Comm, points: np.ndarray, tets: np.ndarray) -> FaceSpace:
    """Distribute the global grid (points (V,3) um, tets (T,4), identical on every rank)."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    tets = np.ascontiguousarray(tets, dtype=np.int64)
    faces = build_face_table(tets, points.shape[0])
    domain = ufl.Mesh(basix.ufl.element("Lagrange", "tetrahedron", 1, shape=(3,)))
    if comm.rank == 0:
        cells, x = tets, points
    else:
        cells, x = np.empty((0, 4), dtype=np.int64), np.empty((0, 3), dtype=np.float64)
    partitioner = dmesh.create_cell_partitioner(dmesh.GhostMode.shared_facet, 2)
    msh = dmesh.create_mesh(comm, cells, domain, x, partitioner=partitioner)
    tdim = msh.topology.dim
    msh.topology.create_entities(tdim - 1)
    msh.topology.create_connectivity(tdim - 1, tdim)
    msh.topology.create_connectivity(tdim, tdim - 1)
    V = fem.functionspace(msh, ("DG", 1))

    fmap = msh.topology.index_map(tdim - 1)
    local_facets = np.arange(fmap.size_local + fmap.num_ghosts, dtype=np.int32)
    # canonical id of each local facet from the input vertex numbering (partition independent)
    nodes = dmesh.entities_to_geometry(msh, tdim - 1, local_facets)
    original = np.asarray(msh.geometry.input_global_indices, dtype=np.int64)[nodes]
    facet_ids = faces.lookup(original)
    if np.any(facet_ids < 0):
        raise RuntimeError("a mesh facet is missing from the canonical face table")

    facet_mesh, entity_map, _, _ = dmesh.create_submesh(msh, tdim - 1, local_facets)
    Q = fem.functionspace(facet_mesh, ("DG", 0))
    cmap = facet_mesh.topology.index_map(tdim - 1)
    sub_cells = np.arange(cmap.size_local + cmap.num_ghosts, dtype=np.int32)
    parent = np.asarray(entity_map.sub_topology_to_topology(sub_cells, False))
    dofs = Q.dofmap.list[sub_cells, 0]
    q_face_ids = np.empty(len(sub_cells), dtype=np.int64)
    q_face_ids[dofs] = facet_ids[parent]
    return FaceSpace(comm=comm, mesh=msh, V=V, facet_mesh=facet_mesh, Q=Q,
                     entity_map=entity_map, faces=faces, points=points, tets=tets,
                     q_face_ids=q_face_ids)
