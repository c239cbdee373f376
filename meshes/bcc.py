"""The Spinverse paper's body-centred-cubic (BCC) tetrahedral grid.

n x n x n cubes of side a centred at `center_um`. Vertices: the (n+1)^3 lattice points, then the
n^3 cube centres. One tetrahedron per (edge of a square shared by two face-adjacent cubes, the
two cube centres): 12 n^2 (n-1) congruent tets of volume a^3/12, whose faces are congruent
isosceles triangles (sides a, a sqrt(3)/2, a sqrt(3)/2) of area a^2 sqrt(2)/4. The pyramids
over the outer squares (apex at the cube centre) are not meshed, so the domain is the box
minus 6 n^2 pyramids.

Numbering (identical to the paper's files): lattice point (i, j, k) along (x, y, z) has id
i (n+1)^2 + j (n+1) + k (z fastest); cube (i, j, k) has centre id (n+1)^3 + i n^2 + j n + k.
Tets are listed in lexicographic order of their sorted vertex ids (the files' order); within a
tet the vertices are sorted, then vertices 0 and 1 are swapped if needed for positive
orientation.
"""

from __future__ import annotations

import numpy as np

from spinverse_fem.meshes.grid import Grid, orient_positively


def bcc_grid(cubes: int, cube_um: float, center_um=(0.0, 0.0, 0.0)) -> Grid:
    """The BCC grid of cubes^3 cubes of side cube_um (um) centred at center_um (3,) um.

    Returns a Grid with (n+1)^3 + n^3 vertices and 12 n^2 (n-1) tets (n = cubes >= 2).
    """
    n = int(cubes)
    if n != cubes or n < 2:
        raise ValueError(f"bcc_grid: cubes must be an integer >= 2 (no shared squares "
                         f"otherwise), got {cubes!r}")
    a = float(cube_um)
    if not np.isfinite(a) or a <= 0:
        raise ValueError(f"bcc_grid: cube_um must be a positive length in um, got {cube_um!r}")
    c = np.asarray(center_um, dtype=np.float64).reshape(3)

    m = n + 1
    idx = np.arange(m)
    li, lj, lk = np.meshgrid(idx, idx, idx, indexing="ij")  # ravel() is z fastest
    lattice = np.stack([li.ravel(), lj.ravel(), lk.ravel()], axis=1) * a - n * a / 2 + c
    cidx = np.arange(n)
    ci, cj, ck = np.meshgrid(cidx, cidx, cidx, indexing="ij")
    centres = np.stack([ci.ravel(), cj.ravel(), ck.ravel()], axis=1) * a - (n - 1) * a / 2 + c
    points = np.concatenate([lattice, centres])

    def lat(i, j, k):
        return (i * m + j) * m + k

    def cen(i, j, k):
        return m**3 + (i * n + j) * n + k

    tets = []
    # Cubes q and q + e_d share the square at lattice coordinate q_d + 1 along axis d. Its four
    # edges run along the two other axes (u, w); each edge plus the two centres is one tet.
    q = np.stack(np.meshgrid(cidx, cidx, cidx, indexing="ij"), axis=-1).reshape(-1, 3)
    for d in range(3):
        u, w = [ax for ax in range(3) if ax != d]
        qq = q[q[:, d] < n - 1]
        c0 = cen(qq[:, 0], qq[:, 1], qq[:, 2])
        nb = qq.copy()
        nb[:, d] += 1
        c1 = cen(nb[:, 0], nb[:, 1], nb[:, 2])
        corner = qq.copy()
        corner[:, d] += 1  # lower corner of the shared square
        for along, offset in ((u, w), (w, u)):
            for shift in (0, 1):
                p0 = corner.copy()
                p0[:, offset] += shift
                p1 = p0.copy()
                p1[:, along] += 1
                tets.append(np.stack([lat(*p0.T), lat(*p1.T), c0, c1], axis=1))
    tets = np.sort(np.concatenate(tets), axis=1)
    tets = tets[np.lexsort(tets.T[::-1])]
    tets = orient_positively(points, tets)
    return Grid(points=points, tets=tets, membrane_triangles=None,
                source=f"bcc_grid(cubes={n}, cube_um={a!r}, center_um={tuple(c.tolist())})")
