"""Scoring a permeability field against a ground truth: the interface (faces with kappa below
the threshold), its metrics (CD-L2, BadEdge%, face IoU, ...) and its sealed compartments."""

from __future__ import annotations

import numpy as np

from spinverse_fem.evaluation.compartments import compare_compartments
from spinverse_fem.evaluation.interface import extract_interface
from spinverse_fem.evaluation.metrics import evaluate


def score(phantom, kappa: np.ndarray, threshold_um_per_ms: float,
          truth: np.ndarray | None) -> dict:
    """JSON-able metrics of kappa (F,) um/ms on the phantom's grid: `interface_faces` always;
    with a truth (F,) bool also the metrics of `evaluate` and `compare_compartments`."""
    pred = extract_interface(kappa, threshold_um_per_ms, phantom.active)
    out = {}
    if truth is not None:
        out.update(evaluate(phantom.grid.points, phantom.faces.faces, pred, truth))
        out.update(compare_compartments(phantom.faces, pred, truth,
                                        outer_drains=phantom.outer == "robin"))
    out["interface_faces"] = int(pred.sum())
    return out
