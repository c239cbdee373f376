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
    outer: "neumann" | "robin"; active (F,) bool: faces whose kappa enters the model;
    diffusivity: um^2/ms, one value or (T,) per tetrahedron; relaxation: (T,) 1/T2 in 1/ms per
    tetrahedron, one value, or None (no relaxation); compartment: (T,) index into
    cfg.compartments, or None without [[compartment]] tables; diffusion_tensor: (T, 3, 3)
    um^2/ms when a compartment has a tensor (isotropic ones D I; diffusivity then holds the
    mean diffusivities), else None; spin_density: (T,) relative initial magnetisation per
    tetrahedron when the compartments' spin densities differ, else None (uniform: normalised
    signals do not depend on a common factor)."""

    grid: Grid
    faces: FaceTable
    membrane: np.ndarray
    kappa: np.ndarray
    outer: str
    diffusivity: float | np.ndarray = 2.0
    relaxation: float | np.ndarray | None = None
    compartment: np.ndarray | None = None
    diffusion_tensor: np.ndarray | None = None
    spin_density: np.ndarray | None = None

    @property
    def max_diffusivity(self) -> float:
        """The largest diffusivity in any direction (um^2/ms): the eigenvalue cut-off's D."""
        if self.diffusion_tensor is not None:
            return float(np.max(np.linalg.eigvalsh(self.diffusion_tensor)))
        return float(np.max(self.diffusivity))

    @property
    def active(self) -> np.ndarray:
        return self.faces.interior | (self.faces.outer if self.outer == "robin" else False)


def build_grid(cfg: GridConfig, source: str, refinement: int = 1,
               membrane_tags: tuple[int, ...] = ()) -> Grid:
    """The grid of [grid]; `refinement` multiplies the resolution (bcc cubes, box cells); a
    file grid's membrane triangles are those of `membrane_tags` ([[membrane]]) if given, else
    of grid.membrane_tag."""
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

        if membrane_tags:
            return read_grid(cfg.path, membrane_tag=tuple(membrane_tags), unit_um=cfg.unit_um,
                             tag_fields=[f"membrane[{i}].tag" for i in range(len(membrane_tags))])
        return read_grid(cfg.path, membrane_tag=cfg.membrane_tag, unit_um=cfg.unit_um)
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


def membrane_permeability(cfg: Config, grid: Grid, faces: FaceTable) -> np.ndarray:
    """(F,) kappa in um/ms of the [[membrane]] tables: each membrane's kappa_um_per_ms on the
    faces of its tag, open_um_per_ms elsewhere. InputError for a face in two membranes."""
    kappa = np.full(faces.num_faces, float(cfg.permeability.open_um_per_ms))
    owner = np.full(faces.num_faces, -1, dtype=np.int64)
    src = str(cfg.grid.path)
    for i, m in enumerate(cfg.membranes):
        tris = grid.membrane_triangles[grid.membrane_tags == m.tag]
        ids = np.flatnonzero(membrane_mask(faces, tris, src, f"membrane[{i}].tag"))
        clash = owner[ids] >= 0
        if np.any(clash):
            other = cfg.membranes[int(owner[ids][clash][0])]
            raise InputError(src, f"membrane[{i}].tag",
                             f"{int(clash.sum())} triangles tagged {m.tag} ({m.name!r}) are "
                             f"also tagged {other.tag} ({other.name!r}): a face belongs to "
                             "one membrane")
        owner[ids] = i
        kappa[ids] = m.kappa_um_per_ms
    return kappa


def compartment_fields(cfg: Config, grid: Grid):
    """(compartment (T,) int, diffusivity (T,) um^2/ms, relaxation (T,) 1/ms or None) of the
    [[compartment]] tables on `grid`. InputError naming the table and field for a tag that no
    tetrahedron carries, and for tetrahedra in no compartment."""
    comps = cfg.compartments
    index = np.full(grid.num_tets, -1, dtype=np.int64)
    if cfg.grid.kind == "file":
        src = str(cfg.grid.path)
        if grid.tet_tags is None:
            raise InputError(src, "cells", "the [[compartment]] tables select tetrahedra by "
                             "volume tag, but the file's tetrahedra carry no tags (gmsh: "
                             "physical volumes)")
        present = np.unique(grid.tet_tags).tolist()
        for i, c in enumerate(comps):
            sel = grid.tet_tags == c.tag
            if not sel.any():
                raise InputError(cfg.source, f"compartment[{i}].tag",
                                 f"no tetrahedron of {src} is tagged {c.tag} (volume tags "
                                 f"present: {present})")
            index[sel] = i
        if np.any(index < 0):
            missing = np.unique(grid.tet_tags[index < 0]).tolist()
            raise InputError(cfg.source, "compartment",
                             f"{int(np.sum(index < 0))} tetrahedra of {src} are in no "
                             f"compartment (volume tags {missing}); add a [[compartment]] "
                             "for each")
    else:
        inside = shapes.inside_tets(grid, geometry_shape(cfg.geometry),
                                    rule=cfg.geometry.inside_rule)
        for i, c in enumerate(comps):
            index[inside if c.region == "inside" else ~inside] = i
        if np.any(index < 0):
            other = "outside" if comps[0].region == "inside" else "inside"
            raise InputError(cfg.source, "compartment",
                             f"{int(np.sum(index < 0))} tetrahedra lie {other} the "
                             f"{cfg.geometry.kind} and in no compartment; add a "
                             f"[[compartment]] with region = \"{other}\"")
    D = np.array([c.diffusivity_um2_per_ms for c in comps])[index]
    rates = [0.0 if c.t2_ms is None else 1.0 / c.t2_ms for c in comps]
    relax = np.array(rates)[index] if any(rates) else None
    return index, D, relax


def build_phantom(cfg: Config, refinement: int = 1) -> Phantom:
    grid = build_grid(cfg.grid, cfg.source, refinement,
                      tuple(m.tag for m in cfg.membranes))
    if cfg.grid.kind == "file":
        # the generated grids were sized by the config reader; a file's only once read
        check_grid_size(str(cfg.grid.path), "cells", grid.num_tets, cfg.eigen,
                        note=" in the grid file")
    faces = build_face_table(grid.tets, grid.num_vertices)
    membrane = membrane_faces(cfg, grid, faces)
    kappa = (membrane_permeability(cfg, grid, faces) if cfg.membranes
             else permeability_field(cfg.permeability, faces, membrane))
    phys = cfg.physics
    fields = dict(diffusivity=phys.diffusivity_um2_per_ms,
                  relaxation=None if phys.t2_ms is None else 1.0 / phys.t2_ms)
    if cfg.compartments:
        index, D, relax = compartment_fields(cfg, grid)
        fields = dict(diffusivity=D, relaxation=relax, compartment=index)
        if any(c.diffusion_tensor_um2_per_ms is not None for c in cfg.compartments):
            tensors = np.array([np.asarray(c.diffusion_tensor_um2_per_ms)
                                if c.diffusion_tensor_um2_per_ms is not None
                                else c.diffusivity_um2_per_ms * np.eye(3)
                                for c in cfg.compartments])
            fields["diffusion_tensor"] = tensors[index]
        rho = np.array([c.spin_density for c in cfg.compartments])
        if np.ptp(rho) > 0.0:
            fields["spin_density"] = rho[index]
    return Phantom(grid=grid, faces=faces, membrane=membrane, kappa=kappa,
                   outer=cfg.permeability.outer, **fields)


def tissue_summary(cfg: Config, phantom: Phantom) -> list[str]:
    """One line per [[compartment]] (tetrahedra, volume um^3, D, T2) and per [[membrane]]
    (faces, kappa), for a run's log; empty without those tables."""
    lines = []
    if phantom.compartment is not None:
        vol = phantom.grid.volumes()
        for i, c in enumerate(cfg.compartments):
            sel = phantom.compartment == i
            t2 = "no relaxation" if c.t2_ms is None else f"T2 {c.t2_ms:g} ms"
            rho = f", spin density {c.spin_density:g}" if phantom.spin_density is not None else ""
            d = (f"D {c.diffusivity_um2_per_ms:g} um^2/ms" if c.diffusion_tensor_um2_per_ms
                 is None else "D tensor, eigenvalues " + " ".join(
                     f"{v:.4g}" for v in np.linalg.eigvalsh(c.diffusion_tensor_um2_per_ms))
                 + " um^2/ms")
            lines.append(f"compartment {c.name!r}: {int(sel.sum())} tetrahedra, "
                         f"{vol[sel].sum():.4g} um^3, {d}, {t2}{rho}")
    for m in cfg.membranes:
        n = int(np.sum(phantom.grid.membrane_tags == m.tag))
        lines.append(f"membrane {m.name!r} (tag {m.tag}): {n} faces, kappa "
                     f"{m.kappa_um_per_ms:g} um/ms")
    return lines
