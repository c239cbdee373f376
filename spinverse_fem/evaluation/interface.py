"""The reconstructed interface: the low-permeability faces.

The interface is kept as a triangle soup, as in the paper: no repair, no orientation. kappa in
um/ms. Its PLY file is written and read by spinverse_fem.io.ply.
"""

from __future__ import annotations

import numpy as np


def extract_interface(kappa_um_per_ms: np.ndarray, threshold_um_per_ms: float = 1.0,
                      active: np.ndarray | None = None) -> np.ndarray:
    """(F,) bool: faces with kappa < threshold (um/ms), restricted to `active` faces if given."""
    k = np.asarray(kappa_um_per_ms, dtype=np.float64)
    if k.ndim != 1:
        raise ValueError(f"kappa must have shape (F,), got {k.shape}")
    if not np.all(np.isfinite(k)):
        raise ValueError("kappa contains non-finite values")
    if not (np.isfinite(threshold_um_per_ms) and threshold_um_per_ms > 0):
        raise ValueError(f"threshold_um_per_ms must be positive, got {threshold_um_per_ms}")
    mask = k < threshold_um_per_ms
    if active is not None:
        a = np.asarray(active)
        if a.shape != k.shape or a.dtype != bool:
            raise ValueError(f"active must be a bool array of shape {k.shape}, "
                             f"got {a.dtype} {a.shape}")
        mask &= a
    return mask
