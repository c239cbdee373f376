"""The analytic membrane surface by marching tetrahedra.

References: the closed-form sphere (every vertex at distance R from the centre to O(h^2),
area 4 pi R^2) and torus (area 4 pi^2 R r, minus nothing: the shapes chosen lie inside the
box), with the observed order of the area error; a single tetrahedron cut by hand.
"""

import numpy as np
import pytest

from spinverse_fem.config import parse_config
from spinverse_fem.evaluation.analytic_surface import analytic_surface, level_set_triangles


def area(tris):
    return 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]),
                                axis=1).sum()


def config(geometry: str):
    return parse_config(f"""
[grid]
kind = "bcc"
cubes = 4
cube_um = 8.0
[geometry]
{geometry}
[permeability]
barrier_um_per_ms = 0.01
open_um_per_ms = 100.0
[[sequence]]
type = "pgse"
delta_ms = 5.0
Delta_ms = 10.0
b_s_per_mm2 = [1000.0]
directions = [[1.0, 0.0, 0.0]]
""")


def test_one_tetrahedron_cut_by_hand():
    """Reference: the level x + y + z - 0.25 cuts the unit corner tet in the triangle
    (0.25, 0, 0), (0, 0.25, 0), (0, 0, 0.25) of area sqrt(3)/32; the level x + y - 0.5 puts
    two vertices on each side: a quadrilateral (two triangles) on the plane x + y = 0.5."""
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    tris = level_set_triangles(pts, np.array([[0, 1, 2, 3]]), pts.sum(axis=1) - 0.25)
    assert tris.shape == (1, 3, 3)
    np.testing.assert_allclose(np.sort(tris[0], axis=0), np.sort(0.25 * np.eye(3), axis=0))
    assert area(tris) == pytest.approx(np.sqrt(3) / 32)
    quad = level_set_triangles(pts, np.array([[0, 1, 2, 3]]), pts[:, 0] + pts[:, 1] - 0.5)
    assert quad.shape == (2, 3, 3)
    assert np.allclose(quad[:, :, 0] + quad[:, :, 1], 0.5)      # every vertex on the plane


def test_sphere_surface_is_second_order():
    """Reference: |x - c| = R on the vertices (error O(h^2)) and area 4 pi R^2; the area error
    falls at order >= 1.8 from refinement 2 to 4 to 8."""
    cfg = config('kind = "sphere"\ncenter_um = [0.0, 0.0, 0.0]\nradius_um = 10.0')
    errs = []
    for m in (2, 4, 8):
        tris = analytic_surface(cfg, refinement=m)
        r = np.linalg.norm(tris.reshape(-1, 3), axis=1)
        h = 8.0 / m
        assert np.max(np.abs(r - 10.0)) <= 0.5 * h * h / 10.0 + 1e-9
        errs.append(abs(area(tris) - 4 * np.pi * 100.0) / (4 * np.pi * 100.0))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    print("sphere area errors", errs, "rates", rates)
    assert errs[-1] < 6e-3 and min(rates) >= 1.8


def test_torus_area():
    """Reference: the torus area 4 pi^2 R r (R 8, r 3 um: inside the 32 um box) to 0.5 % with
    1 um cubes."""
    cfg = config('kind = "torus"\ncenter_um = [0.0, 0.0, 0.0]\naxis = [0.0, 0.0, 1.0]\n'
                 'major_radius_um = 8.0\nminor_radius_um = 3.0')
    tris = analytic_surface(cfg, spacing_um=1.0)
    assert area(tris) == pytest.approx(4 * np.pi**2 * 8.0 * 3.0, rel=5e-3)
