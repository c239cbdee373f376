"""Reconstruction metrics of the Spinverse paper: CD-L2, BadEdge% / Open% / Branch%, face scores.

Lengths in um, CD-L2 in um^2. Triangles are given either as coordinates (N, 3, 3) (triangle,
corner, xyz) or as vertex ids (N, 3) into a point array (V, 3).

CD-L2 (paper): 10 points per triangle at fixed barycentric coordinates, each cloud centred on
its own centroid, mean squared nearest-neighbour distance pred -> ref plus ref -> pred, and 0
when nothing is extracted. The paper convention makes an empty prediction score a perfect 0, so
`evaluate` reports `empty_prediction` next to it.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

# The paper's fixed barycentric samples (u, v); point = (1-u-v) v0 + u v1 + v v2. Kept verbatim
# for comparability although they cover the triangle unevenly: v0 and v2 are sampled but u never
# exceeds 0.5, so the corner v1 is not.
PAPER_BARYCENTRIC = np.array(
    [(0, 0), (0, .25), (0, .5), (0, .75), (0, 1),
     (.25, 0), (.25, .25), (.25, .5), (.25, .75), (.5, 0)], dtype=np.float64)

SAMPLINGS = ("paper", "area")


def _as_tris(tris: np.ndarray, name: str) -> np.ndarray:
    t = np.asarray(tris, dtype=np.float64)
    if t.size == 0:
        return np.zeros((0, 3, 3))
    if t.ndim != 3 or t.shape[1:] != (3, 3):
        raise ValueError(f"{name} must have shape (N, 3, 3) (triangle, corner, xyz), "
                         f"got {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name} contains non-finite coordinates")
    return t


def sample_paper(tris: np.ndarray) -> np.ndarray:
    """(10 N, 3) the paper's 10 fixed barycentric points of each of the N triangles (N, 3, 3)."""
    u = PAPER_BARYCENTRIC[:, 0][None, :, None]
    v = PAPER_BARYCENTRIC[:, 1][None, :, None]
    v0, v1, v2 = (tris[:, c][:, None, :] for c in range(3))
    return ((1.0 - u - v) * v0 + u * v1 + v * v2).reshape(-1, 3)


def sample_area(tris: np.ndarray, points_per_um2: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic area-uniform quadrature of the triangles (N, 3, 3).

    Each triangle is split into m^2 congruent sub-triangles, m = max(1, round(sqrt(density *
    area))), and sampled at their centroids; each point carries the weight area / m^2 (um^2), so
    weighted means are midpoint-rule surface averages whatever m each triangle gets.
    Returns points (S, 3) and weights (S,).
    """
    if not (np.isfinite(points_per_um2) and points_per_um2 > 0):
        raise ValueError(f"points_per_um2 must be positive, got {points_per_um2}")
    area = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]),
                                axis=1)
    m_all = np.maximum(1, np.rint(np.sqrt(points_per_um2 * area)).astype(np.int64))
    pts, wts = [], []
    for m in np.unique(m_all):
        sel = m_all == m
        bary = _subtriangle_centroids(int(m))  # (m^2, 3)
        t = tris[sel]
        pts.append(np.einsum("sc,ncx->nsx", bary, t).reshape(-1, 3))
        wts.append(np.repeat(area[sel] / m**2, m * m))
    if not pts:
        return np.zeros((0, 3)), np.zeros(0)
    return np.concatenate(pts), np.concatenate(wts)


def _subtriangle_centroids(m: int) -> np.ndarray:
    """(m^2, 3) barycentric centroids of the m^2 sub-triangles of the m-fold uniform split."""
    out = []
    for i in range(m):
        for j in range(m - i):
            # upright sub-triangle (i, j), (i+1, j), (i, j+1)
            out.append(((i + 1 / 3) / m, (j + 1 / 3) / m))
            if i + j < m - 1:
                # inverted sub-triangle (i+1, j), (i, j+1), (i+1, j+1)
                out.append(((i + 2 / 3) / m, (j + 2 / 3) / m))
    uv = np.array(out)
    return np.column_stack([1.0 - uv.sum(axis=1), uv[:, 0], uv[:, 1]])


def _one_way(a: np.ndarray, b: np.ndarray, wa: np.ndarray | None) -> float:
    d, _ = cKDTree(b).query(a, k=1)
    return float(np.average(d * d, weights=wa))


def chamfer_l2(pred_tris: np.ndarray, ref_tris: np.ndarray, centred: bool = True,
               sampling: str = "paper", points_per_um2: float = 1.0) -> float:
    """Symmetric Chamfer L2 distance (um^2) between two triangle soups (P, 3, 3) and (R, 3, 3).

    sampling="paper": the paper's 10 barycentric points per triangle, plain means.
    sampling="area": area-uniform points (`sample_area`, density points_per_um2), area-weighted
    means and centroids, so it does not depend on how the surfaces are triangulated.
    centred: subtract each cloud's own (weighted) centroid first (the paper does).
    Returns 0.0 for an empty prediction (paper convention); an empty reference with a non-empty
    prediction is an error.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    pred = _as_tris(pred_tris, "pred_tris")
    ref = _as_tris(ref_tris, "ref_tris")
    if pred.shape[0] == 0:
        return 0.0
    if ref.shape[0] == 0:
        raise ValueError("ref_tris is empty: the Chamfer distance to nothing is undefined")
    if sampling == "paper":
        a, b = sample_paper(pred), sample_paper(ref)
        wa = wb = None
    else:
        a, wa = sample_area(pred, points_per_um2)
        b, wb = sample_area(ref, points_per_um2)
    if centred:
        a = a - np.average(a, axis=0, weights=wa)
        b = b - np.average(b, axis=0, weights=wb)
    return _one_way(a, b, wa) + _one_way(b, a, wb)


def edge_statistics(tris_vertex_ids: np.ndarray) -> dict:
    """Edge-manifoldness of a triangle soup given as vertex ids (P, 3).

    Over the edges used at least once (num_edges): bad_edge_pct = % used by a number of
    triangles other than 2, open_pct = % used once, branch_pct = % used more than twice.
    All zero for an empty soup.
    """
    t = np.asarray(tris_vertex_ids)
    if t.size == 0:
        return dict(bad_edge_pct=0.0, open_pct=0.0, branch_pct=0.0, num_edges=0)
    if t.ndim != 2 or t.shape[1] != 3 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tris_vertex_ids must be integer (P, 3), got {t.dtype} {t.shape}")
    e = np.sort(t[:, [[0, 1], [1, 2], [0, 2]]].reshape(-1, 2), axis=1)
    if np.any(e[:, 0] == e[:, 1]):
        raise ValueError("tris_vertex_ids has a degenerate triangle (repeated vertex)")
    _, counts = np.unique(e, axis=0, return_counts=True)
    n = counts.size
    return dict(bad_edge_pct=100.0 * int(np.count_nonzero(counts != 2)) / n,
                open_pct=100.0 * int(np.count_nonzero(counts == 1)) / n,
                branch_pct=100.0 * int(np.count_nonzero(counts > 2)) / n,
                num_edges=int(n))


def face_scores(pred_mask: np.ndarray, true_mask: np.ndarray) -> dict:
    """Precision, recall and IoU of a predicted face set against the true one ((F,) bool each).

    A ratio whose denominator is 0 (e.g. precision of an empty prediction) is reported as 0.0.
    """
    p = np.asarray(pred_mask)
    t = np.asarray(true_mask)
    if p.dtype != bool or t.dtype != bool or p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"pred_mask and true_mask must be (F,) bool arrays of equal shape, got "
                         f"{p.dtype} {p.shape} and {t.dtype} {t.shape}")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    return dict(precision=ratio(tp, tp + fp), recall=ratio(tp, tp + fn),
                iou=ratio(tp, tp + fp + fn))


def evaluate(points: np.ndarray, faces: np.ndarray, pred_mask: np.ndarray,
             true_mask: np.ndarray, points_per_um2: float = 1.0) -> dict:
    """All metrics of a predicted interface on a grid.

    points: (V, 3) um; faces: (F, 3) vertex ids of every grid triangle; pred_mask, true_mask:
    (F,) bool. Keys: cd_l2 (paper, centred), cd_l2_uncentred, cd_l2_area (centred, area
    sampling), bad_edge_pct, open_pct, branch_pct, num_edges (of the prediction), precision,
    recall, iou, num_pred_faces, num_true_faces, empty_prediction.
    """
    points = np.asarray(points, dtype=np.float64)
    faces = np.asarray(faces)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (V, 3), got {points.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be integer (F, 3), got {faces.dtype} {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= points.shape[0]):
        raise ValueError("faces reference vertices outside points")
    scores = face_scores(pred_mask, true_mask)
    if np.asarray(pred_mask).shape[0] != faces.shape[0]:
        raise ValueError(f"masks have {np.asarray(pred_mask).shape[0]} entries for "
                         f"{faces.shape[0]} faces")
    pred_ids, true_ids = faces[pred_mask], faces[true_mask]
    pred, ref = points[pred_ids], points[true_ids]
    out = dict(
        cd_l2=chamfer_l2(pred, ref, centred=True, sampling="paper"),
        cd_l2_uncentred=chamfer_l2(pred, ref, centred=False, sampling="paper"),
        cd_l2_area=chamfer_l2(pred, ref, centred=True, sampling="area",
                              points_per_um2=points_per_um2),
    )
    out.update(edge_statistics(pred_ids))
    out.update(scores)
    out.update(num_pred_faces=int(pred_ids.shape[0]), num_true_faces=int(true_ids.shape[0]),
               empty_prediction=bool(pred_ids.shape[0] == 0))
    return out
