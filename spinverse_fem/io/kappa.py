"""Per-face permeability files (HDF5): kappa (um/ms) on the canonical faces of one grid, with
the grid itself; layout: docs/file_formats.md.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from spinverse_fem.config.schema import MAX_KAPPA_UM_PER_MS
from spinverse_fem.errors import InputError
from spinverse_fem.io.atomic import atomic_h5
from spinverse_fem.io.signals import open_h5

VERTEX_TOL_UM = 1e-6
DATASETS = ("kappa_um_per_ms", "faces", "vertices")


def write_kappa(path, kappa_um_per_ms, faces, vertices, attrs: dict | None = None) -> None:
    """Write kappa (F,) um/ms with its grid: faces (F, 3) canonical, vertices (V, 3) um.

    attrs: extra HDF5 attributes (str, numbers). Written atomically by the calling rank (call
    from rank 0 only). Raises ValueError on inconsistent shapes (a programming error, not user
    input).
    """
    kappa = np.asarray(kappa_um_per_ms, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    vertices = np.asarray(vertices, dtype=np.float64)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
    if kappa.shape != (faces.shape[0],):
        raise ValueError(f"kappa has shape {kappa.shape}, expected ({faces.shape[0]},)")
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
    with atomic_h5(Path(path)) as f:
        f["kappa_um_per_ms"] = kappa
        f["faces"] = faces
        f["vertices"] = vertices
        f.attrs["units"] = "kappa: um/ms; vertices: um; faces: sorted vertex ids, canonical order"
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def read_kappa(path, faces, vertices) -> np.ndarray:
    """kappa (F,) um/ms from `path`, checked against the grid's faces (F, 3) and vertices (V, 3).

    InputError(file, field, message) when the file is missing or not HDF5, a dataset is missing
    or has the wrong shape, kappa is non-finite or negative, the vertices differ by more than
    1e-6 um, or the faces differ (the message says how many).
    """
    src = str(path)
    faces = np.asarray(faces, dtype=np.int64)
    vertices = np.asarray(vertices, dtype=np.float64)
    n_faces = faces.shape[0]
    with open_h5(path, "kappa file") as f:
        for key in DATASETS:
            if key not in f:
                raise InputError(src, key, "missing dataset")
            if not isinstance(f[key], h5py.Dataset):
                raise InputError(src, key, "is not a dataset")
        arrays = {}
        for key in DATASETS:
            try:
                arrays[key] = np.asarray(f[key][()])
            except (OSError, ValueError, TypeError) as e:  # a damaged file
                raise InputError(src, key, f"cannot be read ({e})") from None
        kappa, ffaces, fverts = (arrays[k] for k in DATASETS)

    if fverts.shape != vertices.shape:
        raise InputError(src, "vertices", f"has shape {fverts.shape}, but the grid has "
                         f"{vertices.shape[0]} vertices (expected {vertices.shape})")
    if not np.issubdtype(fverts.dtype, np.number):
        raise InputError(src, "vertices", f"must be numeric, got dtype {fverts.dtype}")
    dev = np.abs(fverts.astype(np.float64) - vertices)
    if not np.all(np.isfinite(dev)):
        raise InputError(src, "vertices", "contains non-finite values")
    if dev.size and dev.max() > VERTEX_TOL_UM:
        n_bad = int(np.sum(np.max(dev, axis=1) > VERTEX_TOL_UM))
        raise InputError(src, "vertices", f"{n_bad} vertices differ from the grid by more than "
                         f"{VERTEX_TOL_UM:g} um (largest {dev.max():.3g} um): written for "
                         "another grid")

    if ffaces.ndim != 2 or ffaces.shape[1] != 3:
        raise InputError(src, "faces", f"has shape {ffaces.shape}, expected (F, 3)")
    if not np.issubdtype(ffaces.dtype, np.integer):
        raise InputError(src, "faces", f"must hold integer vertex ids, got dtype {ffaces.dtype}")
    ffaces = ffaces.astype(np.int64)
    if ffaces.shape != faces.shape or not np.array_equal(ffaces, faces):
        raise InputError(src, "faces", _face_mismatch(ffaces, faces))

    if kappa.shape != (n_faces,):
        raise InputError(src, "kappa_um_per_ms", f"has shape {kappa.shape}, expected "
                         f"({n_faces},): one value per face")
    if not (np.issubdtype(kappa.dtype, np.floating) or np.issubdtype(kappa.dtype, np.integer)):
        raise InputError(src, "kappa_um_per_ms", f"must be real numbers, got dtype {kappa.dtype}")
    kappa = kappa.astype(np.float64)
    bad = ~np.isfinite(kappa)
    if bad.any():
        raise InputError(src, "kappa_um_per_ms", f"{int(bad.sum())} non-finite values "
                         f"(first at face {int(np.flatnonzero(bad)[0])})")
    neg = kappa < 0
    if neg.any():
        raise InputError(src, "kappa_um_per_ms", f"{int(neg.sum())} negative values (first at "
                         f"face {int(np.flatnonzero(neg)[0])}: {kappa[neg][0]:g} um/ms); "
                         "permeabilities must be >= 0")
    big = kappa > MAX_KAPPA_UM_PER_MS
    if big.any():
        raise InputError(src, "kappa_um_per_ms", f"{int(big.sum())} values above "
                         f"{MAX_KAPPA_UM_PER_MS:g} um/ms (first at face "
                         f"{int(np.flatnonzero(big)[0])}: {kappa[big][0]:g} um/ms): not a "
                         "physical permeability (a face is already transparent far below it)")
    return kappa


def _face_mismatch(file_faces: np.ndarray, grid_faces: np.ndarray) -> str:
    """How the file's face table differs from the grid's (counts of differing faces)."""
    def rows(a):
        return {tuple(r) for r in np.sort(a, axis=1).tolist()}

    fs, gs = rows(file_faces), rows(grid_faces)
    missing, extra = len(gs - fs), len(fs - gs)
    head = f"{file_faces.shape[0]} faces in the file, {grid_faces.shape[0]} in the grid"
    if missing or extra:
        return (f"{head}: {missing} grid faces are absent from the file and {extra} file faces "
                "are not grid faces (written for another grid)")
    if file_faces.shape != grid_faces.shape:
        return f"{head}: {file_faces.shape[0] - len(fs)} duplicated face rows"
    n_rows = int(np.sum(np.any(file_faces != grid_faces, axis=1)))
    return (f"{head}: the same faces, but {n_rows} rows are not in the canonical order "
            "(sorted vertex ids, rows in lexicographic order)")
