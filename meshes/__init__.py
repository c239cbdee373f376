"""Grid and ground-truth geometry generators, readers, and small shipped meshes."""

from spinverse_fem.meshes.bcc import bcc_grid
from spinverse_fem.meshes.box import box_grid
from spinverse_fem.meshes.grid import (
    Grid,
    membrane_mask,
    signed_volumes,
    triangle_areas,
    validate_grid,
)
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
    inside_tets,
    is_closed_manifold,
    membrane_faces,
)

__all__ = [
    "BentAxon", "Cylinder", "Grid", "Plane", "Sphere", "Torus", "TwoAxons", "bcc_grid",
    "box_grid", "inside_tets", "is_closed_manifold", "list_paper_meshes",
    "load_paper_ground_truth", "membrane_faces", "membrane_mask", "paper_grid",
    "paper_meshes_dir", "paper_shape", "random_paper_axon", "read_grid", "signed_volumes",
    "triangle_areas", "validate_grid",
]
