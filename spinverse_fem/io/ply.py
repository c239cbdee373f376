"""Triangle soups as PLY files: ASCII writer, ASCII and binary_little_endian reader.

Coordinates in um. Format details: docs/file_formats.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.io.atomic import atomic_path


def write_ply(path: str | os.PathLike, points: np.ndarray, tris: np.ndarray) -> None:
    """Write triangles (P, 3) over points (V, 3) um as ASCII PLY, keeping only the used vertices.

    Written atomically (io.atomic): a reader never sees a half-written file. Coordinates keep
    full double precision. Raises ValueError on bad arrays (a programming error, not input).
    """
    points = np.asarray(points, dtype=np.float64)
    tris = np.asarray(tris)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (V, 3), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points contain non-finite coordinates")
    if tris.size == 0:
        tris = np.zeros((0, 3), dtype=np.int64)
    if tris.ndim != 2 or tris.shape[1] != 3 or not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(f"tris must be integer (P, 3), got {tris.dtype} {tris.shape}")
    if tris.size and (tris.min() < 0 or tris.max() >= points.shape[0]):
        raise ValueError("tris reference vertices outside points")
    used, local = np.unique(tris.ravel(), return_inverse=True)
    local = local.reshape(-1, 3)
    pts = points[used]

    header = ("ply\nformat ascii 1.0\ncomment spinverse-fem interface, units um\n"
              f"element vertex {pts.shape[0]}\n"
              "property double x\nproperty double y\nproperty double z\n"
              f"element face {local.shape[0]}\n"
              "property list uchar int vertex_indices\nend_header\n")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii") as fh:
        fh.write(header)
        # %.17g round-trips every double exactly
        np.savetxt(fh, pts, fmt="%.17g")
        np.savetxt(fh, np.column_stack([np.full(local.shape[0], 3), local]), fmt="%d")


# PLY scalar types -> little-endian numpy dtypes
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


@dataclass
class _Element:
    name: str
    count: int
    # (name, dtype) for scalars, (name, count dtype, item dtype) for lists
    props: list = field(default_factory=list)


def _parse_header(fh, source: str) -> tuple[str, list[_Element]]:
    first = fh.readline()
    if first.rstrip(b"\r\n") != b"ply":
        raise InputError(source, None, "not a PLY file (first line is not 'ply')")
    fmt = None
    elements: list[_Element] = []
    while True:
        raw = fh.readline()
        if not raw:
            raise InputError(source, "header", "file ends before 'end_header'")
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise InputError(source, "header", "non-ASCII bytes in the header") from None
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            if len(words) != 3 or words[1] not in ("ascii", "binary_little_endian"):
                raise InputError(source, "format", f"unsupported format line {line!r} (ascii "
                                 "and binary_little_endian are supported)")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise InputError(source, "element", f"malformed line {line!r}")
            elements.append(_Element(words[1], int(words[2])))
        elif words[0] == "property":
            if not elements:
                raise InputError(source, "property", f"{line!r} before any element")
            if len(words) == 5 and words[1] == "list":
                if words[2] not in _PLY_TYPES or words[3] not in _PLY_TYPES:
                    raise InputError(source, "property", f"unknown type in {line!r}")
                elements[-1].props.append((words[4], _PLY_TYPES[words[2]],
                                           _PLY_TYPES[words[3]]))
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1].props.append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise InputError(source, "property", f"malformed line {line!r}")
        else:
            raise InputError(source, "header", f"unknown header line {line!r}")
    if fmt is None:
        raise InputError(source, "format", "missing format line")
    return fmt, elements


def _read_ascii(fh, el: _Element, source: str) -> dict:
    """Rows of one element; a list property must have length 3 (triangles)."""
    cols = {p[0]: [] for p in el.props}
    for r in range(el.count):
        raw = fh.readline()
        if not raw:
            raise InputError(source, el.name, f"file ends after {r} of {el.count} rows")
        words = raw.split()
        pos = 0
        try:
            for p in el.props:
                if len(p) == 2:
                    cols[p[0]].append(float(words[pos]))
                    pos += 1
                else:
                    n = int(words[pos])
                    if n != 3:
                        raise InputError(source, f"{el.name} row {r}",
                                         f"polygon with {n} vertices (only triangles)")
                    cols[p[0]].append([int(w) for w in words[pos + 1:pos + 4]])
                    if len(cols[p[0]][-1]) != 3:
                        raise IndexError
                    pos += 1 + n
        except (IndexError, ValueError):
            raise InputError(source, f"{el.name} row {r}",
                             f"expected {len(el.props)} properties, got {raw!r}") from None
        if pos != len(words):
            raise InputError(source, f"{el.name} row {r}",
                             f"{len(words) - pos} extra values in {raw!r}")
    return {k: np.asarray(v) for k, v in cols.items()}


def _read_binary(fh, el: _Element, source: str) -> dict:
    """Rows of one element; lists are read assuming length 3 and then checked."""
    fields = []
    for p in el.props:
        if len(p) == 2:
            fields.append((p[0], "<" + p[1]))
        else:
            fields.append((p[0] + "__count", "<" + p[1]))
            fields.append((p[0], "<" + p[2], (3,)))
    dtype = np.dtype(fields)
    data = fh.read(dtype.itemsize * el.count)
    if len(data) < dtype.itemsize * el.count:
        raise InputError(source, el.name, f"binary data ends before {el.count} rows "
                         "(or a polygon is not a triangle)")
    rec = np.frombuffer(data, dtype=dtype, count=el.count)
    out = {}
    for p in el.props:
        if len(p) == 3:
            bad = np.flatnonzero(rec[p[0] + "__count"] != 3)
            if bad.size:
                raise InputError(source, f"{el.name} row {int(bad[0])}",
                                 f"polygon with {int(rec[p[0] + '__count'][bad[0]])} vertices "
                                 "(only triangles)")
        out[p[0]] = np.array(rec[p[0]])
    return out


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Points (V, 3) float64 and triangles (P, 3) int64 from an ASCII or binary_little_endian PLY.

    Needs a `vertex` element with x, y, z and a `face` element with a list property
    `vertex_indices` (or `vertex_index`) of triangles; other properties and elements are read
    and ignored. Raises InputError naming the file on anything malformed.
    """
    source = os.fspath(path)
    try:
        fh = open(source, "rb")
    except OSError as exc:
        raise InputError(source, None, f"cannot open: {exc.strerror}") from None
    with fh:
        fmt, elements = _parse_header(fh, source)
        data = {}
        for el in elements:
            for prop in el.props:
                if len(prop) != 3:
                    continue
                # lists are read as triangles, so they only make sense on faces
                if el.name != "face":
                    raise InputError(source, el.name,
                                     "list properties are only supported on 'face'")
                if prop[2][0] not in "iu":
                    raise InputError(source, f"face {prop[0]}",
                                     f"vertex indices must be integers, not {prop[2]}")
            data[el.name] = (_read_ascii(fh, el, source) if fmt == "ascii"
                             else _read_binary(fh, el, source))
        if fmt == "ascii" and fh.read().strip():
            raise InputError(source, None, "unexpected data after the last element")
    if "vertex" not in data:
        raise InputError(source, "vertex", "no 'vertex' element")
    v = data["vertex"]
    missing = [c for c in "xyz" if c not in v]
    if missing:
        raise InputError(source, "vertex", f"missing properties {missing}")
    points = np.column_stack([np.asarray(v[c], dtype=np.float64).reshape(-1) for c in "xyz"])
    if not np.all(np.isfinite(points)):
        raise InputError(source, "vertex", "non-finite coordinates")
    f = data.get("face", {})
    key = next((k for k in ("vertex_indices", "vertex_index") if k in f), None)
    if key is None:
        if any(el.name == "face" and el.count for el in elements):
            raise InputError(source, "face", "no 'vertex_indices' list property")
        tris = np.zeros((0, 3), dtype=np.int64)
    else:
        tris = np.asarray(f[key], dtype=np.int64).reshape(-1, 3)
    if tris.size and (tris.min() < 0 or tris.max() >= points.shape[0]):
        raise InputError(source, "face", f"vertex index outside 0..{points.shape[0] - 1}")
    return points, tris

