"""Conforming tetrahedral meshes of concentric multilayer spheres and cylinders, alone or inside a
box, with every compartment and every interface tagged (gmsh's Python API: `pip install
gmsh`, the optional `mesh` extra; the meshes the tests use are shipped under meshes/data/, so
nothing else needs gmsh).

Tags (gmsh physical groups; a config selects them with [[compartment]] tag and [[membrane]]
tag, docs/compartments.md):

    volume  i          layer i, i = 1 .. L from the centre outwards ("layer<i>")
    volume  L + 1      the box around the outermost layer, when there is one ("outside")
    surface 100 + i    the interface between layer i and layer i + 1, or between layer L and
                       the box ("interface<i>")
    surface 200        the outer boundary of the domain ("outer")
    surface 200 + i    with --bcc, where layer i is clipped by the domain: its share of the
                       outer boundary ("outer<i>"), so that a config can close the shape there
                       as the paper's ground truths are closed (a [[membrane]] with that tag)

Coordinates are in um, the shapes centred at the origin; a cylinder's axis is z and it spans
the full height (its caps lie on the outer boundary), so a gradient perpendicular to z sees the
disk problem (tests/references/multilayer.py, dim 2).

    python -m spinverse_fem.meshes.conforming sphere --radii 3 5 --size 1.0 --out layers.msh
    python -m spinverse_fem.meshes.conforming cylinder --radii 2 4 --height 4 --box 10 \\
        --size 1.0 --out axon_in_box.msh
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

OUTER_TAG = 200
INTERFACE_TAG_BASE = 100


def build(kind: str, radii, size_um: float, path, *, height_um: float | None = None,
          box_um: float | None = None, bcc: tuple[int, float] | None = None,
          size_far_um: float | None = None, verbose: bool = False) -> dict:
    """Mesh `kind` ("sphere" | "cylinder") with the layer radii `radii` (um, ascending), target
    edge length `size_um` (um), cylinder height `height_um` (um; required for a cylinder),
    and a cube of side `box_um` (um) around the layers (for a cylinder: a square prism of
    that side and the cylinder's height); write gmsh 2.2 ASCII to `path`. Returns the counts
    of tetrahedra per volume tag and of triangles per surface tag.

    bcc = (cubes, cube_um) instead of box_um: the domain of the bcc grid of that many cubes of
    that side centred at the origin (meshes/bcc.py: the box minus the pyramids on its boundary
    squares), so that signals simulated here compare with an inversion on that grid; the layers
    are clipped to it (a cylinder longer than the box ends on the outer boundary).
    size_far_um: edge length away from the interfaces (default size_um), growing linearly
    from size_um over 3 size_far_um."""
    try:
        import gmsh
    except ImportError:
        raise SystemExit("meshes.conforming needs gmsh's Python API: pip install gmsh "
                         "(or pip install -e '.[mesh]')") from None
    radii = [float(r) for r in radii]
    if kind not in ("sphere", "cylinder"):
        raise ValueError(f"kind must be 'sphere' or 'cylinder', got {kind!r}")
    if not radii or any(b <= a for a, b in zip(radii, radii[1:])) or radii[0] <= 0:
        raise ValueError(f"radii must be positive and ascending, got {radii}")
    if kind == "cylinder" and not (height_um and height_um > 0):
        raise ValueError("a cylinder needs height_um > 0")
    if bcc is not None:
        if box_um is not None:
            raise ValueError("give box_um or bcc, not both")
        cubes, cube_um = int(bcc[0]), float(bcc[1])
        if cubes < 2 or not cube_um > 0:
            raise ValueError(f"bcc needs >= 2 cubes of positive side, got {bcc}")
        # the boundary pyramids reach half a cube in from the box
        if not (cubes - 1) * cube_um > 2 * radii[-1]:
            raise ValueError(f"the outer diameter ({2 * radii[-1]}) must stay inside the bcc "
                             f"domain's pyramids ({(cubes - 1) * cube_um} um across)")
        box_um = cubes * cube_um
    elif box_um is not None and not box_um > 2 * radii[-1]:
        raise ValueError(f"box_um ({box_um}) must exceed the outer diameter ({2 * radii[-1]})")
    if size_far_um is not None and not size_far_um >= size_um:
        raise ValueError(f"size_far_um ({size_far_um}) must be >= size_um ({size_um})")

    gmsh.initialize(interruptible=False)
    try:
        gmsh.option.setNumber("General.Terminal", 1 if verbose else 0)
        gmsh.option.setNumber("General.NumThreads", 1)  # reproducible meshes
        gmsh.model.add(f"{kind}_layers")
        occ = gmsh.model.occ
        solids = []
        for r in radii:
            if kind == "sphere":
                solids.append((3, occ.addSphere(0, 0, 0, r)))
            else:
                solids.append((3, occ.addCylinder(0, 0, -height_um / 2, 0, 0, height_um, r)))
        if bcc is not None:
            domain = _bcc_domain(occ, cubes, cube_um)
            clipped = []
            for solid in solids:
                out, _ = occ.intersect([solid], occ.copy([domain]))
                clipped += out
            solids = clipped + [domain]
        elif box_um is not None:
            zlo, dz = ((-box_um / 2, box_um) if kind == "sphere"
                       else (-height_um / 2, height_um))
            solids.append((3, occ.addBox(-box_um / 2, -box_um / 2, zlo, box_um, box_um, dz)))
        occ.fragment(solids[:1], solids[1:])
        occ.synchronize()

        # Every fragment is identified by its extent in x: layer i reaches r_i, the box b/2.
        extents = np.array(radii + ([box_um / 2] if box_um is not None else []))
        volume_of = {}
        for _, v in gmsh.model.getEntities(3):
            xmax = gmsh.model.getBoundingBox(3, v)[3]
            volume_of[v] = int(np.argmin(np.abs(extents - xmax))) + 1
        if sorted(volume_of.values()) != list(range(1, len(extents) + 1)):
            raise RuntimeError(f"gmsh fragments do not match the layers: {volume_of}")
        names = [f"layer{i}" for i in range(1, len(radii) + 1)] + (
            ["outside"] if box_um is not None else [])
        for v, i in volume_of.items():
            gmsh.model.addPhysicalGroup(3, [v], i, names[i - 1])

        interfaces: dict[int, list[int]] = {}
        outer, clipped = [], {}
        for _, s in gmsh.model.getEntities(2):
            up, _ = gmsh.model.getAdjacencies(2, s)
            layers = sorted(volume_of[v] for v in up)
            if len(layers) == 2:
                interfaces.setdefault(layers[0], []).append(s)
            elif bcc is not None and layers[0] <= len(radii):
                clipped.setdefault(layers[0], []).append(s)
            else:
                outer.append(s)
        for i, surfaces in sorted(interfaces.items()):
            gmsh.model.addPhysicalGroup(2, surfaces, INTERFACE_TAG_BASE + i, f"interface{i}")
        gmsh.model.addPhysicalGroup(2, outer, OUTER_TAG, "outer")
        for i, surfaces in sorted(clipped.items()):
            gmsh.model.addPhysicalGroup(2, surfaces, OUTER_TAG + i, f"outer{i}")

        if size_far_um is None or size_far_um == size_um:
            gmsh.option.setNumber("Mesh.MeshSizeMax", float(size_um))
        else:
            _grade(size_um, size_far_um, [s for ss in interfaces.values() for s in ss])
        gmsh.option.setNumber("Mesh.MeshSizeMin", 0.5 * float(size_um))
        gmsh.option.setNumber("Mesh.MeshSizeFromCurvature", 0)
        gmsh.option.setNumber("Mesh.MshFileVersion", 2.2)
        gmsh.option.setNumber("Mesh.Binary", 0)
        gmsh.model.mesh.generate(3)
        gmsh.model.mesh.optimize("Netgen")

        counts = {}
        for dim, tag in gmsh.model.getPhysicalGroups():
            n = 0
            for ent in gmsh.model.getEntitiesForPhysicalGroup(dim, tag):
                _, elems, _ = gmsh.model.mesh.getElements(dim, ent)
                n += sum(len(e) for e in elems)
            counts[f"{'volume' if dim == 3 else 'surface'} {tag}"] = n
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        gmsh.write(str(path))
    finally:
        gmsh.finalize()
    return counts


def _bcc_domain(occ, cubes: int, cube_um: float):
    """The volume of the bcc grid of `cubes`^3 cubes of side `cube_um` centred at the origin:
    its tetrahedra fill the box except the pyramid (boundary square, centre of its cube) of
    every boundary square."""
    half = cubes * cube_um / 2
    box = (3, occ.addBox(-half, -half, -half, 2 * half, 2 * half, 2 * half))
    pyramids = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            for i in range(cubes):
                for j in range(cubes):
                    u0, v0 = -half + i * cube_um, -half + j * cube_um
                    square = [(u0, v0), (u0 + cube_um, v0), (u0 + cube_um, v0 + cube_um),
                              (u0, v0 + cube_um)]
                    apex = (u0 + cube_um / 2, v0 + cube_um / 2, sign * (half - cube_um / 2))
                    pyramids.append((3, _pyramid(occ, [(u, v, sign * half) for u, v in square],
                                                 apex, axis)))
    out, _ = occ.cut([box], pyramids)
    if len(out) != 1:
        raise RuntimeError(f"the bcc domain came out in {len(out)} pieces")
    return out[0]


def _pyramid(occ, base, apex, axis: int) -> int:
    """A pyramid from its square base and apex, given as (u, v, w) with w along `axis`."""
    def point(p):
        w = [p[0], p[1], p[2]]
        xyz = [0.0, 0.0, 0.0]
        xyz[axis], xyz[(axis + 1) % 3], xyz[(axis + 2) % 3] = w[2], w[0], w[1]
        return occ.addPoint(*xyz)

    b = [point(p) for p in base]
    a = point(apex)
    ring = [occ.addLine(b[k], b[(k + 1) % 4]) for k in range(4)]
    spokes = [occ.addLine(b[k], a) for k in range(4)]
    faces = [occ.addPlaneSurface([occ.addCurveLoop(ring)])]
    for k in range(4):
        faces.append(occ.addPlaneSurface([occ.addCurveLoop(
            [ring[k], spokes[(k + 1) % 4], -spokes[k]])]))
    return occ.addVolume([occ.addSurfaceLoop(faces)])


def _grade(size_um: float, size_far_um: float, surfaces) -> None:
    """Edge length size_um on `surfaces`, growing linearly to size_far_um over 3 size_far_um."""
    import gmsh

    field = gmsh.model.mesh.field
    dist = field.add("Distance")
    field.setNumbers(dist, "SurfacesList", surfaces)
    field.setNumber(dist, "Sampling", 40)
    grade = field.add("Threshold")
    field.setNumber(grade, "InField", dist)
    field.setNumber(grade, "SizeMin", float(size_um))
    field.setNumber(grade, "SizeMax", float(size_far_um))
    field.setNumber(grade, "DistMin", 0.0)
    field.setNumber(grade, "DistMax", 3.0 * float(size_far_um))
    field.setAsBackgroundMesh(grade)
    for key in ("MeshSizeFromPoints", "MeshSizeExtendFromBoundary"):
        gmsh.option.setNumber(f"Mesh.{key}", 0)
    gmsh.option.setNumber("Mesh.MeshSizeMax", float(size_far_um))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m spinverse_fem.meshes.conforming",
        description="Conforming gmsh mesh of concentric multilayer spheres or cylinders "
                    "(tags: volume i = layer i, L + 1 = box; surface 100 + i = interface i, "
                    "200 = outer boundary).")
    p.add_argument("kind", choices=["sphere", "cylinder"])
    p.add_argument("--radii", type=float, nargs="+", required=True, help="um, ascending")
    p.add_argument("--size", type=float, required=True, help="target edge length, um")
    p.add_argument("--height", type=float, default=None, help="cylinder height, um")
    p.add_argument("--box", type=float, default=None, help="side of the box around, um")
    p.add_argument("--bcc", type=float, nargs=2, default=None, metavar=("CUBES", "CUBE_UM"),
                   help="instead of --box: the domain of a bcc grid of CUBES^3 cubes of side "
                        "CUBE_UM (the paper's: 4 6.6666667)")
    p.add_argument("--size-far", type=float, default=None,
                   help="edge length away from the interfaces, um (default --size)")
    p.add_argument("--out", type=Path, required=True, help="output .msh (gmsh 2.2 ASCII)")
    p.add_argument("--verbose", action="store_true", help="gmsh's own log")
    a = p.parse_args(argv)
    try:
        counts = build(a.kind, a.radii, a.size, a.out, height_um=a.height, box_um=a.box,
                       bcc=(int(a.bcc[0]), a.bcc[1]) if a.bcc else None,
                       size_far_um=a.size_far, verbose=a.verbose)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
