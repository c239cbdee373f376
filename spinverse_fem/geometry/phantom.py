"""From a configuration to a concrete problem: the grid, the ground-truth membrane faces and
the permeability field on every face (canonical order). Pure NumPy, identical on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinverse_fem.config import Config, GeometryConfig, GridConfig, PermeabilityConfig
from spinverse_fem.config.reader import check_grid_size
from spinverse_fem.errors import InputError
from spinverse_fem.geometry.topology import FaceTable, build_face_table
from spinverse_fem.meshes import shapes
from spinverse_fem.meshes.bcc import bcc_grid
from spinverse_fem.meshes.box import box_grid
from spinverse_fem.meshes.grid import Grid, membrane_mask


@dataclass(frozen=True)
class Phantom:
    """grid; faces (canonical table); membrane (F,) bool ground truth; kappa (F,) um/ms;
    outer: "neumann" | "robin"; active (F,) bool: faces whose kappa enters the model."""

    grid: Grid
    faces: FaceTable
    membrane: np.ndarray
    kappa: np.ndarray
    outer: str

    @property
    def active(self) -> np.ndarray:
        return self.faces.interior | (self.faces.outer if self.outer == "robin" else False)


def build_grid(cfg: GridConfig, source: str, refinement: int = 1) -> Grid:
    """The grid of [grid]; `refinement` multiplies the resolution (bcc cubes, box cells)."""
    if cfg.kind == "bcc":
        n = cfg.cubes * refinement
        return bcc_grid(n, cfg.cube_um / refinement, cfg.center_um or (0.0, 0.0, 0.0))
    if cfg.kind == "box":
        cells = tuple(int(c) * refinement for c in cfg.cells)
        return box_grid(cfg.lower_um, cfg.upper_um, cells)
    if cfg.kind == "file":
        if refinement != 1:
            raise InputError(source, "target.grid_refinement", "a file grid cannot be refined")
        from spinverse_fem.meshes.readers import read_grid

        return read_grid(cfg.path, membrane_tag=cfg.membrane_tag)
    raise InputError(source, "grid.kind", f"unknown grid kind {cfg.kind!r}")


def geometry_shape(cfg: GeometryConfig):
    """The analytic shape of [geometry] (None for none/paper/file_tags)."""
    c = cfg.center_um or (0.0, 0.0, 0.0)
    if cfg.kind == "plane":
        return shapes.Plane(cfg.axis, cfg.position_um)
    if cfg.kind == "sphere":
        return shapes.Sphere(c, cfg.radius_um)
    if cfg.kind == "cylinder":
        return shapes.Cylinder(c, cfg.axis, cfg.radius_um, cfg.height_um)
    if cfg.kind == "torus":
        return shapes.Torus(c, cfg.axis, cfg.major_radius_um, cfg.minor_radius_um)
    if cfg.kind == "bent_axon":
        if cfg.control_points_um is not None:
            return shapes.BentAxon(control_points_um=np.asarray(cfg.control_points_um),
                                   radius_um=cfg.radius_um)
        return shapes.BentAxon.random(cfg.seed or 0, cfg.radius_um, cfg.segments)
    if cfg.kind == "two_axons":
        return shapes.TwoAxons.random(cfg.seed or 0, cfg.radius_um)
    return None


def membrane_faces(cfg: Config, grid: Grid, faces: FaceTable) -> np.ndarray:
    """(F,) bool ground-truth membrane faces of the configured geometry on `grid`."""
    geo = cfg.geometry
    if geo.kind == "none":
        return np.zeros(faces.num_faces, dtype=bool)
    if geo.kind == "file_tags":
        if grid.membrane_triangles is None:
            raise InputError(cfg.source, "geometry.kind", "the grid file tags no membrane faces")
        return membrane_mask(faces, grid.membrane_triangles, str(cfg.grid.path))
    if geo.kind == "paper":
        from spinverse_fem.meshes.paper import load_paper_ground_truth

        paper_grid, paper_mask = load_paper_ground_truth(geo.path)
        if paper_grid.points.shape != grid.points.shape or not np.allclose(
                paper_grid.points, grid.points, atol=1e-4):
            raise InputError(cfg.source, "geometry.path",
                             "the paper ground truth lives on the paper's bcc grid "
                             "(kind = \"bcc\", cubes = 4, cube_um = 6.6666667)")
        # same vertex numbering (checked above), so vertex triples identify the faces
        paper_faces = build_face_table(paper_grid.tets, paper_grid.num_vertices)
        ids = faces.lookup(paper_faces.faces[paper_mask])
        mask = np.zeros(faces.num_faces, dtype=bool)
        mask[ids] = True
        return mask
    shape = geometry_shape(geo)
    inside = shapes.inside_tets(grid, shape, rule=geo.inside_rule)
    return shapes.membrane_faces(faces, inside)


def permeability_field(cfg: PermeabilityConfig, faces: FaceTable,
                       membrane: np.ndarray) -> np.ndarray:
    """(F,) kappa in um/ms: barrier on membrane faces, open elsewhere (outer faces included)."""
    kappa = np.full(faces.num_faces, float(cfg.open_um_per_ms))
    kappa[membrane] = float(cfg.barrier_um_per_ms)
    return kappa


def build_phantom(cfg: Config, refinement: int = 1) -> Phantom:
    grid = build_grid(cfg.grid, cfg.source, refinement)
    if cfg.grid.kind == "file":
        # the generated grids were sized by the config reader; a file's only once read
        check_grid_size(str(cfg.grid.path), "cells", grid.num_tets, cfg.eigen,
                        note=" in the grid file")
    faces = build_face_table(grid.tets, grid.num_vertices)
    membrane = membrane_faces(cfg, grid, faces)
    kappa = permeability_field(cfg.permeability, faces, membrane)
    return Phantom(grid=grid, faces=faces, membrane=membrane, kappa=kappa,
                   outer=cfg.permeability.outer)
