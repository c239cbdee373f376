"""The true (smooth) membrane surface of an analytic ground truth, as a fine triangle soup.

Scoring a reconstruction against the grid's own staircase truth measures the grid as much as
the method when the targets come from a finer grid (`experiments/refined_grids.py`). This
module gives the surface itself: the zero level set of the shape's level function
(`meshes.shapes`, negative inside) inside the grid's bounding box, by marching tetrahedra on
the configured grid refined many times (linear interpolation along the edges where the level
changes sign: second-order accurate in the spacing). The grid's domain clips the surface.
"""

from __future__ import annotations

import numpy as np

from spinverse_fem.geometry.phantom import build_grid, geometry_shape


def level_set_triangles(points: np.ndarray, tets: np.ndarray, level: np.ndarray) -> np.ndarray:
    """(N, 3, 3) triangles of the zero level set of a piecewise-linear function on a tet grid.

    points (V, 3) um, tets (T, 4) vertex ids, level (V,) (inside: level <= 0). A tet with one
    vertex on one side gives a triangle, one with two on each side a quadrilateral (two
    triangles); orientation is not consistent (Chamfer distances do not need it)."""
    neg = level[tets] <= 0.0
    count = neg.sum(axis=1)
    out = []

    def crossing(a, b):
        la, lb = level[a], level[b]
        t = (la / (la - lb))[:, None]
        return points[a] + t * (points[b] - points[a])

    # one vertex apart (1 inside or 3 inside): the odd vertex and the other three
    for odd_inside in (True, False):
        sel = count == (1 if odd_inside else 3)
        if not sel.any():
            continue
        t4 = tets[sel]
        flag = neg[sel] if odd_inside else ~neg[sel]
        odd = np.argmax(flag, axis=1)
        a = t4[np.arange(t4.shape[0]), odd]
        rest = np.array([[j for j in range(4) if j != i] for i in range(4)])[odd]
        others = np.take_along_axis(t4, rest, axis=1)
        out.append(np.stack([crossing(a, others[:, k]) for k in range(3)], axis=1))
    # two and two: the quadrilateral p-r, p-s, q-s, q-r
    sel = count == 2
    if sel.any():
        t4 = tets[sel]
        order = np.argsort(~neg[sel], axis=1, kind="stable")   # inside vertices first
        v = np.take_along_axis(t4, order, axis=1)
        p, q, r, s = v.T
        quad = [crossing(p, r), crossing(p, s), crossing(q, s), crossing(q, r)]
        out.append(np.stack([quad[0], quad[1], quad[2]], axis=1))
        out.append(np.stack([quad[0], quad[2], quad[3]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3, 3))


def analytic_surface(cfg, spacing_um: float = 0.5, refinement: int | None = None
                     ) -> np.ndarray:
    """(N, 3, 3) triangles (um) of the surface of the configured analytic ground truth
    ([geometry]) inside the domain of the configured grid, marched on that grid refined until
    its cubes are at most spacing_um (or `refinement` times). ValueError when [geometry] has no
    analytic shape (none, paper, file_tags) or the grid is not a bcc or box grid."""
    shape = geometry_shape(cfg.geometry)
    if shape is None:
        raise ValueError(f"geometry kind {cfg.geometry.kind!r} has no analytic surface")
    if refinement is None:
        if cfg.grid.kind == "bcc":
            cell = cfg.grid.cube_um
        elif cfg.grid.kind == "box":
            cell = max((u - lo) / c for lo, u, c in zip(cfg.grid.lower_um, cfg.grid.upper_um,
                                                       cfg.grid.cells))
        else:
            raise ValueError(f"grid kind {cfg.grid.kind!r} cannot be refined")
        refinement = max(1, int(np.ceil(cell / spacing_um)))
    grid = build_grid(cfg.grid, cfg.source, refinement=refinement)
    return level_set_triangles(grid.points, grid.tets, shape.level(grid.points))
