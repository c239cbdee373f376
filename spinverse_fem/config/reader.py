"""Reading a run configuration: one TOML file -> the frozen dataclasses of `config.schema`.

Every unknown section or key is rejected, and every value is checked for type, sign and
finiteness; errors are `InputError(file, "section.key", message)`. Relative file paths are
resolved against the folder of the configuration file. Units are in the key names
(um, ms, um/ms, um^2/ms, s/mm^2).

Sections: [grid], [geometry], [permeability], [physics], [eigen], [full_order], [[sequence]],
[inversion] (with [[inversion.stage]] for a custom curriculum), [target]. See the dataclasses
below for the keys, their defaults and their constraints.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from spinverse_fem.config.protocol import (
    UNIT_TOL,
    Sequence,
    fibonacci_directions,
    read_camino_scheme,
    read_fsl,
    read_text_file,
)
from spinverse_fem.config.schema import (
    BASES,
    COMPARTMENT_REGIONS,
    MAX_EIGENBASIS_BYTES,
    MAX_KAPPA_UM_PER_MS,
    MAX_MEASUREMENTS_PER_SEQUENCE,
    MAX_TETRAHEDRA,
    CompartmentConfig,
    Config,
    EigenConfig,
    FullOrderConfig,
    GeometryConfig,
    GridConfig,
    InversionConfig,
    MembraneConfig,
    PermeabilityConfig,
    PhysicsConfig,
    Stage,
    TargetConfig,
    eigenbasis_bytes,
    estimated_tetrahedra,
)
from spinverse_fem.errors import InputError

_MISSING = object()
_AXES = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


# -- parsing helpers -------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "table"}.get(type(v), type(v).__name__)


class _Table:
    """A TOML table being read: typed getters that name `prefix.key` in every error."""

    def __init__(self, data: Any, source: str, prefix: str):
        if not isinstance(data, dict):
            raise InputError(source, prefix, f"must be a table, got {_type_name(data)}")
        self.data, self.source, self.prefix = data, source, prefix

    def field(self, key: str) -> str:
        return f"{self.prefix}.{key}"

    def error(self, key: str, message: str) -> InputError:
        return InputError(self.source, self.field(key), message)

    def allow(self, allowed, context: str = "") -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown key{context}; allowed: {', '.join(allowed)}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default=_MISSING):
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.error(key, "required key missing")
        return default

    def number(self, key, default=_MISSING, *, gt=None, ge=None, le=None) -> float | None:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        return _number(v, self.source, self.field(key), gt=gt, ge=ge, le=le)

    def kappa(self, key, default=_MISSING, *, gt=None, ge=None) -> float | None:
        """A permeability (um/ms): a number, and at most MAX_KAPPA_UM_PER_MS."""
        v = self.number(key, default, gt=gt, ge=ge)
        if key in self.data and v > MAX_KAPPA_UM_PER_MS:
            raise self.error(key, f"{v:g} um/ms is not a physical permeability: at most "
                             f"{MAX_KAPPA_UM_PER_MS:g} um/ms (a face is already transparent far "
                             "below that; see config.schema)")
        return v

    def integer(self, key, default=_MISSING, *, ge=None) -> int | None:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        return _integer(v, self.source, self.field(key), ge=ge)

    def boolean(self, key, default=_MISSING) -> bool | None:
        v = self.raw(key, default)
        if key in self.data and not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {_type_name(v)}")
        return v

    def string(self, key, default=_MISSING, choices=None) -> str | None:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        if not isinstance(v, str):
            raise self.error(key, f"must be a string, got {_type_name(v)}")
        if choices is not None and v not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        if not v:
            raise self.error(key, "must not be empty")
        return v

    def vector3(self, key, default=_MISSING) -> tuple[float, float, float] | None:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        return _vector3(v, self.source, self.field(key))

    def unit_axis(self, key) -> tuple[float, float, float]:
        v = self.raw(key)
        if isinstance(v, str):
            if v.lower() not in _AXES:
                raise self.error(key, f"must be 'x', 'y', 'z' or a unit 3-vector, got {v!r}")
            return _AXES[v.lower()]
        a = _vector3(v, self.source, self.field(key))
        n = math.sqrt(sum(x * x for x in a))
        if abs(n - 1.0) > UNIT_TOL:
            raise self.error(key, f"must be a unit vector, got norm {n:.9g}")
        return a

    def numbers(self, key, default=_MISSING) -> list[float] | None:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        if not isinstance(v, list) or not v:
            raise self.error(key, f"must be a non-empty list of numbers, got {_type_name(v)}")
        return [_number(x, self.source, f"{self.field(key)}[{i}]") for i, x in enumerate(v)]

    def path(self, key, base: Path, default=_MISSING, must_exist: bool = True) -> Path | None:
        v = self.raw(key, default)
        if key not in self.data:
            return v
        if not isinstance(v, str) or not v:
            raise self.error(key, f"must be a non-empty path string, got {_type_name(v)}")
        p = Path(v).expanduser()
        p = p if p.is_absolute() else base / p
        if must_exist and not p.is_file():
            raise self.error(key, f"file not found: {p}")
        return p


def _number(v, source, field, *, gt=None, ge=None, le=None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(source, field, f"must be a number, got {_type_name(v)} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise InputError(source, field, f"must be finite, got {v}")
    if gt is not None and not v > gt:
        raise InputError(source, field, f"must be > {gt:g}, got {v:g}")
    if ge is not None and not v >= ge:
        raise InputError(source, field, f"must be >= {ge:g}, got {v:g}")
    if le is not None and not v <= le:
        raise InputError(source, field, f"must be <= {le:g}, got {v:g}")
    return v


def _integer(v, source, field, *, ge=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(source, field, f"must be an integer, got {_type_name(v)} {v!r}")
    if ge is not None and v < ge:
        raise InputError(source, field, f"must be >= {ge}, got {v}")
    return v


def _vector3(v, source, field) -> tuple[float, float, float]:
    if not isinstance(v, list) or len(v) != 3:
        raise InputError(source, field, f"must be a list of 3 numbers, got {v!r}")
    return tuple(_number(x, source, f"{field}[{i}]") for i, x in enumerate(v))


# -- sections --------------------------------------------------------------------------------------

_GRID_KEYS = {
    "bcc": ["cubes", "cube_um", "center_um"],
    "box": ["lower_um", "upper_um", "cells"],
    "file": ["path", "membrane_tag", "unit_um"],
}


def _grid(t: _Table, base: Path) -> GridConfig:
    kind = t.string("kind", choices=list(_GRID_KEYS))
    t.allow(["kind", *_GRID_KEYS[kind]], f" for kind {kind!r}")
    if kind == "bcc":
        return GridConfig(
            kind,
            cubes=t.integer("cubes", ge=2),
            cube_um=t.number("cube_um", gt=0),
            center_um=t.vector3("center_um", (0.0, 0.0, 0.0)),
        )
    if kind == "box":
        lo, hi = t.vector3("lower_um"), t.vector3("upper_um")
        for i in range(3):
            if not hi[i] > lo[i]:
                raise t.error("upper_um",
                              f"must exceed lower_um in every component, got {hi} vs {lo}")
        cells = t.raw("cells")
        if not isinstance(cells, list) or len(cells) != 3:
            raise t.error("cells", f"must be a list of 3 integers, got {cells!r}")
        cells = tuple(_integer(c, t.source, f"{t.field('cells')}[{i}]", ge=1)
                      for i, c in enumerate(cells))
        return GridConfig(kind, lower_um=lo, upper_um=hi, cells=cells)
    return GridConfig(kind, path=t.path("path", base), membrane_tag=t.integer("membrane_tag", None),
                      unit_um=t.number("unit_um", 1.0, gt=0))


_GEOMETRY_KEYS = {
    "none": [],
    "plane": ["axis", "position_um"],
    "sphere": ["center_um", "radius_um"],
    "cylinder": ["center_um", "axis", "radius_um", "height_um"],
    "torus": ["center_um", "axis", "major_radius_um", "minor_radius_um"],
    "bent_axon": ["radius_um", "segments", "seed", "control_points_um"],
    "two_axons": ["radius_um", "seed"],
    "paper": ["path"],
    "file_tags": [],
}


INSIDE_RULES = ("vertices", "centroid")
_ANALYTIC_KINDS = ("plane", "sphere", "cylinder", "torus", "bent_axon", "two_axons")


def _geometry(t: _Table, base: Path, grid: GridConfig, membranes: bool) -> GeometryConfig:
    kind = t.string("kind", choices=list(_GEOMETRY_KEYS))
    analytic = kind in _ANALYTIC_KINDS
    t.allow(["kind", *_GEOMETRY_KEYS[kind], *(["inside_rule"] if analytic else [])],
            f" for kind {kind!r}")
    geo = _geometry_fields(t, kind, base, grid, membranes)
    if grid.membrane_tag is not None and kind != "file_tags":
        raise InputError(t.source, "grid.membrane_tag",
                         f"is used only with geometry.kind = 'file_tags' (the membrane taken "
                         f"from the mesh file), got geometry.kind = {kind!r}: remove it, or "
                         "set geometry.kind = 'file_tags'")
    if analytic:
        geo = replace(geo,
                      inside_rule=t.string("inside_rule", "vertices", choices=list(INSIDE_RULES)))
    return geo


def _geometry_fields(t: _Table, kind: str, base: Path, grid: GridConfig,
                     membranes: bool) -> GeometryConfig:
    origin = (0.0, 0.0, 0.0)
    if kind == "plane":
        return GeometryConfig(kind, axis=t.unit_axis("axis"), position_um=t.number("position_um"))
    if kind == "sphere":
        return GeometryConfig(kind, center_um=t.vector3("center_um", origin),
                              radius_um=t.number("radius_um", gt=0))
    if kind == "cylinder":
        return GeometryConfig(
            kind,
            center_um=t.vector3("center_um", origin),
            axis=t.unit_axis("axis"),
            radius_um=t.number("radius_um", gt=0),
            height_um=t.number("height_um", None, gt=0),
        )
    if kind == "torus":
        major = t.number("major_radius_um", gt=0)
        minor = t.number("minor_radius_um", gt=0)
        if not minor < major:
            raise t.error("minor_radius_um",
                          f"must be < major_radius_um ({major:g}), got {minor:g}")
        return GeometryConfig(
            kind,
            center_um=t.vector3("center_um", origin),
            axis=t.unit_axis("axis"),
            major_radius_um=major,
            minor_radius_um=minor,
        )
    if kind == "bent_axon":
        radius = t.number("radius_um", gt=0)
        if t.has("control_points_um"):
            for key in ("segments", "seed"):
                if t.has(key):
                    raise t.error(key, "not allowed together with control_points_um")
            pts = t.raw("control_points_um")
            if not isinstance(pts, list) or len(pts) < 2:
                raise t.error("control_points_um", "must be a list of at least two 3-vectors")
            pts = tuple(_vector3(p, t.source, f"{t.field('control_points_um')}[{i}]")
                        for i, p in enumerate(pts))
            return GeometryConfig(kind, radius_um=radius, control_points_um=pts)
        return GeometryConfig(
            kind, radius_um=radius, segments=t.integer("segments", ge=1), seed=t.integer("seed", 0)
        )
    if kind == "two_axons":
        return GeometryConfig(kind, radius_um=t.number("radius_um", gt=0),
                              seed=t.integer("seed", 0))
    if kind == "paper":
        return GeometryConfig(kind, path=t.path("path", base))
    if kind == "file_tags" and grid.kind != "file":
        raise t.error("kind", f"'file_tags' needs grid.kind = 'file', got {grid.kind!r}")
    if kind == "file_tags" and grid.membrane_tag is None and not membranes:
        # without it every tagged triangle, the outer boundary's included, would be membrane
        raise InputError(t.source, "grid.membrane_tag",
                         "missing: geometry.kind = 'file_tags' takes the membrane from the "
                         "triangles of one physical surface; name its tag (or give one "
                         "[[membrane]] table per membrane surface; the outer boundary's "
                         "triangles must not be membrane)")
    return GeometryConfig(kind)


def _permeability(t: _Table, membranes: bool) -> PermeabilityConfig:
    t.allow(["barrier_um_per_ms", "open_um_per_ms", "outer"])
    if membranes and t.has("barrier_um_per_ms"):
        raise t.error("barrier_um_per_ms", "is set per membrane (kappa_um_per_ms) when "
                      "[[membrane]] tables are given; remove it from [permeability]")
    barrier = None if membranes else t.kappa("barrier_um_per_ms", ge=0)
    open_ = t.kappa("open_um_per_ms", gt=0)
    if barrier is not None and barrier > open_:
        raise t.error("barrier_um_per_ms",
                      f"must be <= open_um_per_ms ({open_:g}), got {barrier:g}")
    return PermeabilityConfig(barrier, open_,
                              t.string("outer", "neumann", choices=["neumann", "robin"]))


def _physics(t: _Table) -> PhysicsConfig:
    t.allow(["diffusivity_um2_per_ms", "t2_ms"])
    return PhysicsConfig(t.number("diffusivity_um2_per_ms", 2.0, gt=0),
                         t.number("t2_ms", None, gt=0))


def _compartments(raw, source: str, grid: GridConfig, geometry: GeometryConfig,
                  physics: _Table) -> tuple[CompartmentConfig, ...]:
    """[[compartment]] tables. On a file grid each names a volume `tag`; on a generated grid a
    `region` of the [geometry] shape. Which cells they cover is checked once the grid exists
    (`geometry.phantom.compartment_fields`)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise InputError(source, "compartment", "must be an array of tables: write "
                         "[[compartment]], one per compartment")
    for key in ("diffusivity_um2_per_ms", "t2_ms"):
        if physics.has(key):
            raise physics.error(key, "is set per compartment when [[compartment]] tables are "
                                "given; remove it from [physics]")
    out, names, keys = [], set(), set()
    for i, c in enumerate(raw):
        t = _Table(c, source, f"compartment[{i}]")
        t.allow(["name", "diffusivity_um2_per_ms", "t2_ms", "tag", "region",
                 "diffusivity_start_um2_per_ms", "t2_start_ms", "spin_density"])
        name = t.string("name", f"compartment {i}")
        if name in names:
            raise t.error("name", f"duplicate compartment name {name!r}")
        names.add(name)
        if grid.kind == "file":
            if t.has("region"):
                raise t.error("region", "selects cells of a generated grid; on a file grid "
                              "(grid.kind = 'file') name the volume physical tag with `tag`")
            tag = t.integer("tag")
            key = ("tag", tag)
            region = None
        else:
            if t.has("tag"):
                raise t.error("tag", f"selects cells of a file grid; grid.kind = {grid.kind!r} "
                              "is generated: use region = \"inside\" or \"outside\"")
            if geometry.kind in ("none", "paper", "file_tags"):
                raise t.error("region", "needs an analytic [geometry] shape to be inside or "
                              f"outside of, got geometry.kind = {geometry.kind!r}")
            region = t.string("region", choices=list(COMPARTMENT_REGIONS))
            tag = None
            key = ("region", region)
        if key in keys:
            raise t.error(key[0], f"{key[0]} {key[1]!r} is already another compartment's")
        keys.add(key)
        t2 = t.number("t2_ms", None, gt=0)
        if t.has("t2_start_ms") and t2 is None:
            raise t.error("t2_start_ms", "needs t2_ms (this compartment does not relax)")
        D, tensor = _diffusivity(t)
        out.append(CompartmentConfig(name, D, t2, tag, region,
                                     t.number("diffusivity_start_um2_per_ms", None, gt=0),
                                     t.number("t2_start_ms", None, gt=0), tensor,
                                     t.number("spin_density", 1.0, gt=0)))
    return tuple(out)


def _diffusivity(t: _Table) -> tuple[float, tuple | None]:
    """compartment.diffusivity_um2_per_ms: a number D > 0, or a symmetric positive definite
    3 x 3 tensor (um^2/ms, grid axes). Returns (D or the tensor's mean diffusivity, the tensor
    as a tuple of rows or None)."""
    key = "diffusivity_um2_per_ms"
    raw = t.raw(key)
    if not isinstance(raw, list):
        return t.number(key, gt=0), None
    if len(raw) != 3 or not all(isinstance(r, list) and len(r) == 3 for r in raw):
        raise t.error(key, "must be a number or a 3 x 3 tensor [[Dxx, Dxy, Dxz], [Dyx, Dyy, "
                      f"Dyz], [Dzx, Dzy, Dzz]], got {raw!r}")
    Dt = np.array([[_number(v, t.source, f"{t.field(key)}[{i}][{j}]") for j, v in enumerate(r)]
                   for i, r in enumerate(raw)])
    if not np.allclose(Dt, Dt.T, rtol=1e-12, atol=0.0):
        raise t.error(key, "the tensor must be symmetric")
    ev = np.linalg.eigvalsh(Dt)
    if not ev[0] > 0:
        raise t.error(key, f"the tensor must be positive definite (eigenvalues {ev.tolist()} "
                      "um^2/ms)")
    return float(np.trace(Dt) / 3.0), tuple(tuple(float(v) for v in r) for r in Dt)


def _membranes(raw, source: str, grid: GridConfig,
               permeability: PermeabilityConfig) -> tuple[MembraneConfig, ...]:
    """[[membrane]] tables: surface physical tags of a file grid, each with its permeability.
    That every tag is in the mesh is checked when the grid is read."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise InputError(source, "membrane", "must be an array of tables: write [[membrane]], "
                         "one per membrane surface")
    if grid.kind != "file":
        raise InputError(source, "membrane", "[[membrane]] tables select tagged triangles of a "
                         f"mesh file (grid.kind = 'file'), got grid.kind = {grid.kind!r}; a "
                         "generated grid takes its membrane from [geometry]")
    if grid.membrane_tag is not None:
        raise InputError(source, "grid.membrane_tag", "not allowed together with [[membrane]] "
                         "tables: give the tag in a [[membrane]] table instead")
    out, names, tags = [], set(), set()
    for i, m in enumerate(raw):
        t = _Table(m, source, f"membrane[{i}]")
        t.allow(["name", "tag", "kappa_um_per_ms"])
        name = t.string("name", f"membrane {i}")
        if name in names:
            raise t.error("name", f"duplicate membrane name {name!r}")
        names.add(name)
        tag = t.integer("tag")
        if tag in tags:
            raise t.error("tag", f"tag {tag} is already another membrane's")
        tags.add(tag)
        kappa = t.kappa("kappa_um_per_ms", ge=0)
        if kappa > permeability.open_um_per_ms:
            raise t.error("kappa_um_per_ms", f"must be <= permeability.open_um_per_ms "
                          f"({permeability.open_um_per_ms:g}), got {kappa:g}")
        out.append(MembraneConfig(name, tag, kappa))
    return tuple(out)


def _eigen(t: _Table) -> EigenConfig:
    t.allow(["length_scale_um", "max_modes", "num_modes", "tolerance"])
    max_modes = t.integer("max_modes", 500, ge=1)
    num_modes = t.integer("num_modes", None, ge=1)
    if num_modes is not None and num_modes > max_modes:
        raise t.error("num_modes", f"must be <= max_modes ({max_modes}), got {num_modes}")
    return EigenConfig(
        t.number("length_scale_um", 2.0, gt=0), max_modes, num_modes,
        t.number("tolerance", 1e-10, gt=0)
    )


def _full_order(t: _Table) -> FullOrderConfig:
    t.allow(["time_step_ms"])
    return FullOrderConfig(t.number("time_step_ms", 0.05, gt=0))


_SEQUENCE_KEYS = {
    "pgse": ["delta_ms", "Delta_ms", "b_s_per_mm2", "directions", "fibonacci"],
    "waveform": ["segments", "b_s_per_mm2", "directions", "fibonacci"],
    "camino": ["file"],
    "fsl": ["bvals", "bvecs", "delta_ms", "Delta_ms"],
}


def _directions(t: _Table) -> np.ndarray:
    if t.has("directions") == t.has("fibonacci"):
        raise t.error("directions", "give exactly one of 'directions' (list of unit 3-vectors) "
                                    "or 'fibonacci' (count)")
    if t.has("fibonacci"):
        n = t.integer("fibonacci", ge=1)
        if n > MAX_MEASUREMENTS_PER_SEQUENCE:
            raise t.error("fibonacci", _too_many(n))
        return fibonacci_directions(n)
    d = t.raw("directions")
    if not isinstance(d, list) or not d:
        raise t.error("directions", "must be a non-empty list of unit 3-vectors")
    if len(d) > MAX_MEASUREMENTS_PER_SEQUENCE:
        raise t.error("directions", _too_many(len(d)))
    # Unit length is checked by Sequence, naming the offending entry.
    return np.array([_vector3(v, t.source, f"{t.field('directions')}[{i}]")
                     for i, v in enumerate(d)])


def _too_many(n: int, what: str = "measurements") -> str:
    return (f"{n} {what} in one sequence; at most {MAX_MEASUREMENTS_PER_SEQUENCE} are "
            "supported (each costs a reduced-model evaluation per gradient step)")


def _measurements(t: _Table, b: list[float], directions: np.ndarray) -> np.ndarray:
    """Refuse a b x directions product beyond the limit before it is built."""
    n = len(b) * int(directions.shape[0])
    if n > MAX_MEASUREMENTS_PER_SEQUENCE:
        raise t.error("b_s_per_mm2", _too_many(n, f"measurements ({len(b)} b-values x "
                                                 f"{directions.shape[0]} directions)"))
    return directions


def _pgse_timing(t: _Table) -> tuple[float, float]:
    delta = t.number("delta_ms", gt=0)
    Delta = t.number("Delta_ms", gt=0)
    if delta > Delta:
        raise t.error("delta_ms", f"must be <= Delta_ms ({Delta:g}), got {delta:g}")
    return delta, Delta


def _sequences(t: _Table, base: Path, files: list) -> list[Sequence]:
    """The sequences of one [[sequence]] table; protocol files read are appended to `files`."""
    kind = t.string("type", choices=list(_SEQUENCE_KEYS))
    t.allow(["type", "name", *_SEQUENCE_KEYS[kind]], f" for type {kind!r}")
    name = t.string("name", None)
    prefix = t.prefix + "."
    if kind == "pgse":
        delta, Delta = _pgse_timing(t)
        b = t.numbers("b_s_per_mm2")
        d = _measurements(t, b, _directions(t))
        return [Sequence.pgse(delta, Delta, b, d, name=name, source=t.source, prefix=prefix)]
    if kind == "waveform":
        seg = t.raw("segments")
        if not isinstance(seg, list) or not seg:
            raise t.error("segments", "must be a non-empty list of [duration_ms, amplitude]")
        rows = []
        for i, s in enumerate(seg):
            f = f"{t.field('segments')}[{i}]"
            if not isinstance(s, list) or len(s) != 2:
                raise InputError(t.source, f, f"must be [duration_ms, amplitude], got {s!r}")
            rows.append((_number(s[0], t.source, f + "[0]", ge=0),
                         _number(s[1], t.source, f + "[1]")))
        b = t.numbers("b_s_per_mm2")
        d = _measurements(t, b, _directions(t))
        return [
            Sequence.waveform(rows, b, d, name=name or "waveform", source=t.source, prefix=prefix)
        ]
    if kind == "camino":
        path = t.path("file", base)
        files.append((t.field("file"), path))
        seqs = read_camino_scheme(path)
        if name is None:
            return seqs
        if len(seqs) == 1:
            return [_renamed(seqs[0], name)]
        return [_renamed(s, f"{name} {s.name}") for s in seqs]
    delta, Delta = _pgse_timing(t)
    bvals, bvecs = t.path("bvals", base), t.path("bvecs", base)
    files.extend([(t.field("bvals"), bvals), (t.field("bvecs"), bvecs)])
    return [read_fsl(bvals, bvecs, delta, Delta, name=name)]


def _renamed(s: Sequence, name: str) -> Sequence:
    return Sequence(name, s.segments, s.b_s_per_mm2, s.directions)


_INVERSION_DEFAULTS = InversionConfig()


def _inversion(t: _Table, sequences: list[Sequence]) -> InversionConfig:
    d = _INVERSION_DEFAULTS
    allowed = [k for k in InversionConfig.__dataclass_fields__ if k != "custom_stages"] + ["stage"]
    t.allow(allowed)
    kmin = t.kappa("kappa_min_um_per_ms", d.kappa_min_um_per_ms, gt=0)
    kmax = t.kappa("kappa_max_um_per_ms", d.kappa_max_um_per_ms, gt=0)
    if not kmax > kmin:
        raise t.error("kappa_max_um_per_ms",
                      f"must be > kappa_min_um_per_ms ({kmin:g}), got {kmax:g}")
    start = t.number("start_um_per_ms", d.start_um_per_ms, ge=kmin, le=kmax)
    threshold = t.number("threshold_um_per_ms", d.threshold_um_per_ms, ge=kmin, le=kmax)
    curriculum = t.string("curriculum", d.curriculum,
                          choices=["staged", "split", "long_to_short", "cumulative", "custom"])
    iterations = t.integer("iterations_per_stage", d.iterations_per_stage, ge=1)
    cw = t.number("continuity_weight", d.continuity_weight, ge=0)
    mw = t.number("manifold_weight", d.manifold_weight, ge=0)
    stages: tuple[Stage, ...] = ()
    if curriculum == "custom":
        raw = t.raw("stage", None)
        if not isinstance(raw, list) or not raw:
            raise t.error("stage",
                          "curriculum 'custom' needs at least one [[inversion.stage]] table")
        stages = tuple(
            _stage(_Table(s, t.source, f"{t.prefix}.stage[{i}]"), sequences, iterations, cw, mw)
            for i, s in enumerate(raw)
        )
    elif t.has("stage"):
        raise t.error("stage",
                      f"[[inversion.stage]] tables need curriculum = 'custom', got {curriculum!r}")
    return InversionConfig(
        kappa_min_um_per_ms=kmin,
        kappa_max_um_per_ms=kmax,
        start_um_per_ms=start,
        threshold_um_per_ms=threshold,
        optimizer=_optimizer(t, d.optimizer),
        misfit_weight=t.number("misfit_weight", d.misfit_weight, ge=0),
        normalisation=t.string("normalisation", d.normalisation, choices=["reference", "own"]),
        curriculum=curriculum,
        iterations_per_stage=iterations,
        continuity_weight=cw,
        manifold_weight=mw,
        adam_lr=t.number("adam_lr", d.adam_lr, gt=0),
        adam_warmup=t.integer("adam_warmup", d.adam_warmup, ge=0),
        adam_final_lr_factor=t.number("adam_final_lr_factor", d.adam_final_lr_factor, gt=0, le=1),
        adam_eps=t.number("adam_eps", d.adam_eps, gt=0),
        clip_grad_norm=t.number("clip_grad_norm", d.clip_grad_norm, gt=0),
        adam_restart_per_stage=t.boolean("adam_restart_per_stage", d.adam_restart_per_stage),
        checkpoint_every=t.integer("checkpoint_every", d.checkpoint_every, ge=0),
        basis=t.string("basis", d.basis, choices=list(BASES)),
        basis_refresh_every=t.integer("basis_refresh_every", d.basis_refresh_every, ge=1),
        basis_refresh_step=t.number("basis_refresh_step", d.basis_refresh_step, ge=0),
        fit_compartments=_fit_compartments(t),
        noise_snr=t.number("noise_snr", None, gt=0),
        custom_stages=stages,
    )


FIT_COMPARTMENT_FIELDS = ("diffusivity", "t2")


def _fit_compartments(t: _Table) -> tuple[str, ...]:
    """inversion.fit_compartments: which compartment parameters are fitted beside kappa."""
    raw = t.raw("fit_compartments", [])
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise t.error("fit_compartments", f"must be a list of {list(FIT_COMPARTMENT_FIELDS)}, "
                      f"got {raw!r}")
    for v in raw:
        if v not in FIT_COMPARTMENT_FIELDS:
            raise t.error("fit_compartments", f"unknown parameter {v!r}; allowed: "
                          f"{list(FIT_COMPARTMENT_FIELDS)}")
    if len(set(raw)) != len(raw):
        raise t.error("fit_compartments", f"duplicate entries in {raw!r}")
    return tuple(v for v in FIT_COMPARTMENT_FIELDS if v in raw)


def _optimizer(t: _Table, default: str) -> str:
    """inversion.optimizer: "adam" or a PETSc TAO type petsc4py knows (not "python"/"shell",
    which need a context the configuration cannot give)."""
    if not t.has("optimizer"):
        return default  # (no petsc4py import for a configuration that does not choose)
    name = t.string("optimizer")
    if name.lower() == "adam":
        return name
    known = tao_types()
    if name not in known:
        raise t.error("optimizer", f"unknown optimiser {name!r}: use 'adam' or a PETSc TAO type "
                      f"({', '.join(sorted(known))})")
    return name


def tao_types() -> set[str]:
    """The PETSc TAO types usable as inversion.optimizer (petsc4py's PETSc.TAO.Type)."""
    import dolfinx_solver  # noqa: F401  (must precede petsc4py)
    from petsc4py import PETSc

    names = {v for k, v in vars(PETSc.TAO.Type).items()
             if not k.startswith("_") and isinstance(v, str)}
    return names - {"python", "shell"}


def _stage(t: _Table, sequences: list[Sequence], iterations: int, cw: float, mw: float) -> Stage:
    t.allow(["sequences", "iterations", "continuity_weight", "manifold_weight"])
    refs = t.raw("sequences")
    if not isinstance(refs, list) or not refs:
        raise t.error("sequences", "must be a non-empty list of sequence names or 0-based indices")
    names = [s.name for s in sequences]
    idx = []
    for i, r in enumerate(refs):
        f = f"{t.field('sequences')}[{i}]"
        if isinstance(r, str):
            if r not in names:
                raise InputError(t.source, f,
                                 f"no sequence named {r!r}; have {', '.join(map(repr, names))}")
            idx.append(names.index(r))
        elif isinstance(r, int) and not isinstance(r, bool):
            if not 0 <= r < len(sequences):
                raise InputError(t.source, f, f"index {r} out of range (0..{len(sequences) - 1})")
            idx.append(r)
        else:
            raise InputError(t.source, f,
                             f"must be a sequence name or 0-based index, got {_type_name(r)}")
    if len(set(idx)) != len(idx):
        raise t.error("sequences", "lists a sequence twice")
    return Stage(
        tuple(idx),
        t.integer("iterations", iterations, ge=1),
        t.number("continuity_weight", cw, ge=0),
        t.number("manifold_weight", mw, ge=0),
    )


def _target(t: _Table, base: Path) -> TargetConfig:
    t.allow(["file", "noise_snr", "seed", "grid_refinement"])
    return TargetConfig(
        # The target file may be written by an earlier step of the same run.
        file=t.path("file", base, None, must_exist=False),
        noise_snr=t.number("noise_snr", None, gt=0),
        seed=t.integer("seed", 0),
        grid_refinement=t.integer("grid_refinement", None, ge=1),
    )


_SECTIONS = [
    "grid",
    "geometry",
    "permeability",
    "physics",
    "compartment",
    "membrane",
    "eigen",
    "full_order",
    "sequence",
    "inversion",
    "target",
]


# -- entry points ----------------------------------------------------------------------------------


def parse_config(text: str, source: str = "<string>", base_dir: str | Path | None = None) -> Config:
    """Parse TOML text. Relative paths resolve against `base_dir` (default: the folder of
    `source` if it names a file, else the current directory)."""
    source = str(source)
    if base_dir is None:
        base_dir = Path(source).parent if not source.startswith("<") else Path.cwd()
    base = Path(base_dir).absolute()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(source, None, f"invalid TOML: {exc}") from None
    for key in data:
        if key not in _SECTIONS:
            raise InputError(source, key, f"unknown section; allowed: {', '.join(_SECTIONS)}")

    def table(name: str, required: bool = False) -> _Table | None:
        if name not in data:
            if required:
                raise InputError(source, name, f"required section [{name}] missing")
            return None
        return _Table(data[name], source, name)

    empty = lambda name: _Table({}, source, name)  # noqa: E731
    grid = _grid(table("grid", required=True), base)
    has_membranes = data.get("membrane") is not None
    geo_t = table("geometry")
    geometry = _geometry(geo_t, base, grid, has_membranes) if geo_t else GeometryConfig("none")
    if has_membranes and geometry.kind != "file_tags":
        raise InputError(source, "geometry.kind", "[[membrane]] tables take the membranes from "
                         "the mesh file: set geometry.kind = 'file_tags', got "
                         f"{geometry.kind!r}")
    permeability = _permeability(table("permeability", required=True), has_membranes)
    membranes = _membranes(data.get("membrane"), source, grid, permeability)
    physics_t = table("physics") or empty("physics")
    physics = _physics(physics_t)
    compartments = _compartments(data.get("compartment"), source, grid, geometry, physics_t)
    eigen = _eigen(table("eigen") or empty("eigen"))
    full_order = _full_order(table("full_order") or empty("full_order"))

    raw_seqs = data.get("sequence")
    if raw_seqs is None:
        raise InputError(source, "sequence", "at least one [[sequence]] table is required")
    if not isinstance(raw_seqs, list):
        raise InputError(source, "sequence",
                         "must be an array of tables: write [[sequence]], not [sequence]")
    if not raw_seqs:
        raise InputError(source, "sequence",
                         "is empty: at least one [[sequence]] table is required")
    files: list[tuple[str, Path]] = []
    sequences: list[Sequence] = []
    seen: dict[str, str] = {}
    for i, s in enumerate(raw_seqs):
        t = _Table(s, source, f"sequence[{i}]")
        for seq in _sequences(t, base, files):
            if seq.name in seen:
                raise InputError(
                    source,
                    f"sequence[{i}].name",
                    f"duplicate sequence name {seq.name!r} (also {seen[seq.name]}); "
                    "set a distinct 'name'",
                )
            seen[seq.name] = f"sequence[{i}]"
            if seq.num_measurements > MAX_MEASUREMENTS_PER_SEQUENCE:  # read from a file
                raise InputError(source, f"sequence[{i}]", _too_many(seq.num_measurements))
            sequences.append(seq)

    inversion = _inversion(table("inversion") or empty("inversion"), sequences)
    if inversion.fit_compartments and not compartments:
        raise InputError(source, "inversion.fit_compartments", "needs [[compartment]] tables "
                         "(their parameters are what is fitted)")
    if "diffusivity" in inversion.fit_compartments:
        for i, c in enumerate(compartments):
            if c.diffusion_tensor_um2_per_ms is not None:
                raise InputError(source, f"compartment[{i}].diffusivity_um2_per_ms",
                                 "a tensor: inversion.fit_compartments can fit a scalar D "
                                 "only")
    if "t2" in inversion.fit_compartments:
        for i, c in enumerate(compartments):
            if c.t2_ms is None:
                raise InputError(source, f"compartment[{i}].t2_ms", "missing: "
                                 "inversion.fit_compartments includes \"t2\", so every "
                                 "compartment needs a T2 to start from")
    target_t = table("target")
    target = _target(target_t, base) if target_t else None
    _check_sizes(source, grid, eigen, target)
    if grid.path is not None:
        files.insert(0, ("grid.path", grid.path))
    if geometry.path is not None:
        files.insert(0, ("geometry.path", geometry.path))
    return Config(
        source=source,
        text=text,
        grid=grid,
        geometry=geometry,
        permeability=permeability,
        physics=physics,
        eigen=eigen,
        full_order=full_order,
        sequences=tuple(sequences),
        inversion=inversion,
        target=target,
        compartments=compartments,
        membranes=membranes,
        input_files=tuple(files),
    )


def _check_sizes(source: str, grid: GridConfig, eigen: EigenConfig,
                 target: TargetConfig | None) -> None:
    """Refuse, before anything is built, a grid (or the refined reference grid of [target]) that
    cannot fit in memory: the limits and their reasons are in config.schema."""
    refine = target.grid_refinement if target is not None and target.grid_refinement else 1
    if grid.kind == "file":
        if refine != 1:
            raise InputError(source, "target.grid_refinement", "a file grid cannot be refined")
        return  # its size is checked once it is read
    field = {"bcc": "grid.cubes", "box": "grid.cells"}[grid.kind]
    check_grid_size(source, field, estimated_tetrahedra(grid), eigen)
    if refine > 1:  # the reference targets are simulated on the refined grid
        check_grid_size(source, "target.grid_refinement", estimated_tetrahedra(grid, refine),
                        eigen, note=f" (the grid refined {refine} times)")


def check_grid_size(source: str, field: str | None, num_tets: int, eigen: EigenConfig,
                    note: str = "") -> None:
    """InputError(source, field) when num_tets tetrahedra, or the eigenbasis [eigen] asks for
    on them, exceed the limits of config.schema."""
    if num_tets > MAX_TETRAHEDRA:
        raise InputError(source, field, f"{num_tets:.3g} tetrahedra{note}; at most "
                         f"{MAX_TETRAHEDRA:.3g} fit in memory (every rank holds the whole grid)")
    modes = eigen.num_modes if eigen.num_modes is not None else eigen.max_modes
    need = eigenbasis_bytes(num_tets, modes)
    if need > MAX_EIGENBASIS_BYTES:
        raise InputError(source, field, f"{num_tets} tetrahedra{note} with up to {modes} "
                         f"eigenmodes need about {need / 2**30:.0f} GiB for the eigenbasis; "
                         f"the limit is {MAX_EIGENBASIS_BYTES / 2**30:.0f} GiB (use fewer cells "
                         "or lower eigen.max_modes)")


def load_config(path: str | Path) -> Config:
    """Read and parse a TOML configuration file (see the module docstring)."""
    p = Path(path)
    text = read_text_file(p, "configuration")
    return parse_config(text, source=str(p), base_dir=p.parent)

