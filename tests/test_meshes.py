"""Grids, ground-truth shapes, the paper's files and mesh readers (meshes/*).

Organised like the maths: validation of a tetrahedral grid, the BCC grid (combinatorics and
metric), the box grid, analytic shapes, membranes of shapes, the paper's ground truths, readers.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from spinverse_fem.errors import InputError
from spinverse_fem.geometry.topology import build_face_table
from spinverse_fem.meshes.bcc import bcc_grid
from spinverse_fem.meshes.box import box_grid
from spinverse_fem.meshes.grid import Grid, membrane_mask, validate_grid
from spinverse_fem.meshes.paper import (
    list_paper_meshes,
    load_paper_ground_truth,
    paper_grid,
    paper_meshes_dir,
    paper_shape,
    random_paper_axon,
)
from spinverse_fem.meshes.readers import read_grid
from spinverse_fem.meshes.shapes import (
    BentAxon,
    Cylinder,
    Plane,
    Sphere,
    Torus,
    TwoAxons,
    catmull_rom,
    distance_to_polyline,
    inside_tets,
    is_closed_manifold,
    membrane_faces,
)

A_PAPER = 20.0 / 3.0
REPO = Path(__file__).resolve().parents[1]
SHIPPED_MSH = REPO / "meshes" / "data" / "cube_membrane.msh"


def det_volumes(points, tets):
    """Signed volumes from 4x4 determinants [[1, p_i]] / 6 (independent of the code)."""
    p = np.asarray(points, dtype=float)[np.asarray(tets)]
    mats = np.concatenate([np.ones(p.shape[:2] + (1,)), p], axis=2)
    # det[[1,p0],[1,p1],[1,p2],[1,p3]] = det[p1-p0; p2-p0; p3-p0] = 6 V (row reduction)
    return np.linalg.det(mats) / 6.0


def face_counts(tets):
    """Counter: sorted vertex triple -> number of tets using it (brute force)."""
    c = Counter()
    for t in np.asarray(tets).tolist():
        for tri in itertools.combinations(sorted(t), 3):
            c[tri] += 1
    return c


def edge_counts(triangles):
    c = Counter()
    for tri in np.asarray(triangles).tolist():
        for e in itertools.combinations(sorted(tri), 2):
            c[e] += 1
    return c


def brute_membrane(tets, inside):
    """Set of sorted triples used by exactly one inside tet (direct count)."""
    c = Counter()
    for t, ins in zip(np.asarray(tets).tolist(), inside):
        if ins:
            for tri in itertools.combinations(sorted(t), 3):
                c[tri] += 1
    return {f for f, k in c.items() if k == 1}


def mask_to_set(table, mask):
    return {tuple(f) for f in table.faces[mask].tolist()}


def paper_file(prefix: str) -> Path:
    (f,) = [p for p in list_paper_meshes() if p.name.startswith(prefix)]
    return f


# ---------------------------------------------------------------- validation of a grid

def _one_tet():
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=float)
    return points, np.array([[0, 1, 2, 3], [1, 2, 3, 4]])


def test_valid_two_tets_pass_and_volumes_match_determinants():
    """Reference: 4x4 determinant formula for tet volumes."""
    points, tets = _one_tet()
    assert det_volumes(points, tets)[1] > 0
    g = Grid(points=points, tets=tets, source="two.msh")
    np.testing.assert_allclose(g.volumes(), det_volumes(points, tets), rtol=1e-14)
    assert g.points.dtype == np.float64 and g.tets.dtype == np.int64


@pytest.mark.parametrize("case, field, words", [
    ("inverted", "tets", ["1 tets are inverted", "tet 0"]),
    ("duplicate", "tets", ["duplicate"]),
    ("out_of_range", "tets", ["outside [0, 5)"]),
    ("nonfinite", "points", ["non-finite", "vertex 2"]),
    ("degenerate", "tets", ["zero volume"]),
    ("nonconforming", "tets", ["more than two tets"]),
    ("bad_shape", "points", ["(V, 3)"]),
    ("float_tets", "tets", ["integer"]),
])
def test_validate_grid_rejects_bad_meshes_naming_the_file(case, field, words):
    """Reference: hand-built defective meshes; each message names file, field and defect."""
    points, tets = _one_tet()
    if case == "inverted":
        tets = np.array([[1, 0, 2, 3], [1, 2, 3, 4]])
    elif case == "duplicate":
        tets = np.array([[0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 2, 3]])
    elif case == "out_of_range":
        tets = np.array([[0, 1, 2, 3], [1, 2, 3, 5]])
    elif case == "nonfinite":
        points[2, 1] = np.nan
    elif case == "degenerate":
        points = np.vstack([points, [[2, 0, 0]]])
        tets = np.array([[0, 1, 2, 3], [0, 1, 5, 3]])  # 0, 1, 5 collinear on the x axis
    elif case == "nonconforming":
        # three tets on the triangle (0, 1, 2): apex 3 above it, apexes 4 and 5 below
        points = np.vstack([points[:4], [[0.2, 0.2, -1]], [[0.3, 0.1, -2]]])
        tets = np.array([[0, 1, 2, 3], [0, 2, 1, 4], [0, 2, 1, 5]])
    elif case == "bad_shape":
        points = points[:, :2]
    elif case == "float_tets":
        tets = tets.astype(float)
    with pytest.raises(InputError) as err:
        validate_grid(points, tets, "bad_mesh.msh")
    msg = str(err.value)
    assert err.value.source == "bad_mesh.msh" and "bad_mesh.msh" in msg
    assert err.value.field == field
    for w in words:
        assert w in msg, msg


def test_membrane_triangles_must_be_grid_faces():
    """Reference: (0, 1, 4) is not a face of the two hand-built tets."""
    points, tets = _one_tet()
    Grid(points, tets, membrane_triangles=np.array([[1, 2, 3]]), source="m.msh")
    with pytest.raises(InputError, match="m.msh: membrane_triangles: 1 membrane"):
        Grid(points, tets, membrane_triangles=np.array([[0, 1, 4]]), source="m.msh")


# ---------------------------------------------------------------- BCC grid

@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_bcc_counts(n):
    """Reference: combinatorics. Tets: 3 n^2 (n-1) shared squares x 4 edges. Outer faces:
    4 per outer square minus the squares' edges on the 12 box edges: 24 n (n-1). Interior:
    (4 T - outer) / 2 = 12 n (n-1) (2n-1)."""
    g = bcc_grid(n, 1.0)
    assert g.num_vertices == (n + 1) ** 3 + n**3
    assert g.num_tets == 12 * n**2 * (n - 1)
    counts = face_counts(g.tets)
    outer = sum(1 for k in counts.values() if k == 1)
    assert outer == 24 * n * (n - 1)
    assert len(counts) - outer == 12 * n * (n - 1) * (2 * n - 1)
    assert max(counts.values()) == 2
    table = build_face_table(g.tets, g.num_vertices)
    assert table.num_faces == len(counts)


def test_bcc_paper_counts():
    """Reference: the paper's numbers for n = 4 (576 tets, 1296 = 1008 + 288 triangles)."""
    g = paper_grid()
    t = build_face_table(g.tets, g.num_vertices)
    assert (g.num_vertices, g.num_tets, t.num_faces) == (189, 576, 1296)
    assert (int(t.interior.sum()), int(t.outer.sum())) == (1008, 288)


def test_bcc_congruent_tets_equal_faces_positive_orientation():
    """Reference: analytic volume a^3/12 and face area a^2 sqrt(2)/4 (sides a, a sqrt3/2,
    a sqrt3/2); total = box minus 6 n^2 outer pyramids of volume a^3/6; det orientation."""
    a, n = A_PAPER, 4
    g = bcc_grid(n, a, center_um=(1.0, -2.0, 0.5))
    vol = det_volumes(g.points, g.tets)
    np.testing.assert_allclose(vol, a**3 / 12, rtol=1e-12)
    np.testing.assert_allclose(vol.sum(), (n * a) ** 3 - 6 * n**2 * a**3 / 6, rtol=1e-12)
    tris = np.array(list(face_counts(g.tets)))
    p = g.points[tris]
    area = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    np.testing.assert_allclose(area, a**2 * math.sqrt(2) / 4, rtol=1e-12)
    assert abs(a**2 * math.sqrt(2) / 4 - 15.71) < 5e-3
    # the lattice is symmetric about its centre
    np.testing.assert_allclose(g.points.mean(axis=0), [1.0, -2.0, 0.5], atol=1e-12)


def test_bcc_matches_paper_files():
    """Reference: the paper's .npz (float32 points, sorted elements, canonical facets)."""
    g = paper_grid()
    d = np.load(paper_file("019"))
    pts = d["points"].T.astype(float)
    np.testing.assert_allclose(g.points, pts, atol=2e-6)  # float32 rounding of |x| <= 13.3
    # up to permutation as well: the sorted coordinate lists agree
    def order(q):
        return q[np.lexsort(np.round(q, 4).T)]

    np.testing.assert_allclose(order(g.points), order(pts), atol=2e-6)
    assert np.array_equal(np.sort(g.tets, axis=1), d["elements"].T)
    table = build_face_table(g.tets, g.num_vertices)
    assert np.array_equal(table.faces, d["facets"].T)


def test_bcc_rejects_bad_arguments():
    """Reference: n < 2 has no shared squares; a side must be positive."""
    with pytest.raises(ValueError, match="cubes"):
        bcc_grid(1, 1.0)
    with pytest.raises(ValueError, match="cube_um"):
        bcc_grid(3, -1.0)


# ---------------------------------------------------------------- box grid

def test_box_grid_volumes_conformity_numbering():
    """Reference: box volume and surface area (analytic); brute-force face counts."""
    lo, hi, cells = np.array([-1.0, 0.0, 2.0]), np.array([2.0, 1.0, 4.0]), (3, 2, 4)
    g = box_grid(lo, hi, cells)
    vol = det_volumes(g.points, g.tets)
    assert g.num_tets == 6 * 24 and np.all(vol > 0)
    np.testing.assert_allclose(vol.sum(), np.prod(hi - lo), rtol=1e-13)
    counts = face_counts(g.tets)
    assert max(counts.values()) == 2
    outer = np.array([f for f, k in counts.items() if k == 1])
    p = g.points[outer]
    area = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    L = hi - lo
    np.testing.assert_allclose(area.sum(), 2 * (L[0] * L[1] + L[1] * L[2] + L[0] * L[2]))
    # each outer face lies in one of the six box planes
    in_plane = np.isclose(p, lo).all(axis=1) | np.isclose(p, hi).all(axis=1)  # (M, 3) axes
    assert in_plane.any(axis=1).all()
    # x fastest numbering: vertex i + 4 (j + 3 k) at lo + (i, j, k) h
    h = L / np.array(cells)
    np.testing.assert_allclose(g.points[1 + 4 * (2 + 3 * 1)], lo + np.array([1, 2, 1]) * h)


# ---------------------------------------------------------------- analytic shapes

def test_shapes_inside_analytic_points():
    """Reference: hand-computed memberships of specific points."""
    pts = np.array([[0, 0, 0], [0.9, 0, 0], [1.1, 0, 0], [0, 0, 5]], dtype=float)
    assert Sphere((0, 0, 0), 1.0).inside(pts).tolist() == [True, True, False, False]
    assert Plane("x", 1.0).inside(pts).tolist() == [True, True, False, True]
    assert Plane((2, 0, 0), 1.0).inside(pts).tolist() == [True, True, False, True]
    assert Cylinder((0, 0, 0), "z", 1.0).inside(pts).tolist() == [True, True, False, True]
    assert Cylinder((0, 0, 0), "z", 1.0, 8.0).inside(pts).tolist() == [True, True, False, False]
    # torus R 3 r 1 around z: ring points (3, 0, 0) and (0, -3.9, 0) in, centre and (5, 0, 0) out
    t = Torus((0, 0, 0), (0, 0, 2), 3.0, 1.0)
    q = np.array([[3, 0, 0], [0, -3.9, 0], [0, 0, 0], [5, 0, 0], [3, 0, 0.99], [3, 0, 1.01]])
    assert t.inside(q).tolist() == [True, True, False, False, True, False]
    # tilted cylinder: axis (0, -1, 1)/sqrt2, (0, -5, 5) is on the axis, (0, 5, 5) is 7.07 off
    c = Cylinder((0, 0, 0), (0, -1, 1), 2.0, 22.0)
    assert c.inside(np.array([[0, -5, 5], [0, 5, 5], [0, -9, 9]])).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="axis"):
        Cylinder((0, 0, 0), (0, 0, 0), 1.0)


def test_catmull_rom_and_polyline_distance():
    """References: the spline interpolates its control points; distances equal a brute-force
    minimum over a very dense resampling of the polyline."""
    rng = np.random.default_rng(3)
    c = rng.normal(size=(5, 3)) * 4
    curve = catmull_rom(c, 16)
    np.testing.assert_allclose(curve[::16], c, atol=1e-12)
    p = rng.normal(size=(50, 3)) * 5
    s = np.linspace(0, 1, 201)[:, None]
    dense = np.concatenate([a + s * (b - a) for a, b in zip(curve[:-1], curve[1:])])
    brute = np.min(np.linalg.norm(p[:, None] - dense[None], axis=2), axis=1)
    d = distance_to_polyline(p, curve)
    # the dense points lie on the polyline (brute >= exact) within half a spacing of any point
    half_spacing = np.max(np.linalg.norm(np.diff(curve, axis=0), axis=1)) / 200 / 2
    assert np.all(d <= brute + 1e-12) and np.all(brute - d <= half_spacing + 1e-12)


def test_straight_axon_is_a_cylinder():
    """Reference: Cylinder (infinite) around the same line, away from the axon's end caps."""
    axon = BentAxon(((0, 0, -30), (0, 0, 0), (0, 0, 30)), 4.0)
    p = np.random.default_rng(0).uniform(-10, 10, size=(2000, 3))
    assert np.array_equal(axon.inside(p), Cylinder((0, 0, 0), "z", 4.0).inside(p))


def test_random_axon_like_paper():
    """Reference: the paper's axon set-up (r 4.2-5.5 um, 4-9 segments, crossing the box along
    one axis and leaving through two opposite faces only)."""
    g = paper_grid()
    t = build_face_table(g.tets, g.num_vertices)
    half = 40 / 3
    for seed in range(6):
        a = BentAxon.random(seed)
        assert a == BentAxon.random(seed)
        assert 4.2 <= a.radius_um <= 5.5 and 4 <= a.segments <= 9
        ends = np.array(a.control_points_um)[[0, -1]]
        axis = int(np.argmax(np.abs(ends[1] - ends[0])))
        assert ends[0, axis] < -half and ends[1, axis] > half
        curve = a.curve()
        lateral = [d for d in range(3) if d != axis]
        assert np.max(np.abs(curve[:, lateral])) + a.radius_um <= half - 2.0  # side margin
        mem = membrane_faces(t, inside_tets(g, a, rule="centroid"))
        c = g.points[t.faces[mem & t.outer]].mean(axis=1)
        sides = {(int(np.argmax(np.abs(x))), bool(x[np.argmax(np.abs(x))] > 0)) for x in c}
        assert sides == {(axis, False), (axis, True)}


def test_random_paper_axon_closed_and_in_range():
    """Reference: the paper's 16 axons (66-105 inside tets, closed 2-manifold membranes);
    closedness by brute-force edge counting."""
    g = paper_grid()
    for seed in range(3):
        axon, inside, mem = random_paper_axon(seed)
        assert 66 <= inside.sum() <= 105
        assert np.array_equal(inside, axon.inside(g.points[g.tets].mean(axis=1)))
        t = build_face_table(g.tets, g.num_vertices)
        assert mask_to_set(t, mem) == brute_membrane(g.tets, inside)
        assert set(edge_counts(t.faces[mem]).values()) == {2}


def test_two_axons_disjoint_union():
    """References: brute-force distance between densely sampled tubes' centre lines; union
    semantics; an intersecting pair is rejected."""
    pair = TwoAxons.random(1, min_gap_um=1.0)
    c1, c2 = pair.first.curve(), pair.second.curve()
    d = np.min(np.linalg.norm(c1[:, None] - c2[None], axis=2))
    assert d >= pair.first.radius_um + pair.second.radius_um + 1.0 - 1e-9
    p = np.random.default_rng(2).uniform(-14, 14, size=(3000, 3))
    assert np.array_equal(pair.inside(p), pair.first.inside(p) | pair.second.inside(p))
    a = BentAxon(((0, 0, -20), (0, 0, 20)), 3.0)
    b = BentAxon(((4, 0, -20), (4, 0, 20)), 3.0)
    with pytest.raises(ValueError, match="apart"):
        TwoAxons(a, b)


# ---------------------------------------------------------------- membranes of shapes

def test_membrane_faces_matches_direct_count():
    """Reference: brute-force count of inside tets per sorted vertex triple."""
    g = bcc_grid(3, 2.0)
    t = build_face_table(g.tets, g.num_vertices)
    inside = np.random.default_rng(5).random(g.num_tets) < 0.4
    mem = membrane_faces(t, inside)
    assert mask_to_set(t, mem) == brute_membrane(g.tets, inside)
    # the membrane is the mod-2 boundary of the inside region: every edge count is even
    assert all(k % 2 == 0 for k in edge_counts(t.faces[mem]).values())
    sph = Sphere((0.3, 0, 0), 2.5)
    ins = np.array([all(np.linalg.norm(g.points[v] - [0.3, 0, 0]) <= 2.5 for v in tet)
                    for tet in g.tets])
    assert np.array_equal(inside_tets(g, sph), ins)


def test_is_closed_manifold():
    """Reference: a tet's 4 faces are closed; 3 of them are not."""
    g = bcc_grid(2, 1.0)
    t = build_face_table(g.tets, g.num_vertices)
    m = np.zeros(t.num_faces, bool)
    m[t.tet_faces[0]] = True
    assert is_closed_manifold(t, m)
    m[t.tet_faces[0, 0]] = False
    assert not is_closed_manifold(t, m)


@pytest.mark.parametrize("name, prefix", [("tilted_cylinder", "016"), ("cylinder", "017"),
                                          ("sphere", "018"), ("torus", "019")])
def test_paper_shapes_reproduce_files_exactly(name, prefix):
    """Reference: the paper's boundary_faces (as vertex-triple sets), compared with the
    membrane generated on our float64 grid; no vertex is within 1e-3 um of the surface, so the
    closed-set tolerance policy and float32 rounding cannot matter."""
    f = paper_file(prefix)
    shape = paper_shape(name)
    assert paper_shape(f.stem) is shape
    g = paper_grid()
    t = build_face_table(g.tets, g.num_vertices)
    mem = membrane_faces(t, inside_tets(g, shape))
    ref = {tuple(sorted(x)) for x in np.load(f)["boundary_faces"].T.tolist()}
    assert mask_to_set(t, mem) == ref
    assert np.min(np.abs(shape.level(g.points))) > 1e-3
    assert np.array_equal(shape.inside(np.load(f)["points"].T.astype(float)),
                          shape.inside(g.points))


def test_paper_shape_errors():
    """Reference: bent-axon curves are unpublished; unknown names are rejected."""
    with pytest.raises(InputError, match="not published"):
        paper_shape("000_bentaxon_r4.58_seg9_fill0.115_tets66_bf88")
    with pytest.raises(InputError, match="unknown paper shape"):
        paper_shape("cube")


# ---------------------------------------------------------------- the paper's ground truths

def test_paper_ground_truths_closed_manifolds():
    """Reference: brute-force edge counts of each file's boundary_faces (every membrane edge
    in exactly two membrane triangles) and the file names' face counts (_bf<B>)."""
    files = list_paper_meshes()
    assert len(files) == 20
    for f in files:
        g, mask = load_paper_ground_truth(f)
        bf = np.load(f)["boundary_faces"].T
        assert set(edge_counts(bf).values()) == {2}, f.name
        t = build_face_table(g.tets, g.num_vertices)
        assert mask_to_set(t, mask) == {tuple(sorted(x)) for x in bf.tolist()}
        assert np.all(det_volumes(g.points, g.tets) > 0)
        if "_bf" in f.stem:
            assert mask.sum() == int(f.stem.rsplit("_bf", 1)[1])
    # same grid as the generator: identical tets, vertices up to float32 rounding
    assert np.array_equal(g.tets, paper_grid().tets)


def test_paper_loader_errors(tmp_path, monkeypatch):
    """Reference: a corrupted copy (a membrane triangle that is no grid face) and a missing
    directory must raise InputError naming the file / directory."""
    d = dict(np.load(paper_file("018")))
    d["boundary_faces"] = d["boundary_faces"].copy()
    d["boundary_faces"][:, 0] = [0, 1, 188]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **d)
    with pytest.raises(InputError, match=r"bad\.npz: boundary_faces"):
        load_paper_ground_truth(bad)
    monkeypatch.setenv("SPINVERSE_PAPER_MESHES", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="nowhere"):
        paper_meshes_dir()
    monkeypatch.setenv("SPINVERSE_PAPER_MESHES", str(tmp_path))
    assert list_paper_meshes() == [bad]


# ---------------------------------------------------------------- readers

def _plane_membrane(points, tets, x0):
    """Triangles of the tets lying in the plane x = x0 (by coordinates, brute force)."""
    return {f for f in face_counts(tets) if np.allclose(points[list(f), 0], x0)}


def _canon_tets(points, tets):
    """Tets as sets of vertex coordinates (rounded), for comparisons up to vertex numbering."""
    return sorted(tuple(sorted(tuple(np.round(points[v], 6)) for v in t)) for t in tets)


def _canon_tris(points, tris):
    return sorted(tuple(sorted(tuple(np.round(points[v], 6)) for v in t)) for t in tris)


def test_shipped_cube_membrane():
    """Reference: the data README's recipe redone by coordinates (box [-10, 10]^3, 4^3 cubes,
    membrane = the 32 triangles at x = 0)."""
    g = read_grid(SHIPPED_MSH, membrane_tag=2)
    ref = box_grid((-10, -10, -10), (10, 10, 10), (4, 4, 4))
    np.testing.assert_allclose(g.points, ref.points)
    assert np.array_equal(g.tets, ref.tets)
    assert {tuple(sorted(t)) for t in g.membrane_triangles.tolist()} == \
        _plane_membrane(ref.points, ref.tets, 0.0)
    assert len(g.membrane_triangles) == 32
    every = read_grid(SHIPPED_MSH)
    assert every.membrane_triangles.shape == (32 + 192, 3)
    with pytest.raises(InputError, match=r"cube_membrane\.msh: membrane_tag: no triangles "
                                         r"tagged 7 \(tags present: \[1, 2\]\)"):
        read_grid(SHIPPED_MSH, membrane_tag=7)


def test_msh_round_trip(tmp_path):
    """Reference: a grid written by meshio (gmsh 2.2 binary) reads back unchanged."""
    import meshio

    g = box_grid((0, 0, 0), (3, 2, 2), (3, 2, 2))
    tris = np.array(sorted(_plane_membrane(g.points, g.tets, 1.0)))
    path = tmp_path / "rt.msh"
    meshio.write(str(path), meshio.Mesh(g.points, [("tetra", g.tets), ("triangle", tris)],
                                        cell_data={"gmsh:physical": [np.full(len(g.tets), 1),
                                                                     np.full(len(tris), 4)],
                                                   "gmsh:geometrical": [
                                                       np.full(len(g.tets), 1),
                                                       np.full(len(tris), 1)]}),
                 file_format="gmsh22", binary=True)
    r = read_grid(path, membrane_tag=4)
    np.testing.assert_allclose(r.points, g.points)
    assert np.array_equal(r.tets, g.tets)
    assert np.array_equal(r.membrane_triangles, tris)


def test_xdmf_round_trip_dolfinx(tmp_path):
    """Reference: dolfinx's own XDMFFile (mesh + facet meshtags located geometrically at
    x = -10/3); compared up to vertex renumbering by coordinates."""
    import dolfinx_solver  # noqa: F401  (loads the MPI/PETSc libraries dolfinx needs)
    import basix.ufl
    from dolfinx import io, mesh
    from mpi4py import MPI

    g = box_grid((-10, -10, -10), (10, 10, 10), (3, 3, 2))
    el = basix.ufl.element("Lagrange", "tetrahedron", 1, shape=(3,))
    msh = mesh.create_mesh(MPI.COMM_SELF, g.tets, el, g.points)
    msh.topology.create_connectivity(2, 3)
    facets = mesh.locate_entities(msh, 2, lambda x: np.isclose(x[0], -10 / 3))
    tags = mesh.meshtags(msh, 2, facets, np.full(len(facets), 5, dtype=np.int32))
    tags.name = "membrane"
    path = tmp_path / "rt.xdmf"
    with io.XDMFFile(MPI.COMM_SELF, str(path), "w") as xf:
        xf.write_mesh(msh)
        xf.write_meshtags(tags, msh.geometry)
    r = read_grid(path, membrane_tag=5)
    assert _canon_tets(r.points, r.tets) == _canon_tets(g.points, g.tets)
    ref = np.array(sorted(_plane_membrane(g.points, g.tets, -10 / 3)))
    assert _canon_tris(r.points, r.membrane_triangles) == _canon_tris(g.points, ref)
    assert np.all(det_volumes(r.points, r.tets) > 0)


def test_xdmf_meshio_single_grid(tmp_path):
    """Reference: meshio's XDMF writer (one grid, tetra only) round trip."""
    import meshio

    g = box_grid((0, 0, 0), (1, 1, 1), (2, 1, 1))
    path = tmp_path / "m.xdmf"
    meshio.write(str(path), meshio.Mesh(g.points, [("tetra", g.tets)]))
    r = read_grid(path)
    assert np.array_equal(r.tets, g.tets) and r.membrane_triangles is None


def test_reader_errors_name_the_file(tmp_path):
    """Reference: missing file, unknown extension, no tetrahedra, inverted and duplicate tets
    in files written with meshio."""
    import meshio

    with pytest.raises(InputError, match="absent.msh"):
        read_grid(tmp_path / "absent.msh")
    other = tmp_path / "grid.vtk"
    other.write_text("x")
    with pytest.raises(InputError, match=r"grid\.vtk: unknown mesh extension"):
        read_grid(other)
    points, tets = _one_tet()
    cases = {
        "tris_only.msh": ([("triangle", np.array([[0, 1, 2]]))], "no tetrahedra"),
        "inverted.msh": ([("tetra", np.array([[0, 1, 2, 3], [2, 1, 3, 4]]))],
                         "1 tets are inverted"),
        "duplicate.msh": ([("tetra", np.array([[0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 2, 3]]))],
                          "duplicate"),
    }
    for name, (cells, words) in cases.items():
        path = tmp_path / name
        meshio.write(str(path), meshio.Mesh(points, cells), file_format="gmsh22", binary=False)
        with pytest.raises(InputError) as err:
            read_grid(path)
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    bad = tmp_path / "garbage.xdmf"
    bad.write_text("<Xdmf><Domain>")
    with pytest.raises(InputError, match=r"garbage\.xdmf"):
        read_grid(bad)


@pytest.mark.parametrize("cells, words", [
    ([("hexahedron", np.arange(8)[None])], "1 hexahedron cell(s) among the tetrahedra"),
    ([("wedge", np.arange(6)[None]), ("pyramid", np.arange(5)[None])],
     "1 pyramid, 1 wedge cell(s)"),
    ([("quad", np.arange(4)[None])], "1 quad cell(s)"),
])
def test_other_cells_among_tetrahedra_are_refused(tmp_path, cells, words):
    """Reference: issue 11 (a hexahedron used to be dropped without a word, leaving a hole)."""
    import meshio

    pts = np.vstack([_one_tet()[0], np.random.default_rng(0).uniform(2, 3, (8, 3))])
    path = tmp_path / "mixed.msh"
    meshio.write(str(path), meshio.Mesh(pts, [("tetra", np.array([[0, 1, 2, 3]])),
                                              *[(k, c + 5) for k, c in cells]]),
                 file_format="gmsh22", binary=False)
    with pytest.raises(InputError) as err:
        read_grid(path)
    assert err.value.source == str(path) and err.value.field == "cells"
    assert words in str(err.value), str(err.value)


def test_points_and_lines_of_gmsh_are_ignored(tmp_path):
    """gmsh writes its physical points and curves as vertex / line cells: not refused."""
    import meshio

    g = box_grid((0, 0, 0), (1, 1, 1), (1, 1, 1))
    path = tmp_path / "with_lines.msh"
    meshio.write(str(path), meshio.Mesh(g.points, [("vertex", np.array([[0]])),
                                                   ("line", np.array([[0, 1]])),
                                                   ("tetra", g.tets)]),
                 file_format="gmsh22", binary=False)
    assert np.array_equal(read_grid(path).tets, g.tets)


@pytest.mark.parametrize("content", [b"garbage\x00\x01 not a mesh\n", b"",
                                     b"$MeshFormat\n2.2 0 8\n$EndMeshFormat\n$Nodes\n3\n"])
def test_garbage_msh_raises_input_error_silently(tmp_path, capfd, content):
    """meshio.read prints and calls sys.exit(1) on such files: the reader must neither exit
    nor print, and name the file."""
    path = tmp_path / "garbage.msh"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"garbage\.msh: cannot read as gmsh"):
        read_grid(path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_reader_turns_system_exit_into_input_error(tmp_path, monkeypatch):
    """Any meshio reader that exits is caught (SystemExit is not an Exception)."""
    import meshio

    def exits(_):
        print("Error: something")
        raise SystemExit(1)

    monkeypatch.setattr(meshio.gmsh, "read", exits)
    path = tmp_path / "m.msh"
    path.write_text("x")
    with pytest.raises(InputError, match=r"m\.msh: cannot read as gmsh: Error: something"):
        read_grid(path)


def test_membrane_mask_lookup():
    """Reference: positions of the triples in the canonical (lexicographic) face list."""
    g = bcc_grid(2, 1.0)
    t = build_face_table(g.tets, g.num_vertices)
    pick = t.faces[[3, 10, 20]][:, ::-1]  # any vertex order
    assert np.flatnonzero(membrane_mask(t, pick, "x")).tolist() == [3, 10, 20]
    with pytest.raises(InputError, match="x: membrane_triangles: 1 membrane"):
        membrane_mask(t, np.array([[0, 1, 2]]), "x")


def test_volume_tags_are_read(tmp_path):
    """Reference: the tags written (compartments): the shipped gmsh file's one physical volume
    (3 on all 384 tets); a gmsh 2.2 file and a meshio XDMF file with two volumes split at
    x = 1.5 read back tet by tet; a file without tags gives None."""
    import meshio

    assert np.array_equal(read_grid(SHIPPED_MSH, membrane_tag=2).tet_tags, np.full(384, 3))
    g = box_grid((0, 0, 0), (3, 2, 2), (3, 2, 2))
    vol = np.where(g.points[g.tets].mean(axis=1)[:, 0] < 1.5, 1, 2)
    tris = np.array(sorted(_plane_membrane(g.points, g.tets, 1.0)))
    msh = tmp_path / "two.msh"
    meshio.write(str(msh), meshio.Mesh(g.points, [("tetra", g.tets), ("triangle", tris)],
                                       cell_data={"gmsh:physical": [vol, np.full(len(tris), 4)],
                                                  "gmsh:geometrical": [vol, np.ones(len(tris))]}),
                 file_format="gmsh22", binary=False)
    assert np.array_equal(read_grid(msh, membrane_tag=4).tet_tags, vol)
    xdmf = tmp_path / "two.xdmf"
    meshio.write(str(xdmf), meshio.Mesh(g.points, [("tetra", g.tets)],
                                        cell_data={"volume": [vol]}))
    assert np.array_equal(read_grid(xdmf).tet_tags, vol)
    plain = tmp_path / "plain.xdmf"
    meshio.write(str(plain), meshio.Mesh(g.points, [("tetra", g.tets)]))
    assert read_grid(plain).tet_tags is None
