"""Read a tetrahedral grid and its tagged membrane triangles from gmsh (.msh) or XDMF files.

gmsh files are read with meshio. XDMF files written by dolfinx's XDMFFile (a mesh grid plus
facet meshtags grids in one .xdmf/.h5 pair, which meshio cannot read) are parsed here from the
XML and HDF5; other XDMF layouts (meshio's single mixed grid) go through meshio.

Tets are taken as stored: inverted tets are reported by validate_grid, never reoriented.
"""

from __future__ import annotations

import contextlib
import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinverse_fem.config.schema import MAX_TETRAHEDRA
from spinverse_fem.errors import InputError
from spinverse_fem.meshes.grid import Grid

# meshio cell types we recognise; higher-order variants are rejected explicitly.
_HIGHER_ORDER_TETS = ("tetra10", "tetra20", "tetra35", "tetra56")
# Cells that carry no volume or surface a tetrahedral grid could hold: gmsh writes its physical
# points and curves as these. Every other type besides "tetra" and "triangle" (hexahedra,
# wedges, pyramids, quads, higher-order cells) is refused, never dropped.
_IGNORED_CELLS = ("vertex", "line", "line3")


def read_grid(path, membrane_tag: int | Sequence[int] | None = None,
              unit_um: float = 1.0, tag_fields: Sequence[str] | None = None) -> Grid:
    """Grid from a .msh (gmsh) or .xdmf file; coordinates are multiplied by `unit_um` (the
    length of one file unit in um: 1 for a mesh drawn in um, 1000 for one in mm).

    Tetrahedra: all linear tetra cells, with their volume tags (gmsh physical tags, or an XDMF
    cell attribute of the tetrahedral grid) in tet_tags when the file has them (compartments).
    membrane_triangles: the triangle cells whose tag (gmsh physical tag, or the XDMF facet
    meshtags value) is membrane_tag, or one of them for a sequence of tags (then
    membrane_tags holds each triangle's tag); all triangles when membrane_tag is None (None if
    the file has no triangles). Raises InputError naming the file for a missing file, an
    unknown extension, no tetrahedra, an absent membrane tag, or any grid defect found by
    validate_grid; `tag_fields` names each of a sequence of tags in those errors (the config
    field it came from; default "membrane_tag").
    """
    p = Path(path)
    source = str(p)
    if not p.is_file():
        raise InputError(source, None, "mesh file not found")
    ext = p.suffix.lower()
    if ext == ".msh":
        mesh = _read_meshio(p, "gmsh")
    elif ext == ".xdmf":
        try:
            mesh = _read_xdmf(p)
        except _Unsupported:
            mesh = _read_meshio(p, "xdmf")
    else:
        raise InputError(source, None, f"unknown mesh extension {p.suffix!r}; expected .msh "
                         "(gmsh) or .xdmf")

    if mesh.tets.shape[0] == 0:
        raise InputError(source, "cells", "the file has no tetrahedra" + mesh.note)
    if mesh.tets.shape[0] > MAX_TETRAHEDRA:
        raise InputError(source, "cells", f"{mesh.tets.shape[0]} tetrahedra; at most "
                         f"{MAX_TETRAHEDRA} fit in memory (every rank holds the whole grid)")
    triangles, tags = mesh.triangles, None
    if membrane_tag is not None:
        wanted = ([int(membrane_tag)] if np.ndim(membrane_tag) == 0
                  else [int(t) for t in membrane_tag])
        if mesh.triangle_tags is None:
            raise InputError(source, "membrane_tag", f"membrane tag(s) {wanted} given but "
                             "the triangles carry no tags")
        present = np.unique(mesh.triangle_tags).tolist()
        for k, tag in enumerate(wanted):
            if not np.any(mesh.triangle_tags == tag):
                field = tag_fields[k] if tag_fields else "membrane_tag"
                raise InputError(source, field, f"no triangles tagged {tag} "
                                 f"(tags present: {present})")
        sel = np.isin(mesh.triangle_tags, wanted)
        triangles = triangles[sel]
        if np.ndim(membrane_tag) != 0:
            tags = mesh.triangle_tags[sel]
    elif triangles.shape[0] == 0:
        triangles = None
    return Grid(points=mesh.points * float(unit_um), tets=mesh.tets,
                membrane_triangles=triangles, source=source, tet_tags=mesh.tet_tags,
                membrane_tags=tags)


@dataclass(frozen=True)
class _RawMesh:
    points: np.ndarray          # (V, 3) float
    tets: np.ndarray            # (T, 4) int
    triangles: np.ndarray       # (M, 3) int
    triangle_tags: np.ndarray | None  # (M,) int, or None if untagged
    note: str = ""              # appended to "no tetrahedra" errors
    tet_tags: np.ndarray | None = None  # (T,) int volume tags (gmsh physical), or None


class _Unsupported(Exception):
    """An XDMF construct the direct parser does not handle; meshio gets a try."""


def _read_meshio(path: Path, fmt: str) -> _RawMesh:
    import meshio

    source = str(path)
    # The format's own reader, not meshio.read: on a ReadError meshio.read prints it and calls
    # sys.exit(1). SystemExit is still caught in case a reader does the same; what a reader
    # prints goes into the message instead of onto the terminal.
    reader = {"gmsh": meshio.gmsh.read, "xdmf": meshio.xdmf.read}[fmt]
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            m = reader(source)
    except (Exception, SystemExit) as exc:  # meshio raises many types (ReadError, KeyError, ...)
        detail = str(exc) if not isinstance(exc, SystemExit) else ""
        detail = "; ".join(x for x in (detail.strip(), " ".join(said.getvalue().split())) if x)
        raise InputError(source, None, f"cannot read as {fmt}"
                         + (f": {detail[:300]}" if detail else " (not a valid file)")) from None
    points = np.asarray(m.points, dtype=np.float64)
    if points.ndim == 2 and points.shape[1] == 2:
        raise InputError(source, "points", "2D coordinates: a 3D tetrahedral mesh is required")

    # The membrane tag lives in gmsh's physical tags; for XDMF use the only cell-data array.
    if fmt == "gmsh":
        tag_key = "gmsh:physical" if "gmsh:physical" in m.cell_data else None
    else:
        keys = list(m.cell_data)
        tag_key = keys[0] if len(keys) == 1 else None
    tets, tris, tags, tet_tags = [], [], [], []
    kinds = []
    other: dict[str, int] = {}
    for i, block in enumerate(m.cells):
        kinds.append(block.type)
        if block.type not in ("tetra", "triangle", *_IGNORED_CELLS):
            other[block.type] = other.get(block.type, 0) + len(block.data)
        if block.type == "tetra":
            tets.append(np.asarray(block.data))
            if tag_key is not None:
                tet_tags.append(np.asarray(m.cell_data[tag_key][i]).reshape(-1))
        elif block.type == "triangle":
            tris.append(np.asarray(block.data))
            if tag_key is not None:
                tags.append(np.asarray(m.cell_data[tag_key][i]).reshape(-1))
    if tets and other:
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(other.items()))
        raise InputError(source, "cells", f"{found} cell(s) among the tetrahedra: only linear "
                         "tetrahedra (and triangles for membranes) are supported, and "
                         "dropping the other cells would leave holes in the domain; remesh "
                         "with tetrahedra only")
    note = ""
    if not tets:
        higher = sorted(set(kinds) & set(_HIGHER_ORDER_TETS))
        note = (f" (found {higher}: only linear tetrahedra are supported)" if higher
                else f" (cell types: {sorted(set(kinds))})")
    tets_a = np.concatenate(tets) if tets else np.zeros((0, 4), dtype=np.int64)
    tris_a = np.concatenate(tris) if tris else np.zeros((0, 3), dtype=np.int64)
    tags_a = np.concatenate(tags).astype(np.int64) if tris and tag_key is not None else None
    ttags = (np.concatenate(tet_tags).astype(np.int64) if tets and tag_key is not None
             else None)
    return _RawMesh(points, tets_a.astype(np.int64), tris_a.astype(np.int64), tags_a, note,
                    ttags)


def _local(tag: str) -> str:
    """Element name without its XML namespace."""
    return tag.rsplit("}", 1)[-1]


def _child(elem, name: str):
    for c in elem:
        if _local(c.tag) == name:
            return c
    return None


def _read_dataitem(item, xdmf: Path) -> np.ndarray:
    """Array of an XDMF DataItem (HDF or XML format), shaped by its Dimensions."""
    import h5py

    source = str(xdmf)
    dims = tuple(int(d) for d in item.get("Dimensions", "").split())
    fmt = item.get("Format", "XML")
    text = (item.text or "").strip()
    if fmt == "HDF":
        if ":" not in text:
            raise InputError(source, "DataItem", f"HDF reference {text!r} is not 'file:/path'")
        fname, dset = text.split(":", 1)
        h5 = (xdmf.parent / fname) if not Path(fname).is_absolute() else Path(fname)
        if not h5.is_file():
            raise InputError(source, "DataItem", f"HDF5 file {str(h5)!r} not found")
        try:
            with h5py.File(h5, "r") as f:
                data = np.asarray(f[dset][...])
        except (OSError, KeyError) as exc:
            raise InputError(source, "DataItem", f"cannot read {text!r}: {exc}") from exc
    elif fmt == "XML":
        try:
            data = np.array(text.split(), dtype=np.float64)
        except ValueError as exc:
            raise InputError(source, "DataItem", f"non-numeric XML data: {exc}") from exc
        if item.get("NumberType", "Float") in ("Int", "UInt"):
            data = data.astype(np.int64)
    else:
        raise _Unsupported(f"DataItem format {fmt}")
    if dims and int(np.prod(dims)) == data.size:
        data = data.reshape(dims)
    return data


def _read_xdmf(path: Path) -> _RawMesh:
    """dolfinx layout: one Tetrahedron grid (with Geometry) + Triangle grids with a cell
    Attribute (meshtags) that index the same geometry."""
    source = str(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(source, None, f"invalid XDMF (XML) file: {exc}") from exc
    # Grids without their own Topology (time steps of functions) carry no mesh data.
    grids = [g for g in root.iter()
             if _local(g.tag) == "Grid" and _child(g, "Topology") is not None]
    tet_grids, tri_grids = [], []
    for g in grids:
        ttype = _child(g, "Topology").get("TopologyType", _child(g, "Topology").get("Type", ""))
        t = ttype.lower()
        if t == "tetrahedron":
            tet_grids.append(g)
        elif t == "triangle":
            tri_grids.append(g)
        elif t == "mixed":
            raise _Unsupported("mixed topology")
        elif t.startswith("tetrahedron_"):
            raise InputError(source, "Topology", f"{ttype}: only linear tetrahedra are "
                             "supported")
    if not tet_grids:
        raise _Unsupported("no tetrahedron grid")
    if len(tet_grids) > 1:
        names = [g.get("Name") for g in tet_grids]
        raise InputError(source, "Grid", f"several tetrahedral grids {names}; expected one")
    mesh_grid = tet_grids[0]
    geom = _child(mesh_grid, "Geometry")
    if geom is None:
        raise InputError(source, "Geometry", f"grid {mesh_grid.get('Name')!r} has no Geometry")
    gtype = geom.get("GeometryType", geom.get("Type", "XYZ"))
    if gtype != "XYZ":
        raise InputError(source, "Geometry", f"GeometryType {gtype}: 3D XYZ coordinates "
                         "are required")
    points = _read_dataitem(_child(geom, "DataItem"), path).astype(np.float64)
    tets = _read_dataitem(_child(_child(mesh_grid, "Topology"), "DataItem"), path)
    tet_attr = next((a for a in mesh_grid if _local(a.tag) == "Attribute"
                     and a.get("Center", "Cell") == "Cell"), None)
    tet_tags = None
    if tet_attr is not None:
        tet_tags = np.asarray(_read_dataitem(_child(tet_attr, "DataItem"), path)).reshape(-1)
        n_tets = np.asarray(tets).size // 4
        if tet_tags.shape[0] != n_tets or not np.all(tet_tags == np.round(tet_tags)):
            raise InputError(source, "Attribute", f"{tet_tags.shape[0]} tetrahedron tags for "
                             f"{n_tets} tetrahedra (integers expected)")
        tet_tags = tet_tags.astype(np.int64)

    tris, tags = [], []
    tagged = True
    for g in tri_grids:
        own = _child(g, "Geometry")
        if own is not None and _child(own, "DataItem") is not None:
            gp = _read_dataitem(_child(own, "DataItem"), path)
            if gp.shape != points.shape or not np.array_equal(gp, points):
                raise InputError(source, "Geometry", f"triangle grid {g.get('Name')!r} uses "
                                 "a different geometry from the tetrahedral grid")
        tri = _read_dataitem(_child(_child(g, "Topology"), "DataItem"), path)
        tris.append(np.asarray(tri, dtype=np.int64).reshape(-1, 3))
        attr = next((a for a in g if _local(a.tag) == "Attribute"
                     and a.get("Center", "Cell") == "Cell"), None)
        if attr is None:
            tagged = False
        else:
            tags.append(np.asarray(_read_dataitem(_child(attr, "DataItem"), path)).reshape(-1))
    tris_a = np.concatenate(tris) if tris else np.zeros((0, 3), dtype=np.int64)
    tags_a = None
    if tris and tagged:
        tags_a = np.concatenate(tags)
        if tags_a.shape[0] != tris_a.shape[0]:
            raise InputError(source, "Attribute", f"{tags_a.shape[0]} tag values for "
                             f"{tris_a.shape[0]} triangles")
        if not np.all(tags_a == np.round(tags_a)):
            raise InputError(source, "Attribute", "triangle tags must be integers")
        tags_a = tags_a.astype(np.int64)
    return _RawMesh(points, np.asarray(tets, dtype=np.int64).reshape(-1, 4), tris_a, tags_a,
                    tet_tags=tet_tags)
