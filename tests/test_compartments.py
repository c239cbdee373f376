"""Sealed compartments against shapes whose enclosed tets are known independently: the
analytic inside test of the generating shape (all 4 vertices inside) on the paper grid."""

import numpy as np

from spinverse_fem.evaluation.compartments import compare_compartments, sealed_compartments
from spinverse_fem.geometry.topology import build_face_table
from spinverse_fem.meshes.paper import paper_grid, paper_shape
from spinverse_fem.meshes.shapes import inside_tets, membrane_faces


def _grid():
    g = paper_grid()
    return g, build_face_table(g.tets, g.num_vertices)


def test_torus_and_sphere_enclose_their_inside_tets():
    g, table = _grid()
    for key, n_inside in (("torus", 64), ("sphere", None)):
        inside = inside_tets(g, paper_shape(key))
        comps = sealed_compartments(table, membrane_faces(table, inside))
        assert len(comps) == 1
        assert np.array_equal(np.sort(comps[0]), np.flatnonzero(inside))
        if n_inside is not None:
            assert comps[0].size == n_inside


def test_no_barrier_nothing_sealed_and_neumann_one_region():
    g, table = _grid()
    none = np.zeros(table.num_faces, dtype=bool)
    assert sealed_compartments(table, none) == []
    # reflecting boundary: the whole grid is one sealed region
    (whole,) = sealed_compartments(table, none, outer_drains=False)
    assert whole.size == g.tets.shape[0]


def test_every_face_a_barrier_seals_every_tet():
    g, table = _grid()
    comps = sealed_compartments(table, np.ones(table.num_faces, dtype=bool))
    assert len(comps) == g.tets.shape[0] and all(c.size == 1 for c in comps)


def test_torus_filled_as_a_disk_is_reported():
    """A torus whose hole is sealed too (the inversion's typical failure) has one larger
    compartment; the mismatch count is the hole's tets."""
    g, table = _grid()
    ring = inside_tets(g, paper_shape("torus"))
    c = g.points[g.tets].mean(axis=1)
    hole = (np.hypot(c[:, 0], c[:, 1]) < 10.0) & (np.abs(c[:, 2]) < 2.0) & ~ring
    disk = ring | hole
    out = compare_compartments(table, membrane_faces(table, disk), membrane_faces(table, ring))
    assert out["true_sealed_compartment_tets"] == [64]
    assert out["pred_sealed_compartment_tets"] == [int(disk.sum())]
    assert out["sealed_status_mismatch_tets"] == int(hole.sum()) > 0


def _neighbours(table, tets):
    """tets plus every tet sharing an interior face with one of them."""
    c = table.cells[table.cells[:, 1] >= 0]
    grown = tets.copy()
    grown[c[tets[c[:, 0]], 1]] = True
    grown[c[tets[c[:, 1]], 0]] = True
    return grown


def test_face_sides_of_a_grown_and_a_shrunk_sphere():
    """Reference: the sphere's inside tets grown (shrunk) by one layer of face neighbours: the
    grown set's faces all lie outside the true sphere, the shrunk set's all inside it, the
    truth's own faces all on it."""
    from spinverse_fem.evaluation.compartments import face_sides

    g, table = _grid()
    inside = inside_tets(g, paper_shape("sphere"))
    truth = membrane_faces(table, inside)
    grown = membrane_faces(table, _neighbours(table, inside))
    shrunk = membrane_faces(table, ~_neighbours(table, ~inside))
    assert face_sides(table, truth, truth) == {"on": int(truth.sum()), "inside": 0, "outside": 0}
    assert face_sides(table, grown, truth) == {"on": 0, "inside": 0, "outside": int(grown.sum())}
    assert shrunk.sum() > 0
    assert face_sides(table, shrunk, truth) == {"on": 0, "inside": int(shrunk.sum()),
                                                "outside": 0}
