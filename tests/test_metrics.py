"""Tests of the reconstruction metrics (spinverse_fem.evaluation.metrics)."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from spinverse_fem.evaluation.metrics import (
    chamfer_l2,
    edge_statistics,
    evaluate,
    face_scores,
    sample_area,
)
from spinverse_fem.meshes.paper import paper_meshes_dir

MESH_DIR = str(paper_meshes_dir())
FILES = sorted(glob.glob(f"{MESH_DIR}/*.npz"))


def _load(path):
    d = np.load(path)
    points = d["points"].T.astype(np.float64)
    faces = d["facets"].T.astype(np.int64)
    gt = np.sort(d["boundary_faces"].T.astype(np.int64), axis=1)
    keyed = {tuple(t) for t in gt}
    mask = np.array([tuple(f) in keyed for f in np.sort(faces, axis=1)])
    assert mask.sum() == gt.shape[0]
    return points, faces, mask


def _brute_paper_cd(a_tris, b_tris, centred=True):
    """Independent reference: the paper's samples written out, full distance matrix, no KD-tree."""
    uv = [(0, 0), (0, .25), (0, .5), (0, .75), (0, 1),
          (.25, 0), (.25, .25), (.25, .5), (.25, .75), (.5, 0)]

    def cloud(tris):
        return np.array([(1 - u - v) * t[0] + u * t[1] + v * t[2] for t in tris for u, v in uv])

    a, b = cloud(a_tris), cloud(b_tris)
    if centred:
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
    return d2.min(axis=1).mean() + d2.min(axis=0).mean()


def test_identical_sets_give_zero():
    """CD of a surface with itself is 0 by definition, for every variant."""
    points, faces, mask = _load(FILES[18])
    tris = points[faces[mask]]
    for centred in (True, False):
        for sampling in ("paper", "area"):
            assert chamfer_l2(tris, tris, centred=centred, sampling=sampling) == 0.0


def test_translation():
    """A translated copy: 0 centred; 2|t|^2 uncentred when |t| is below half the smallest
    sample spacing (then every sample's nearest neighbour is its own translate)."""
    points, faces, mask = _load(FILES[19])
    tris = points[faces[mask]]
    t = np.array([0.11, -0.05, 0.07])
    for sampling in ("paper", "area"):
        assert chamfer_l2(tris + t, tris, sampling=sampling) == pytest.approx(0.0, abs=1e-20)
        unc = chamfer_l2(tris + t, tris, centred=False, sampling=sampling)
        assert unc == pytest.approx(2 * t @ t, rel=1e-10)
    # the precondition of the 2|t|^2 claim, checked on the paper samples
    u = np.array([0, 0, 0, 0, 0, .25, .25, .25, .25, .5])[:, None]
    v = np.array([0, .25, .5, .75, 1, 0, .25, .5, .75, 0])[:, None]
    pts = np.unique(np.round(np.concatenate(
        [(1 - u - v) * tr[0] + u * tr[1] + v * tr[2] for tr in tris]), 9), axis=0)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    assert np.linalg.norm(t) < 0.5 * d[d > 0].min()


def test_two_single_triangles_brute_force():
    """Two single triangles: equals the brute-force nearest-distance computation in the test."""
    a = np.array([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    b = np.array([[[1.0, 1.0, 1.0], [1.0, 4.0, 0.5], [-2.0, 1.0, 2.0]]])
    for centred in (True, False):
        got = chamfer_l2(a, b, centred=centred)
        assert got == pytest.approx(_brute_paper_cd(a, b, centred), rel=1e-12)
        assert got > 0
    # symmetric by definition
    assert chamfer_l2(a, b) == pytest.approx(chamfer_l2(b, a), rel=1e-12)


def test_hand_computed_parallel_triangles():
    """Hand-computed: the same triangle lifted by h along its normal is h^2 + h^2 uncentred."""
    a = np.array([[[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]])
    b = a + np.array([0.0, 0.0, 0.3])
    assert chamfer_l2(a, b, centred=False) == pytest.approx(2 * 0.09, rel=1e-12)


def test_ground_truth_pairs_brute_force():
    """Two different paper ground truths: KD-tree result equals the brute-force reference."""
    points, faces, m1 = _load(FILES[16])
    _, _, m2 = _load(FILES[18])
    a, b = points[faces[m1]], points[faces[m2]]
    for centred in (True, False):
        assert chamfer_l2(a, b, centred=centred) == pytest.approx(
            _brute_paper_cd(a, b, centred), rel=1e-12)


def test_empty_prediction_is_zero():
    """The paper's convention: nothing extracted gives CD 0; evaluate flags it."""
    points, faces, mask = _load(FILES[0])
    assert chamfer_l2(np.zeros((0, 3, 3)), points[faces[mask]]) == 0.0
    out = evaluate(points, faces, np.zeros(len(faces), bool), mask)
    assert out["empty_prediction"] and out["cd_l2"] == 0.0
    assert out["recall"] == 0.0 and out["num_edges"] == 0
    with pytest.raises(ValueError, match="ref_tris is empty"):
        chamfer_l2(points[faces[mask]], np.zeros((0, 3, 3)))


def test_area_sampling_quadrature():
    """Area sampling: weights sum to the triangles' areas (cross-product formula) and the weighted
    mean is the area centroid (the midpoint rule is exact for linear functions)."""
    rng = np.random.default_rng(3)
    tris = rng.normal(size=(7, 3, 3)) * rng.uniform(0.5, 5, size=(7, 1, 1))
    pts, w = sample_area(tris, points_per_um2=2.0)
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]),
                                 axis=1)
    assert w.sum() == pytest.approx(areas.sum(), rel=1e-12)
    centroid = (areas[:, None] * tris.mean(axis=1)).sum(0) / areas.sum()
    np.testing.assert_allclose((w[:, None] * pts).sum(0) / w.sum(), centroid, atol=1e-12)
    assert len(pts) >= 2.0 * areas.sum() * 0.5  # density roughly honoured


def test_area_sampling_independent_of_triangulation():
    """A square triangulated two different ways: the area CD is small, the paper CD is not
    (its fixed samples depend on vertex order and triangle shape)."""
    s = 6.0
    p = np.array([[0, 0, 0], [s, 0, 0], [s, s, 0], [0, s, 0]], float)
    a = p[np.array([[0, 1, 2], [0, 2, 3]])]
    c = np.array([s / 2, s / 2, 0])
    b = np.array([[p[i], p[(i + 1) % 4], c] for i in range(4)])
    coarse = chamfer_l2(a, b, sampling="area", points_per_um2=1.0)
    fine = chamfer_l2(a, b, sampling="area", points_per_um2=16.0)
    paper_cd = chamfer_l2(a, b, sampling="paper")
    # same square: nearest distances scale with the sample spacing, so CD ~ 1 / density -> 0
    assert fine < coarse / 8
    assert fine < 0.05 * paper_cd


def test_edge_statistics():
    """BadEdge/Open/Branch: closed ground truths 0 (per the data README); one triangle 100 % open;
    three triangles on one edge: 1 branch edge and 6 open ones out of 7 (counted by hand)."""
    for path in FILES:
        points, faces, mask = _load(path)
        st = edge_statistics(faces[mask])
        assert st["bad_edge_pct"] == 0.0 and st["num_edges"] == 1.5 * mask.sum()
    one = edge_statistics(np.array([[0, 1, 2]]))
    assert one == dict(bad_edge_pct=100.0, open_pct=100.0, branch_pct=0.0, num_edges=3)
    fan = edge_statistics(np.array([[0, 1, 2], [0, 1, 3], [1, 0, 4]]))
    assert fan["num_edges"] == 7
    assert fan["bad_edge_pct"] == pytest.approx(100.0)
    assert fan["open_pct"] == pytest.approx(600 / 7)
    assert fan["branch_pct"] == pytest.approx(100 / 7)
    two = edge_statistics(np.array([[0, 1, 2], [2, 1, 3]]))
    assert two["bad_edge_pct"] == pytest.approx(400 / 5)
    assert edge_statistics(np.zeros((0, 3), int))["num_edges"] == 0
    with pytest.raises(ValueError, match="degenerate"):
        edge_statistics(np.array([[0, 0, 1]]))


def test_face_scores_hand_made():
    """Precision/recall/IoU against counts done by hand."""
    true = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
    pred = np.array([1, 0, 1, 1, 0, 0, 0, 1], bool)
    # TP = 2 (faces 0, 2), FP = 2 (3, 7), FN = 2 (1, 6)
    s = face_scores(pred, true)
    assert s == pytest.approx(dict(precision=0.5, recall=0.5, iou=2 / 6))
    assert face_scores(true, true) == dict(precision=1.0, recall=1.0, iou=1.0)
    s = face_scores(np.zeros(8, bool), true)
    assert s == dict(precision=0.0, recall=0.0, iou=0.0)
    with pytest.raises(ValueError, match="bool"):
        face_scores(pred.astype(int), true)


def test_evaluate_ground_truth_against_others():
    """evaluate() agrees with the separately computed metrics; a perfect prediction scores 0/1."""
    points, faces, m1 = _load(FILES[17])
    _, _, m2 = _load(FILES[18])
    out = evaluate(points, faces, m1, m1)
    assert out["cd_l2"] == 0.0 and out["cd_l2_area"] == 0.0 and out["iou"] == 1.0
    assert out["bad_edge_pct"] == 0.0 and not out["empty_prediction"]
    out = evaluate(points, faces, m2, m1)
    assert out["cd_l2"] == pytest.approx(_brute_paper_cd(points[faces[m2]], points[faces[m1]]),
                                         rel=1e-12)
    assert out["cd_l2_uncentred"] == pytest.approx(
        _brute_paper_cd(points[faces[m2]], points[faces[m1]], centred=False), rel=1e-12)
    assert out["num_pred_faces"] == m2.sum() and out["num_true_faces"] == m1.sum()
    tp = np.count_nonzero(m1 & m2)
    assert out["precision"] == pytest.approx(tp / m2.sum())
    assert out["recall"] == pytest.approx(tp / m1.sum())
    with pytest.raises(ValueError, match="points"):
        evaluate(points.T, faces, m1, m1)
