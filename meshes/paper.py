"""The Spinverse paper's ground truths: the 20 shipped `.npz` files and the analytic shapes.

Files (see their README.md): points (3, 189) float32 um, facets (3, 1296), elements (4, 576),
boundary_faces (3, B) int64 vertex ids. All share the n = 4, a = 20/3 um BCC grid, whose
vertex numbering and tet order `meshes.bcc.bcc_grid` reproduces.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.geometry.topology import FaceTable, build_face_table
from spinverse_fem.meshes.bcc import bcc_grid
from spinverse_fem.meshes.grid import Grid, membrane_mask, orient_positively, validate_grid
from spinverse_fem.meshes.shapes import (
    BentAxon,
    Cylinder,
    Sphere,
    Torus,
    inside_tets,
    is_closed_manifold,
    membrane_faces,
)

PAPER_CUBES = 4
PAPER_CUBE_UM = 20.0 / 3.0
# The paper's bent axons: inside-tet counts of the 16 files (a range for random look-alikes).
PAPER_AXON_INSIDE_TETS = (66, 105)

_ENV = "SPINVERSE_PAPER_MESHES"

_S45 = float(np.sin(np.pi / 4))
# Placement verified against the files (docs/paper_setup.md): all centred at the origin.
_SHAPES = {
    "tilted_cylinder": Cylinder(center_um=(0, 0, 0), axis=(0.0, -_S45, _S45), radius_um=8.0,
                                height_um=22.0),
    "cylinder": Cylinder(center_um=(0, 0, 0), axis="z", radius_um=10.0, height_um=40.0),
    "sphere": Sphere(center_um=(0, 0, 0), radius_um=10.0),
    "torus": Torus(center_um=(0, 0, 0), axis="z", major_radius_um=10.0, minor_radius_um=6.0),
}
# Substrings of the paper's file names that identify each analytic shape.
_FILE_KEYS = {"cyl_8r_22h_45d": "tilted_cylinder", "cyl_10r_40h": "cylinder",
              "sphere_10r": "sphere", "torus_majr10_minr6": "torus"}


def paper_grid() -> Grid:
    """The paper's grid (n = 4 cubes of 20/3 um, centred at the origin), exact float64."""
    return bcc_grid(PAPER_CUBES, PAPER_CUBE_UM)


def paper_meshes_dir() -> Path:
    """Directory of the paper's .npz files: $SPINVERSE_PAPER_MESHES, else
    <repo>/../shared/data/paper_meshes. Raises InputError if it does not exist."""
    env = os.environ.get(_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/paper_meshes"
    if not path.is_dir():
        how = f"from ${_ENV}" if env else f"default; set ${_ENV} to override"
        raise InputError(str(path), None, f"paper meshes directory not found ({how})")
    return path


def list_paper_meshes() -> list[Path]:
    """The paper's ground-truth files (*.npz), sorted by name (20 for the shipped set)."""
    d = paper_meshes_dir()
    files = sorted(d.glob("*.npz"))
    if not files:
        raise InputError(str(d), None, "no .npz ground-truth files in the paper meshes directory")
    return files


def _array(data, path: str, key: str, rows: int, kind: str) -> np.ndarray:
    if key not in data:
        raise InputError(path, key, f"missing array (the file has {sorted(data.keys())})")
    a = np.asarray(data[key])
    if a.ndim != 2 or a.shape[0] != rows:
        raise InputError(path, key, f"expected shape ({rows}, N), got {a.shape}")
    if kind == "int" and not np.issubdtype(a.dtype, np.integer):
        raise InputError(path, key, f"expected integer vertex ids, got dtype {a.dtype}")
    if kind == "float" and not np.issubdtype(a.dtype, np.floating):
        raise InputError(path, key, f"expected floating coordinates, got dtype {a.dtype}")
    return a


def load_paper_ground_truth(path) -> tuple[Grid, np.ndarray]:
    """One paper file -> (grid, membrane mask).

    grid: the file's vertices (float32 values as float64, um) and tets (same order as the
    file, each made positively oriented by swapping its first two vertices where needed),
    membrane_triangles = the file's boundary_faces (B, 3).
    mask: (F,) bool over the canonical faces of build_face_table(grid.tets, V).
    Raises InputError naming the file and array for malformed files or for membrane
    triangles that are not grid faces.
    """
    path = str(path)
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, None, f"cannot read as .npz: {exc}") from exc
    with data:
        points = _array(data, path, "points", 3, "float").T.astype(np.float64)
        elements = _array(data, path, "elements", 4, "int").T.astype(np.int64)
        facets = _array(data, path, "facets", 3, "int").T.astype(np.int64)
        boundary = _array(data, path, "boundary_faces", 3, "int").T.astype(np.int64)
    table = _checked_face_table(points, elements, path)
    tets = orient_positively(points, elements)
    ids = table.lookup(facets)
    if np.any(ids < 0) or np.unique(ids).size != table.num_faces or ids.size != table.num_faces:
        raise InputError(path, "facets", f"the {facets.shape[0]} listed triangles are not "
                         f"exactly the {table.num_faces} faces of the elements")
    mask = membrane_mask(table, boundary, path, field="boundary_faces")
    grid = Grid(points=points, tets=tets, membrane_triangles=boundary, source=path)
    return grid, mask


def _checked_face_table(points: np.ndarray, elements: np.ndarray, path: str) -> FaceTable:
    """Face table of the file's elements after validating them up to orientation."""
    # The files' tets are sorted vertex sets with arbitrary orientation: validate the
    # positively oriented copy so only genuine defects are reported.
    nv = points.shape[0]
    if np.any((elements < 0) | (elements >= nv)):
        raise InputError(path, "elements", f"vertex ids outside [0, {nv})")
    if not np.all(np.isfinite(points)):
        raise InputError(path, "points", "non-finite coordinates")
    validate_grid(points, orient_positively(points, elements), path)
    return build_face_table(elements, nv)


def paper_shape(name: str):
    """The analytic shape of a paper ground truth, by key or by file name / path.

    Keys: "tilted_cylinder" (r 8, h 22, axis z rotated 45 degrees about x), "cylinder"
    (r 10, h 40, axis z), "sphere" (r 10), "torus" (axis z, R 10, r 6); all centred at the
    origin, um. A file name containing the paper's tag (e.g. "018_sphere_10r_in_grid_20x20")
    also works. Bent axons raise InputError: their curves are not published.
    """
    key = str(name)
    if key in _SHAPES:
        return _SHAPES[key]
    stem = Path(key).name
    for tag, shape_key in _FILE_KEYS.items():
        if tag in stem:
            return _SHAPES[shape_key]
    if "bentaxon" in stem:
        raise InputError(key, "shape", "the paper's bent-axon curves are not published; "
                         "read the ground truth with load_paper_ground_truth")
    raise InputError(key, "shape", f"unknown paper shape; expected one of {sorted(_SHAPES)} "
                     "or a paper file name")


def random_paper_axon(seed: int,
                      max_attempts: int = 200) -> tuple[BentAxon, np.ndarray, np.ndarray]:
    """A random bent axon like the paper's 16, on the paper grid (paper_grid()).

    Draws BentAxon.random until, with inside_tets(..., rule="centroid"), the membrane is a
    closed 2-manifold and the inside-tet count lies in PAPER_AXON_INSIDE_TETS (the paper's
    set satisfies both). Returns (axon, inside (T,) bool, membrane (F,) bool over canonical
    faces). Deterministic in seed.
    """
    g = paper_grid()
    table = build_face_table(g.tets, g.num_vertices)
    half = PAPER_CUBES * PAPER_CUBE_UM / 2
    rng = np.random.default_rng(seed)
    lo, hi = PAPER_AXON_INSIDE_TETS
    for _ in range(max_attempts):
        axon = BentAxon.random(int(rng.integers(2**63 - 1)), box_half_um=half)
        inside = inside_tets(g, axon, rule="centroid")
        mem = membrane_faces(table, inside)
        if lo <= int(inside.sum()) <= hi and is_closed_manifold(table, mem):
            return axon, inside, mem
    raise RuntimeError(f"random_paper_axon: no closed paper-like axon in {max_attempts} draws "
                       f"(seed {seed})")
