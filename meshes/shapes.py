"""Ground-truth shapes (sizes in um) and the membranes they cut out of a tetrahedral grid.

Every shape is a frozen dataclass with
    level(points (N, 3) um) -> (N,) float, um: negative inside, zero on the surface, positive
        outside (the distance to the surface, or a function with the same sign);
    inside(points (N, 3) um) -> (N,) bool = level <= 0.

Tolerance policy: shapes are closed sets evaluated in float64 with no tolerance, so a vertex
exactly on the surface counts as inside. On the paper's grid no vertex lies within 1e-3 um of
any paper surface, so this choice and the files' float32 rounding do not change the
classification (checked in tests/test_meshes.py).

Membrane of a shape on a grid (the paper's definition): a tet is inside when all 4 vertices
are inside (or, for the paper's bent axons, its centroid: see inside_tets); membrane faces
are the faces used by exactly one inside tet. Where the shape leaves the grid this picks
outer faces, so the membrane is the boundary of the inside region: closed (every edge in an
even number of membrane faces), though not necessarily a 2-manifold (is_closed_manifold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinverse_fem.geometry.topology import FaceTable, build_edge_table
from spinverse_fem.meshes.grid import Grid

_AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}

# Points per chunk in point-to-curve distances, bounding memory at chunk x segments x 3.
_CHUNK = 4096


def _vec3(value, name: str) -> tuple[float, float, float]:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    return tuple(float(x) for x in v)


def _unit(value, name: str) -> tuple[float, float, float]:
    """Unit vector from "x" / "y" / "z" or any nonzero 3-vector (normalised)."""
    if isinstance(value, str):
        if value.lower() not in _AXES:
            raise ValueError(f"{name} must be 'x', 'y', 'z' or a 3-vector, got {value!r}")
        return _AXES[value.lower()]
    v = np.asarray(_vec3(value, name))
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError(f"{name} must be a nonzero vector")
    return tuple(float(x) for x in v / norm)


def _positive(value, name: str) -> float:
    v = float(value)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive length in um, got {value!r}")
    return v


def _points(points) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    return p


def _axial_radial(points, center, axis) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate along the axis line through center and distance from it, um, each (N,)."""
    d = _points(points) - np.asarray(center)
    a = np.asarray(axis)
    h = d @ a
    rho = np.linalg.norm(d - h[:, None] * a, axis=1)
    return h, rho


class _Shape:
    def level(self, points) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def inside(self, points) -> np.ndarray:
        """(N,) bool: points (N, 3) um inside the closed shape."""
        return self.level(points) <= 0.0


@dataclass(frozen=True)
class Plane(_Shape):
    """Half-space {p : n . p <= position_um}; normal is "x" / "y" / "z" or a vector."""

    normal: object
    position_um: float

    def __post_init__(self):
        object.__setattr__(self, "normal", _unit(self.normal, "Plane.normal"))
        object.__setattr__(self, "position_um", float(self.position_um))

    def level(self, points) -> np.ndarray:
        return _points(points) @ np.asarray(self.normal) - self.position_um


@dataclass(frozen=True)
class Sphere(_Shape):
    """Ball of radius_um around center_um."""

    center_um: tuple
    radius_um: float

    def __post_init__(self):
        object.__setattr__(self, "center_um", _vec3(self.center_um, "Sphere.center_um"))
        object.__setattr__(self, "radius_um", _positive(self.radius_um, "Sphere.radius_um"))

    def level(self, points) -> np.ndarray:
        return np.linalg.norm(_points(points) - np.asarray(self.center_um), axis=1) - self.radius_um


@dataclass(frozen=True)
class Cylinder(_Shape):
    """Solid circular cylinder around the axis line through center_um.

    height_um None: infinite (crossing the whole grid); else |(p - c) . axis| <= height_um / 2.
    """

    center_um: tuple
    axis: object
    radius_um: float
    height_um: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "center_um", _vec3(self.center_um, "Cylinder.center_um"))
        object.__setattr__(self, "axis", _unit(self.axis, "Cylinder.axis"))
        object.__setattr__(self, "radius_um", _positive(self.radius_um, "Cylinder.radius_um"))
        if self.height_um is not None:
            object.__setattr__(self, "height_um",
                               _positive(self.height_um, "Cylinder.height_um"))

    def level(self, points) -> np.ndarray:
        h, rho = _axial_radial(points, self.center_um, self.axis)
        lv = rho - self.radius_um
        if self.height_um is not None:
            lv = np.maximum(lv, np.abs(h) - self.height_um / 2)
        return lv


@dataclass(frozen=True)
class Torus(_Shape):
    """Solid torus: the ring of radius major_radius_um around the axis through center_um,
    thickened by minor_radius_um."""

    center_um: tuple
    axis: object
    major_radius_um: float
    minor_radius_um: float

    def __post_init__(self):
        object.__setattr__(self, "center_um", _vec3(self.center_um, "Torus.center_um"))
        object.__setattr__(self, "axis", _unit(self.axis, "Torus.axis"))
        object.__setattr__(self, "major_radius_um",
                           _positive(self.major_radius_um, "Torus.major_radius_um"))
        object.__setattr__(self, "minor_radius_um",
                           _positive(self.minor_radius_um, "Torus.minor_radius_um"))

    def level(self, points) -> np.ndarray:
        h, rho = _axial_radial(points, self.center_um, self.axis)
        return np.hypot(rho - self.major_radius_um, h) - self.minor_radius_um


def catmull_rom(control_points: np.ndarray, samples_per_segment: int) -> np.ndarray:
    """Uniform Catmull-Rom spline through control points (K+1, 3), sampled as a polyline.

    Returns (K * samples_per_segment + 1, 3) points, passing through every control point; the
    spline is C1. The end segments use phantom points mirrored through the end points.
    """
    c = np.asarray(control_points, dtype=np.float64)
    ext = np.concatenate([2 * c[:1] - c[1:2], c, 2 * c[-1:] - c[-2:-1]])
    t = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    # Catmull-Rom basis (tension 1/2) for the segment between ext[i+1] and ext[i+2]
    b0 = 0.5 * (-t**3 + 2 * t**2 - t)
    b1 = 0.5 * (3 * t**3 - 5 * t**2 + 2)
    b2 = 0.5 * (-3 * t**3 + 4 * t**2 + t)
    b3 = 0.5 * (t**3 - t**2)
    segs = [b0 * ext[i] + b1 * ext[i + 1] + b2 * ext[i + 2] + b3 * ext[i + 3]
            for i in range(c.shape[0] - 1)]
    return np.concatenate(segs + [c[-1:]])


def distance_to_polyline(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
    """(N,) exact Euclidean distance, um, from points (N, 3) to the polyline (S+1, 3)."""
    p = _points(points)
    a = polyline[:-1]
    ab = polyline[1:] - a
    ab2 = np.maximum(np.einsum("ij,ij->i", ab, ab), np.finfo(float).tiny)
    out = np.empty(p.shape[0])
    for s in range(0, p.shape[0], _CHUNK):
        ap = p[s:s + _CHUNK, None, :] - a[None]
        t = np.clip(np.einsum("nsj,sj->ns", ap, ab) / ab2, 0.0, 1.0)
        d = ap - t[..., None] * ab[None]
        out[s:s + _CHUNK] = np.sqrt(np.min(np.einsum("nsj,nsj->ns", d, d), axis=1))
    return out


@dataclass(frozen=True)
class BentAxon(_Shape):
    """Tube of radius_um around a smooth curve: inside = distance to the curve <= radius_um.

    The curve is the Catmull-Rom spline through control_points_um ((K+1) points, um), sampled
    with samples_per_segment points per segment; distances are exact to that polyline.
    """

    control_points_um: tuple
    radius_um: float
    samples_per_segment: int = 32

    def __post_init__(self):
        c = np.asarray(self.control_points_um, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 2 or not np.all(np.isfinite(c)):
            raise ValueError("BentAxon.control_points_um must be at least 2 finite 3-vectors, "
                             f"got shape {c.shape}")
        object.__setattr__(self, "control_points_um", tuple(map(tuple, c.tolist())))
        object.__setattr__(self, "radius_um", _positive(self.radius_um, "BentAxon.radius_um"))
        if int(self.samples_per_segment) < 1:
            raise ValueError("BentAxon.samples_per_segment must be >= 1")
        object.__setattr__(self, "samples_per_segment", int(self.samples_per_segment))

    @property
    def segments(self) -> int:
        return len(self.control_points_um) - 1

    def curve(self) -> np.ndarray:
        """(K * samples_per_segment + 1, 3) polyline of the axon's centre line, um."""
        return catmull_rom(np.asarray(self.control_points_um), self.samples_per_segment)

    def level(self, points) -> np.ndarray:
        return distance_to_polyline(points, self.curve()) - self.radius_um

    @classmethod
    def random(cls, seed: int, radius_um: float | None = None, segments: int | None = None,
               box_half_um: float = 40.0 / 3.0, axis: str | None = None,
               side_margin_um: float = 2.0) -> BentAxon:
        """A smooth random axon crossing the box [-box_half_um, box_half_um]^3 (um).

        Like the paper's axons: radius drawn in [4.2, 5.5] um and 4-9 segments unless given;
        the curve runs along a coordinate axis (drawn unless given) from 2 radii beyond one
        face of the box to 2 radii beyond the opposite face. Its control points share a random
        lateral shift and each wiggles around it; the sampled curve keeps the whole tube at
        least side_margin_um off the four side faces, so the axon leaves the box only through
        the two end faces. The default 2 um exceeds a quarter cube of the paper's grid
        (1.67 um), the depth of the outermost tet centroids, so this holds for the "centroid"
        rule there too. Deterministic in seed.

        On the paper's grid with inside_tets(..., rule="centroid"), seeds 0-99 give 55-100
        inside tets and 68-106 membrane faces (paper: 66-105 and 72-108); about 30% of the
        draws have a non-manifold membrane, which the paper's set excludes (see
        meshes.paper.random_paper_axon).
        """
        rng = np.random.default_rng(seed)
        radius = float(rng.uniform(4.2, 5.5)) if radius_um is None else float(radius_um)
        k = int(rng.integers(4, 10)) if segments is None else int(segments)
        ax = "xyz"[int(rng.integers(3))] if axis is None else axis
        if ax not in _AXES:
            raise ValueError(f"BentAxon.random: axis must be 'x', 'y' or 'z', got {ax!r}")
        if k < 1:
            raise ValueError(f"BentAxon.random: segments must be >= 1, got {segments!r}")
        control = _random_crossing_curve(rng, "xyz".index(ax), float(box_half_um), radius, k,
                                         float(side_margin_um))
        return cls(control_points_um=control, radius_um=radius)


# Lateral placement of random axons, as fractions of the room half - radius - margin: a
# common shift drawn in [-_SHIFT, _SHIFT] per lateral axis plus a per-control-point wiggle in
# [-_WIGGLE, _WIGGLE]. Chosen so that fills on the paper's grid match the paper's axons.
_SHIFT = 0.8
_WIGGLE = 0.25


def _random_crossing_curve(rng, axis: int, half: float, radius: float, segments: int,
                           margin: float, attempts: int = 1000) -> np.ndarray:
    """Control points (segments+1, 3) of a random curve along `axis` crossing [-half, half]^3.

    Redraws until the sampled curve's lateral coordinates stay within half - radius - margin.
    """
    room = half - radius - margin
    if room <= 0.0:
        raise ValueError(f"no lateral room for an axon of radius {radius} um in a box of "
                         f"half-width {half} um with side margin {margin} um")
    lateral = [d for d in range(3) if d != axis]
    for _ in range(attempts):
        c = np.zeros((segments + 1, 3))
        c[:, axis] = np.linspace(-half - 2 * radius, half + 2 * radius, segments + 1)
        shift = rng.uniform(-_SHIFT * room, _SHIFT * room, size=2)
        c[:, lateral] = shift + rng.uniform(-_WIGGLE * room, _WIGGLE * room,
                                            size=(segments + 1, 2))
        if np.max(np.abs(catmull_rom(c, 32)[:, lateral])) <= room:
            return c
    raise RuntimeError("could not draw a random axon curve inside the box")


@dataclass(frozen=True)
class TwoAxons(_Shape):
    """Union of two bent axons whose tubes are at least min_gap_um apart (checked)."""

    first: BentAxon
    second: BentAxon
    min_gap_um: float = 0.0

    def __post_init__(self):
        gap = self.gap_um()
        if gap < self.min_gap_um:
            raise ValueError(f"TwoAxons: the tubes are {gap:.3f} um apart (negative: they "
                             f"intersect), need at least {self.min_gap_um} um")

    def gap_um(self) -> float:
        """Lower bound on the distance between the two tubes' surfaces, um."""
        c1, c2 = self.first.curve(), self.second.curve()
        # Vertices of curve 1 to the polyline of curve 2 overestimate the polyline distance by
        # at most half of curve 1's longest sample spacing; subtract it to stay a lower bound.
        spacing = float(np.max(np.linalg.norm(np.diff(c1, axis=0), axis=1)))
        d = float(np.min(distance_to_polyline(c1, c2))) - spacing / 2
        return d - self.first.radius_um - self.second.radius_um

    def level(self, points) -> np.ndarray:
        return np.minimum(self.first.level(points), self.second.level(points))

    @classmethod
    def random(cls, seed: int, box_half_um: float = 40.0 / 3.0, min_gap_um: float = 1.0,
               radius_range_um: tuple[float, float] = (3.0, 4.5),
               segments_range: tuple[int, int] = (4, 9), side_margin_um: float = 2.0,
               attempts: int = 1000) -> TwoAxons:
        """Two random axons (as BentAxon.random) along the same random axis, min_gap_um apart.

        Radii and segment counts are drawn uniformly from the given (inclusive) ranges; pairs
        are redrawn until the tubes are disjoint. Deterministic in seed.
        """
        rng = np.random.default_rng(seed)
        axis = int(rng.integers(3))
        for _ in range(attempts):
            axons = []
            for _ in range(2):
                r = float(rng.uniform(*radius_range_um))
                k = int(rng.integers(segments_range[0], segments_range[1] + 1))
                c = _random_crossing_curve(rng, axis, float(box_half_um), r, k,
                                           side_margin_um)
                axons.append(BentAxon(control_points_um=c, radius_um=r))
            try:
                return cls(axons[0], axons[1], min_gap_um=min_gap_um)
            except ValueError:
                continue
        raise RuntimeError(f"TwoAxons.random: no pair {min_gap_um} um apart in {attempts} "
                           f"draws for seed {seed}")


def inside_tets(grid: Grid, shape: _Shape, rule: str = "vertices") -> np.ndarray:
    """(T,) bool: tets of grid inside shape.

    rule "vertices" (the paper's analytic shapes; reproduces their files exactly): all 4
    vertices inside. rule "centroid": the tet's centroid inside. The paper's bent-axon files
    are consistent with "centroid" and not with "vertices" (their inside tets have vertices
    up to 14.9 um apart across a tube of diameter 9-11 um); their curves are unpublished, so
    this is inferred, not verified.
    """
    if rule == "vertices":
        return np.all(shape.inside(grid.points)[grid.tets], axis=1)
    if rule == "centroid":
        return shape.inside(grid.points[grid.tets].mean(axis=1))
    raise ValueError(f"inside_tets: rule must be 'vertices' or 'centroid', got {rule!r}")


def membrane_faces(face_table: FaceTable, inside_tet_mask: np.ndarray) -> np.ndarray:
    """(F,) bool over canonical faces: faces used by exactly one inside tet.

    inside_tet_mask: (T,) bool. Interior faces between an inside and an outside tet, and outer
    faces of inside tets (closing the surface where the shape leaves the grid).
    """
    m = np.asarray(inside_tet_mask, dtype=bool)
    if m.shape != (face_table.tet_faces.shape[0],):
        raise ValueError(f"inside_tet_mask must have shape ({face_table.tet_faces.shape[0]},), "
                         f"got {m.shape}")
    c = face_table.cells
    a = m[c[:, 0]]
    b = np.where(c[:, 1] >= 0, m[np.maximum(c[:, 1], 0)], False)
    return a != b


def is_closed_manifold(face_table: FaceTable, face_mask: np.ndarray) -> bool:
    """True when every edge of the masked faces (F,) bool is used by exactly two of them.

    The paper's BadEdge% = 0 criterion; an empty mask counts as closed.
    """
    m = np.asarray(face_mask, dtype=bool)
    if not np.any(m):
        return True
    counts = build_edge_table(face_table.faces[m]).edge_face_counts()
    return bool(np.all(counts == 2))
