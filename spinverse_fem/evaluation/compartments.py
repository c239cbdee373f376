"""Sealed compartments of a barrier face set: the regions a membrane encloses.

Tets are joined through interior faces that are not barriers. With an absorbing (robin) grid
boundary, a region that reaches a non-barrier outer face drains through it; the others are
sealed compartments, which is what a long-diffusion-time signal sees. Comparing the sealed
compartments of a reconstruction with the ground truth's tells a topological failure (a torus
recovered as a disk: one compartment with the hole's tets added) from a small surface error.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from spinverse_fem.geometry.topology import FaceTable


def sealed_compartments(faces: FaceTable, barrier: np.ndarray,
                        outer_drains: bool = True) -> list[np.ndarray]:
    """Tet ids of every sealed compartment, largest first (ties: smallest first tet id).

    faces: canonical face table; barrier: (F,) bool. outer_drains: a region touching a
    non-barrier outer face is open (robin outer faces); with False (neumann) every region is
    sealed.
    """
    barrier = _mask(faces, barrier, "barrier")
    cells = faces.cells
    label = _regions(faces, barrier)
    is_open = np.zeros(label.max() + 1, dtype=bool)
    if outer_drains:
        draining = (cells[:, 1] < 0) & ~barrier
        is_open[label[cells[draining, 0]]] = True
    out = [np.flatnonzero(label == k) for k in np.flatnonzero(~is_open)]
    out.sort(key=lambda t: (-t.size, t[0]))
    return out


def compare_compartments(faces: FaceTable, pred: np.ndarray, truth: np.ndarray,
                         outer_drains: bool = True) -> dict:
    """JSON-able: tet counts of the sealed compartments (largest first) of a predicted and a
    true barrier set, and the tets whose sealed/open status differs."""
    nt = faces.tet_faces.shape[0]
    out = {}
    sealed = {}
    for name, mask in (("pred", pred), ("true", truth)):
        comps = sealed_compartments(faces, mask, outer_drains)
        out[f"{name}_sealed_compartment_tets"] = [int(c.size) for c in comps]
        s = np.zeros(nt, dtype=bool)
        for c in comps:
            s[c] = True
        sealed[name] = s
    out["sealed_status_mismatch_tets"] = int(np.sum(sealed["pred"] != sealed["true"]))
    return out


def face_sides(faces: FaceTable, pred: np.ndarray, truth: np.ndarray) -> dict:
    """Where a predicted barrier set lies relative to the true one: how many predicted faces
    are true faces ("on"), lie inside a region the truth encloses ("inside": both tets, or the
    one tet of an outer face, outside the largest truth region) or in the background, the
    largest region the true faces leave ("outside"). A reconstruction one layer of faces too
    large is all "outside", one too small all "inside"."""
    pred = _mask(faces, pred, "pred")
    truth = _mask(faces, truth, "truth")
    cells = faces.cells
    label = _regions(faces, truth)
    background = label == np.bincount(label).argmax()
    other = np.where(cells[:, 1] >= 0, cells[:, 1], cells[:, 0])
    in_background = background[cells[:, 0]] & background[other]
    off = pred & ~truth
    return {"on": int(np.sum(pred & truth)), "inside": int(np.sum(off & ~in_background)),
            "outside": int(np.sum(off & in_background))}


def _mask(faces: FaceTable, mask, name: str) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (faces.num_faces,):
        raise ValueError(f"{name} must have shape ({faces.num_faces},), got {mask.shape}")
    return mask


def _regions(faces: FaceTable, barrier: np.ndarray) -> np.ndarray:
    """(T,) region label of every tet: tets joined through interior non-barrier faces."""
    cells = faces.cells
    nt = faces.tet_faces.shape[0]
    joined = (cells[:, 1] >= 0) & ~barrier
    graph = coo_matrix((np.ones(int(joined.sum())), (cells[joined, 0], cells[joined, 1])),
                       shape=(nt, nt))
    return connected_components(graph, directed=False)[1]
