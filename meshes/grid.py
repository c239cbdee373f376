"""A serial tetrahedral grid (vertices, tetrahedra, optional tagged membrane) and its validation.

Everything here is plain numpy on one process; the solver turns a `Grid` into a distributed
dolfinx mesh. Coordinates are in um.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.geometry.topology import TET_FACE_VERTICES, FaceTable

# A tet counts as degenerate when |6 V| <= _DEGENERATE_RTOL * (longest edge)^3. A regular tet
# has 6 V / L^3 = 0.71, so this only flags tets flattened to round-off.
_DEGENERATE_RTOL = 1e-10


def signed_volumes(points: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """(T,) signed volumes in um^3 of tets (T, 4) over points (V, 3) um.

    Positive when (p1 - p0, p2 - p0, p3 - p0) is a right-handed triple.
    """
    p = np.asarray(points, dtype=np.float64)[np.asarray(tets, dtype=np.int64)]
    e1, e2, e3 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]
    return np.einsum("ij,ij->i", np.cross(e1, e2), e3) / 6.0


def triangle_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(M,) areas in um^2 of triangles (M, 3) over points (V, 3) um."""
    p = np.asarray(points, dtype=np.float64)[np.asarray(triangles, dtype=np.int64)]
    return 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)


def orient_positively(points: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """Copy of tets (T, 4) int64 with local vertices 0 and 1 swapped where the volume is negative.

    For generators and converters only: user meshes are validated, never silently reoriented.
    """
    out = np.array(tets, dtype=np.int64, copy=True)
    neg = signed_volumes(points, out) < 0
    out[neg, 0], out[neg, 1] = out[neg, 1], out[neg, 0].copy()
    return out


def _sorted_row_order(rows: np.ndarray) -> np.ndarray:
    """Permutation sorting the integer rows (N, k) lexicographically."""
    return np.lexsort(rows.T[::-1])


def _duplicate_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of equal rows in (N, k): (first-row index per group, group size), for sizes > 1."""
    if rows.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = _sorted_row_order(rows)
    s = rows[order]
    new = np.r_[True, np.any(s[1:] != s[:-1], axis=1)]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, s.shape[0]])
    # report the smallest original index of each repeated group
    first = np.minimum.reduceat(order, starts)
    keep = sizes > 1
    return first[keep], sizes[keep]


def validate_grid(points: np.ndarray, tets: np.ndarray, source: str,
                  membrane_triangles: np.ndarray | None = None) -> None:
    """Check a tetrahedral grid; raise InputError(source, field, message) on the first problem.

    points: (V, 3) real floating coordinates in um; tets: (T, 4) integer vertex ids.
    Checks, in order: shapes and dtypes, finite coordinates, vertex ids in range (unused
    vertices are allowed), degenerate (zero-volume) tets, inverted (negatively oriented) tets,
    duplicate tets (same vertex set), triangles shared by more than two tets (non-conforming).
    membrane_triangles (M, 3) integer, when given, must be triangles of the grid.
    """
    points = np.asarray(points)
    tets = np.asarray(tets)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(source, "points", f"expected shape (V, 3), got {points.shape}")
    if not np.issubdtype(points.dtype, np.floating):
        raise InputError(source, "points",
                         f"expected floating coordinates, got dtype {points.dtype}")
    if tets.ndim != 2 or tets.shape[1] != 4:
        raise InputError(source, "tets", f"expected shape (T, 4), got {tets.shape}")
    if not np.issubdtype(tets.dtype, np.integer):
        raise InputError(source, "tets", f"expected integer vertex ids, got dtype {tets.dtype}")
    if tets.shape[0] == 0:
        raise InputError(source, "tets", "the grid has no tetrahedra")
    bad = ~np.all(np.isfinite(points), axis=1)
    if np.any(bad):
        raise InputError(source, "points", f"{int(bad.sum())} vertices have non-finite "
                         f"coordinates (first: vertex {int(np.flatnonzero(bad)[0])})")
    nv = points.shape[0]
    bad = np.any((tets < 0) | (tets >= nv), axis=1)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(source, "tets", f"{int(bad.sum())} tets use vertex ids outside "
                         f"[0, {nv}) (first: tet {i} = {tets[i].tolist()})")
    tets = tets.astype(np.int64, copy=False)

    vol6 = 6.0 * signed_volumes(points, tets)
    p = points.astype(np.float64, copy=False)[tets]
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    longest = np.max(np.linalg.norm(p[:, pairs[:, 0]] - p[:, pairs[:, 1]], axis=2), axis=1)
    degenerate = np.abs(vol6) <= _DEGENERATE_RTOL * longest**3
    if np.any(degenerate):
        i = int(np.flatnonzero(degenerate)[0])
        raise InputError(source, "tets", f"{int(degenerate.sum())} tets have zero volume "
                         f"(first: tet {i} = {tets[i].tolist()})")
    inverted = vol6 < 0
    if np.any(inverted):
        i = int(np.flatnonzero(inverted)[0])
        raise InputError(source, "tets", f"{int(inverted.sum())} tets are inverted (negative "
                         f"signed volume; first: tet {i} = {tets[i].tolist()}); swap two "
                         "vertices of each to orient them positively")

    first, sizes = _duplicate_rows(np.sort(tets, axis=1))
    if first.size:
        i = int(first.min())
        raise InputError(source, "tets", f"{int(np.sum(sizes - 1))} tets duplicate another "
                         f"tet's vertex set (first: tet {i} = {tets[i].tolist()})")

    local = np.sort(tets[:, TET_FACE_VERTICES].reshape(-1, 3), axis=1)
    first, sizes = _duplicate_rows(local)
    over = sizes > 2
    if np.any(over):
        k = int(first[over][0])
        raise InputError(source, "tets", f"{int(over.sum())} triangles are shared by more "
                         f"than two tets, the grid is not conforming (first: triangle "
                         f"{local[k].tolist()} of tet {k // 4})")

    if membrane_triangles is not None:
        m = np.asarray(membrane_triangles)
        if m.ndim != 2 or m.shape[1] != 3:
            raise InputError(source, "membrane_triangles",
                             f"expected shape (M, 3), got {m.shape}")
        if not np.issubdtype(m.dtype, np.integer):
            raise InputError(source, "membrane_triangles",
                             f"expected integer vertex ids, got dtype {m.dtype}")
        bad = np.any((m < 0) | (m >= nv), axis=1)
        if np.any(bad):
            raise InputError(source, "membrane_triangles", f"{int(bad.sum())} triangles use "
                             f"vertex ids outside [0, {nv})")
        absent = ~_rows_in(np.sort(m.astype(np.int64), axis=1), local)
        if np.any(absent):
            i = int(np.flatnonzero(absent)[0])
            raise InputError(source, "membrane_triangles", f"{int(absent.sum())} membrane "
                             f"triangles are not faces of the tetrahedra (first: triangle "
                             f"{i} = {m[i].tolist()})")


def _rows_in(query: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(N,) bool: which rows of query (N, k) occur in table (M, k); both integer arrays."""
    if query.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    both = np.concatenate([table, query])
    order = _sorted_row_order(both)
    s = both[order]
    new = np.r_[True, np.any(s[1:] != s[:-1], axis=1)]
    group = np.cumsum(new) - 1
    has_table = np.zeros(group[-1] + 1, dtype=bool)
    has_table[group[order < table.shape[0]]] = True
    g = np.empty(both.shape[0], dtype=np.int64)
    g[order] = group
    return has_table[g[table.shape[0]:]]


# eq=False: field-wise == on numpy arrays is ambiguous; grids compare (and hash) by identity.
@dataclass(frozen=True, eq=False)
class Grid:
    """A validated conforming tetrahedral grid.

    points:             (V, 3) float64 vertex coordinates, um.
    tets:               (T, 4) int64 vertex ids, every tet positively oriented.
    membrane_triangles: (M, 3) int64 vertex triples of membrane faces tagged in a file, or None.
    source:             where the grid came from (file path or generator call), used in errors.
    tet_tags:           (T,) int64 volume tags of the tets (a file's physical volumes), or None.
    membrane_tags:      (M,) int64 surface tag of each membrane triangle (several membranes of
                        a file), or None.

    Construction validates the arrays (see `validate_grid`) and stores float64 / int64 copies.
    """

    points: np.ndarray
    tets: np.ndarray
    membrane_triangles: np.ndarray | None = None
    source: str = "<grid>"
    tet_tags: np.ndarray | None = None
    membrane_tags: np.ndarray | None = None

    def __post_init__(self) -> None:
        validate_grid(self.points, self.tets, self.source, self.membrane_triangles)
        object.__setattr__(self, "points", np.ascontiguousarray(self.points, dtype=np.float64))
        object.__setattr__(self, "tets", np.ascontiguousarray(self.tets, dtype=np.int64))
        if self.membrane_triangles is not None:
            object.__setattr__(self, "membrane_triangles",
                               np.ascontiguousarray(self.membrane_triangles, dtype=np.int64))
        if self.tet_tags is not None:
            tags = np.asarray(self.tet_tags)
            if tags.shape != (self.tets.shape[0],):
                raise ValueError(f"{self.source}: tet_tags has shape {tags.shape}, expected "
                                 f"({self.tets.shape[0]},)")
            object.__setattr__(self, "tet_tags", np.ascontiguousarray(tags, dtype=np.int64))
        if self.membrane_tags is not None:
            tags = np.asarray(self.membrane_tags)
            m = -1 if self.membrane_triangles is None else self.membrane_triangles.shape[0]
            if tags.shape != (m,):
                raise ValueError(f"{self.source}: membrane_tags has shape {tags.shape}, "
                                 f"expected ({m},)")
            object.__setattr__(self, "membrane_tags", np.ascontiguousarray(tags, dtype=np.int64))

    @property
    def num_vertices(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_tets(self) -> int:
        return int(self.tets.shape[0])

    def volumes(self) -> np.ndarray:
        """(T,) tet volumes, um^3 (all positive)."""
        return signed_volumes(self.points, self.tets)


def membrane_mask(face_table: FaceTable, triangles: np.ndarray, source: str,
                  field: str = "membrane_triangles") -> np.ndarray:
    """(F,) bool over the canonical faces of face_table: True on the given triangles (M, 3).

    Raises InputError(source, field, ...) if a triangle is not a grid face.
    """
    ids = face_table.lookup(np.asarray(triangles, dtype=np.int64).reshape(-1, 3))
    if np.any(ids < 0):
        i = int(np.flatnonzero(ids < 0)[0])
        raise InputError(source, field, f"{int(np.sum(ids < 0))} membrane "
                         f"triangles are not grid faces (first: triangle {i} = "
                         f"{np.asarray(triangles).reshape(-1, 3)[i].tolist()})")
    mask = np.zeros(face_table.num_faces, dtype=bool)
    mask[ids] = True
    return mask
