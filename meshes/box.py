"""Structured tetrahedral box: every cube split into 6 tets around its main diagonal.

The Kuhn (Freudenthal) split: for each permutation (p, q, r) of the axes, the tet
v, v + e_p, v + e_p + e_q, v + e_p + e_q + e_r, where v is the cube's lower corner. All cubes
are split the same way, so each cube face is cut along the same diagonal on both sides and the
grid is conforming.

Vertex numbering: lattice point (i, j, k) has id i + (nx + 1) (j + (ny + 1) k) (x fastest,
as dolfinx's create_box). Tets: cube by cube (x fastest), 6 per cube in a fixed order; each
is positively oriented.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

from spinverse_fem.meshes.grid import Grid, orient_positively


def box_grid(lower_um, upper_um, cells) -> Grid:
    """Box [lower_um, upper_um] (each (3,) um) with cells = (nx, ny, nz) cubes per axis.

    Returns a Grid with (nx+1)(ny+1)(nz+1) vertices and 6 nx ny nz tets.
    """
    lo = np.asarray(lower_um, dtype=np.float64).reshape(3)
    hi = np.asarray(upper_um, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(hi > lo)):
        raise ValueError(f"box_grid: need finite lower_um < upper_um on every axis, got "
                         f"{lo.tolist()} and {hi.tolist()}")
    nc = np.asarray(cells).reshape(3)
    if not np.issubdtype(nc.dtype, np.integer) or np.any(nc < 1):
        raise ValueError(f"box_grid: cells must be three positive integers, got {cells!r}")
    nx, ny, nz = (int(v) for v in nc)

    xs = [np.linspace(lo[d], hi[d], int(nc[d]) + 1) for d in range(3)]
    z, y, x = np.meshgrid(xs[2], xs[1], xs[0], indexing="ij")  # ravel() is x fastest
    points = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)

    def vid(i, j, k):
        return i + (nx + 1) * (j + (ny + 1) * k)

    ck, cj, ci = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    corner = np.stack([ci.ravel(), cj.ravel(), ck.ravel()], axis=1)  # cubes, x fastest
    unit = np.eye(3, dtype=np.int64)
    per_cube = []
    for perm in permutations(range(3)):
        path = [np.zeros(3, dtype=np.int64)]
        for ax in perm:
            path.append(path[-1] + unit[ax])
        per_cube.append(np.stack([vid(*(corner + s).T) for s in path], axis=1))
    tets = np.stack(per_cube, axis=1).reshape(-1, 4)
    tets = orient_positively(points, tets)
    return Grid(points=points, tets=tets, membrane_triangles=None,
                source=f"box_grid({lo.tolist()}, {hi.tolist()}, ({nx}, {ny}, {nz}))")
