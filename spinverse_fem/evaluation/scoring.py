"""Scoring a permeability field against a ground truth: the interface (faces with kappa below
the threshold), its metrics (CD-L2, BadEdge%, face IoU, ...) and its sealed compartments."""

from __future__ import annotations

import numpy as np

from spinverse_fem.evaluation.compartments import compare_compartments, sealed_compartments
from spinverse_fem.evaluation.interface import extract_interface
from spinverse_fem.evaluation.metrics import edge_statistics, evaluate


def score(phantom, kappa: np.ndarray, threshold_um_per_ms: float,
          truth: np.ndarray | None) -> dict:
    """JSON-able metrics of kappa (F,) um/ms on the phantom's grid. With a truth (F,) bool: the
    metrics of `evaluate` and `compare_compartments` and `interface_faces`; without one, the
    truth-free metrics of the predicted interface (`truth_free_metrics`)."""
    if truth is None:
        return truth_free_metrics(phantom, kappa, threshold_um_per_ms)
    pred = extract_interface(kappa, threshold_um_per_ms, phantom.active)
    out = evaluate(phantom.grid.points, phantom.faces.faces, pred, truth)
    out.update(compare_compartments(phantom.faces, pred, truth,
                                    outer_drains=phantom.outer == "robin"))
    out["interface_faces"] = int(pred.sum())
    return out


def truth_free_metrics(phantom, kappa: np.ndarray, threshold_um_per_ms: float) -> dict:
    """JSON-able metrics of the predicted interface alone (no ground truth): interface_faces,
    its edge statistics (bad_edge_pct, open_pct, branch_pct, num_edges) and the tet counts of
    the sealed compartments it encloses (pred_sealed_compartment_tets, largest first), with
    ground_truth = False so that nobody mistakes them for scores against a truth."""
    pred = extract_interface(kappa, threshold_um_per_ms, phantom.active)
    out = dict(ground_truth=False, interface_faces=int(pred.sum()),
               num_pred_faces=int(pred.sum()), empty_prediction=bool(not pred.any()))
    out.update(edge_statistics(phantom.faces.faces[pred]))
    comps = sealed_compartments(phantom.faces, pred, outer_drains=phantom.outer == "robin")
    out["pred_sealed_compartment_tets"] = [int(c.size) for c in comps]
    out["pred_sealed_compartments"] = len(comps)
    return out

