"""Global, rank-independent topology of a tetrahedral grid: faces, edges and their incidences.

Every triangle of the grid gets one canonical id: faces are the sorted vertex triples of all
tetrahedra, ordered lexicographically. The order depends only on the vertex numbering of the
input grid, never on the MPI partition, so face fields (kappa, gradients) are read and written
in this order on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Local vertex triples of the four faces of a tetrahedron; face i is opposite vertex i.
TET_FACE_VERTICES = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]], dtype=np.int64)


def _encode(triples: np.ndarray, num_vertices: int) -> np.ndarray:
    """One int64 key per sorted vertex triple (lexicographic order is preserved)."""
    if num_vertices >= 2_000_000:
        raise ValueError(f"face keys overflow int64 for {num_vertices} vertices (limit 2e6)")
    t = np.asarray(triples, dtype=np.int64)
    n = np.int64(num_vertices)
    return (t[:, 0] * n + t[:, 1]) * n + t[:, 2]


@dataclass(frozen=True)
class FaceTable:
    """Canonical faces of a tetrahedral grid.

    faces:      (F, 3) int64, sorted vertex ids of each triangle; rows in lexicographic order.
    cells:      (F, 2) int64, the tetrahedra on either side (smaller id first); -1 in column 1
                for an outer face.
    tet_faces:  (T, 4) int64, canonical id of the face opposite local vertex i of each tet.
    num_vertices: number of grid vertices (needed to encode lookups).
    """

    faces: np.ndarray
    cells: np.ndarray
    tet_faces: np.ndarray
    num_vertices: int

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def outer(self) -> np.ndarray:
        """(F,) bool: faces used by exactly one tetrahedron."""
        return self.cells[:, 1] < 0

    @property
    def interior(self) -> np.ndarray:
        return ~self.outer

    def lookup(self, triples: np.ndarray) -> np.ndarray:
        """Canonical ids of vertex triples (any vertex order within a row); -1 where absent."""
        t = np.sort(np.asarray(triples, dtype=np.int64).reshape(-1, 3), axis=1)
        keys = _encode(self.faces, self.num_vertices)
        q = _encode(t, self.num_vertices)
        pos = np.searchsorted(keys, q)
        pos = np.minimum(pos, len(keys) - 1)
        found = keys[pos] == q
        return np.where(found, pos, -1)


def build_face_table(tets: np.ndarray, num_vertices: int) -> FaceTable:
    """Faces of the tetrahedra `tets` (T, 4), canonical order; raises if a face has > 2 tets."""
    tets = np.asarray(tets, dtype=np.int64)
    t = tets.shape[0]
    local = np.sort(tets[:, TET_FACE_VERTICES].reshape(-1, 3), axis=1)  # (4T, 3)
    keys = _encode(local, num_vertices)
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    if np.any(counts > 2):
        raise ValueError(f"{int(np.sum(counts > 2))} triangles are shared by more than two "
                         "tetrahedra: the mesh is not a conforming 3-manifold")
    first = np.full(uniq.shape[0], -1, dtype=np.int64)
    owner = np.repeat(np.arange(t, dtype=np.int64), 4)
    faces = np.empty((uniq.shape[0], 3), dtype=np.int64)
    faces[inverse] = local
    cells = np.full((uniq.shape[0], 2), -1, dtype=np.int64)
    order = np.argsort(inverse, kind="stable")  # incidences grouped by face, tet ids ascending
    inv_sorted = inverse[order]
    start = np.r_[0, np.flatnonzero(np.diff(inv_sorted)) + 1]
    first = owner[order][start]
    cells[:, 0] = first
    second_mask = np.r_[inv_sorted[1:] == inv_sorted[:-1], False]
    cells[inv_sorted[second_mask], 1] = owner[order][np.flatnonzero(second_mask) + 1]
    return FaceTable(faces=faces, cells=cells, tet_faces=inverse.reshape(t, 4),
                     num_vertices=int(num_vertices))


@dataclass(frozen=True)
class EdgeTable:
    """Edges of a set of triangles.

    edges:      (E, 2) int64 sorted vertex pairs, lexicographic order.
    face_edges: (F, 3) int64 edge ids of each triangle.
    """

    edges: np.ndarray
    face_edges: np.ndarray

    @property
    def num_edges(self) -> int:
        return int(self.edges.shape[0])

    def edge_face_counts(self, face_mask: np.ndarray | None = None) -> np.ndarray:
        """(E,) number of (masked) triangles using each edge."""
        fe = self.face_edges if face_mask is None else self.face_edges[np.asarray(face_mask)]
        return np.bincount(fe.ravel(), minlength=self.num_edges)

    def face_pairs(self) -> np.ndarray:
        """(P, 2) all unordered pairs of distinct triangles sharing an edge (i < j)."""
        f = self.face_edges.shape[0]
        inc_edge = self.face_edges.ravel()
        inc_face = np.repeat(np.arange(f, dtype=np.int64), 3)
        order = np.lexsort((inc_face, inc_edge))
        e, fc = inc_edge[order], inc_face[order]
        starts = np.r_[0, np.flatnonzero(np.diff(e)) + 1, e.size]
        pairs = []
        for k in range(1, int(np.max(np.diff(starts))) if e.size else 1):
            # pair each incidence with the one k places later inside the same edge group
            same = np.r_[e[k:] == e[:-k], np.zeros(k, dtype=bool)]
            idx = np.flatnonzero(same)
            pairs.append(np.stack([fc[idx], fc[idx + k]], axis=1))
        if not pairs:
            return np.zeros((0, 2), dtype=np.int64)
        p = np.concatenate(pairs)
        return p[np.lexsort((p[:, 1], p[:, 0]))]


def build_edge_table(faces: np.ndarray) -> EdgeTable:
    faces = np.asarray(faces, dtype=np.int64)
    local = np.sort(faces[:, [[0, 1], [0, 2], [1, 2]]].reshape(-1, 2), axis=1)
    n = np.int64(max(int(faces.max()) + 1, 1)) if faces.size else np.int64(1)
    keys = local[:, 0] * n + local[:, 1]
    uniq, inverse = np.unique(keys, return_inverse=True)
    edges = np.stack([uniq // n, uniq % n], axis=1)
    return EdgeTable(edges=edges, face_edges=inverse.reshape(-1, 3))
