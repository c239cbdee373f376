"""Per-face kappa files (spinverse_fem.io.kappa): round trip and every refusal.

References: the arrays written (round trip is bit-exact), the canonical face table of the grid
(topology.build_face_table, independent of the file) and the issue's list of bad files, each of
which must raise InputError naming the file and the field. Pure file I/O: every MPI rank works
in its own temporary folder.
"""

import h5py
import numpy as np
import pytest

from spinverse_fem.errors import InputError
from spinverse_fem.geometry.topology import build_face_table
from spinverse_fem.io.kappa import read_kappa, write_kappa
from spinverse_fem.meshes.box import box_grid


@pytest.fixture(scope="module")
def grid():
    g = box_grid([0.0, 0.0, 0.0], [4.0, 2.0, 2.0], (2, 1, 1))
    faces = build_face_table(g.tets, g.num_vertices).faces
    return faces, g.points


def _kappa(n, seed=0):
    return np.exp(np.random.default_rng(seed).standard_normal(n))


def _write(path, faces, points, kappa=None, drop=()):
    """A kappa file written with h5py directly (not write_kappa), datasets in `drop` left out."""
    data = dict(kappa_um_per_ms=_kappa(len(faces)) if kappa is None else kappa, faces=faces,
                vertices=points)
    for key in drop:
        data[key] = None
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if value is not None:
                f[key] = value
    return path


def _refused(path, faces, points, field, *words):
    with pytest.raises(InputError) as e:
        read_kappa(path, faces, points)
    msg = str(e.value)
    assert e.value.source == str(path) and e.value.field == field, msg
    assert path.name in msg and (field is None or field in msg), msg
    for w in words:
        assert w in msg, msg
    return msg


def test_round_trip_is_exact(grid, tmp_path):
    """Reference: the written arrays themselves (bit-exact), attributes kept; no temp file."""
    faces, points = grid
    kappa = _kappa(len(faces), seed=3)
    kappa[5] = 0.0                       # impermeable faces are allowed
    path = tmp_path / "sub" / "kappa.h5"
    write_kappa(path, kappa, faces, points, attrs={"note": "test", "iteration": 7})
    out = read_kappa(path, faces, points)
    assert out.dtype == np.float64 and np.array_equal(out, kappa)
    with h5py.File(path) as f:
        assert f.attrs["note"] == "test" and f.attrs["iteration"] == 7
        assert np.array_equal(f["faces"][:], faces)
    assert [p.name for p in path.parent.iterdir()] == ["kappa.h5"]
    # vertices within 1e-6 um are the same grid (e.g. coordinates through a text format)
    assert np.array_equal(read_kappa(path, faces, points + 4e-7), kappa)


def test_failed_write_leaves_no_file(grid, tmp_path):
    """Reference: the atomic-write contract of io.atomic.atomic_h5 (nothing on failure)."""
    faces, points = grid
    path = tmp_path / "kappa.h5"
    with pytest.raises(TypeError):
        write_kappa(path, _kappa(len(faces)), faces, points, attrs={"bad": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        write_kappa(path, _kappa(len(faces) - 1), faces, points)


def test_missing_or_unreadable_file(grid, tmp_path):
    faces, points = grid
    _refused(tmp_path / "none.h5", faces, points, None, "not found")
    bad = tmp_path / "text.h5"
    bad.write_text("kappa = 1\n")
    _refused(bad, faces, points, None, "not an HDF5 file")


@pytest.mark.parametrize("field", ["kappa_um_per_ms", "faces", "vertices"])
def test_missing_dataset(grid, tmp_path, field):
    faces, points = grid
    path = _write(tmp_path / "k.h5", faces, points, drop=(field,))
    _refused(path, faces, points, field, "missing dataset")


def test_kappa_values_refused(grid, tmp_path):
    """Reference: kappa must be one finite, non-negative value per face."""
    faces, points = grid
    n = len(faces)
    k = _kappa(n)
    k[[3, 9]] = -0.5
    _refused(_write(tmp_path / "neg.h5", faces, points, k), faces, points, "kappa_um_per_ms",
             "2 negative", "face 3")
    k = _kappa(n)
    k[4] = np.nan
    _refused(_write(tmp_path / "nan.h5", faces, points, k), faces, points, "kappa_um_per_ms",
             "non-finite")
    k = _kappa(n)
    k[0] = np.inf
    _refused(_write(tmp_path / "inf.h5", faces, points, k), faces, points, "kappa_um_per_ms",
             "non-finite")
    _refused(_write(tmp_path / "short.h5", faces, points, _kappa(n - 1)), faces, points,
             "kappa_um_per_ms", f"({n},)")
    _refused(_write(tmp_path / "2d.h5", faces, points, _kappa(n).reshape(n, 1)), faces, points,
             "kappa_um_per_ms", "shape")
    # issue 11: kappa = 1e300 everywhere is not a permeability (bound: config.schema)
    _refused(_write(tmp_path / "huge.h5", faces, points, np.full(n, 1e300)), faces, points,
             "kappa_um_per_ms", f"{n} values above 1e+06 um/ms", "face 0")
    k = _kappa(n)
    k[2] = 1e6
    assert np.array_equal(read_kappa(_write(tmp_path / "edge.h5", faces, points, k), faces,
                                     points), k)


def test_other_grid_refused(grid, tmp_path):
    """Reference: a file written for a different grid (another box, moved vertices, other
    faces, other face order) must not be mapped onto this grid's faces."""
    faces, points = grid
    g2 = box_grid([0.0, 0.0, 0.0], [4.0, 2.0, 2.0], (3, 1, 1))
    f2 = build_face_table(g2.tets, g2.num_vertices).faces
    _refused(_write(tmp_path / "g2.h5", f2, g2.points, _kappa(len(f2))), faces, points,
             "vertices", "shape")
    moved = points.copy()
    moved[2, 1] += 1e-5
    _refused(_write(tmp_path / "moved.h5", faces, moved), faces, points, "vertices",
             "1 vertices differ", "1e-06 um")

    # same vertices, different triangulation: the grid's tets mirrored in x (x -> 4 - x), in
    # the original vertex numbering (the 6-tet cube split is not mirror-symmetric)
    index = {tuple(np.round(p, 9)): i for i, p in enumerate(points)}
    mirror = np.array([index[tuple(np.round([4.0 - p[0], p[1], p[2]], 9))] for p in points])
    tets = mirror[box_grid([0.0, 0.0, 0.0], [4.0, 2.0, 2.0], (2, 1, 1)).tets]
    f3 = build_face_table(tets, len(points)).faces
    assert {tuple(r) for r in f3.tolist()} != {tuple(r) for r in faces.tolist()}
    msg = _refused(_write(tmp_path / "f3.h5", f3, points, _kappa(len(f3))), faces, points,
                   "faces")
    set_f = {tuple(r) for r in faces.tolist()}
    set_3 = {tuple(r) for r in f3.tolist()}
    assert f"{len(set_f - set_3)} grid faces are absent" in msg
    assert f"{len(set_3 - set_f)} file faces are not grid faces" in msg

    swapped = faces.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    _refused(_write(tmp_path / "order.h5", swapped, points), faces, points, "faces",
             "2 rows are not in the canonical order")
    _refused(_write(tmp_path / "shape.h5", faces[:, :2], points), faces, points, "faces",
             "shape")
    _refused(_write(tmp_path / "float.h5", faces.astype(float), points), faces, points,
             "faces", "integer")


# -- signal tables (io.signals.read_signal_table) ----------------------------------------------

def _table(path, n=4, **replace):
    """A valid 4-row signal table written with h5py; `replace` overrides datasets (None drops,
    an h5py.Group marker "GROUP" makes a group) and the sequence_names attribute."""
    data = dict(signal_real=np.linspace(1, 0.5, n), signal_imag=np.zeros(n),
                b_s_per_mm2=np.linspace(0, 1000, n), direction=np.tile([1.0, 0, 0], (n, 1)),
                sequence_index=np.zeros(n, dtype=np.int64))
    names = replace.pop("sequence_names", '["a"]')
    data.update(replace)
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if isinstance(value, str) and value == "GROUP":
                f.create_group(key)
            elif value is not None:
                f[key] = value
        if names is not None:
            f.attrs["sequence_names"] = names
    return path


@pytest.mark.parametrize("replace, field, words", [
    (dict(signal_real="GROUP"), "signal_real", "is a group, not a dataset"),
    (dict(signal_imag="GROUP"), "signal_imag", "is a group"),
    (dict(signal_real=np.zeros((4, 2))), "signal_real", "has shape (4, 2)"),
    (dict(signal_real=np.float64(1.0)), "signal_real", "has shape ()"),
    (dict(signal_imag=np.zeros(3)), "signal_imag", "has shape (3,), expected (4,)"),
    (dict(direction=np.zeros(4)), "direction", "expected (4, 3)"),
    (dict(b_s_per_mm2=np.array([b"x"] * 4)), "b_s_per_mm2", "must hold real numbers"),
    (dict(sequence_index=np.array([b"0"] * 4)), "sequence_index", "must hold real numbers"),
    (dict(sequence_index=np.array([0, 0, -1, 0])), "sequence_index", "non-negative integers"),
    (dict(sequence_index=np.array([0, 0, 1, 1])), "sequence_names", "names 1 sequences"),
    (dict(signal_real=np.array([1.0, np.nan, 1, 1])), "signal_real", "non-finite"),
    (dict(signal_imag=np.array([0.0, np.inf, 0, 0])), "signal_imag", "non-finite"),
    (dict(delta_ms=np.zeros(5)), "delta_ms", "has shape (5,)"),
    (dict(sequence_names="not json"), "sequence_names", "JSON list of strings"),
    (dict(sequence_names='["a", 3]'), "sequence_names", "JSON list of strings"),
    (dict(sequence_names='{"a": 1}'), "sequence_names", "JSON list of strings"),
    (dict(signal_real=None), "signal_real", "missing dataset"),
])
def test_malformed_signal_table(tmp_path, replace, field, words):
    """Reference: the field that is wrong, named as such (a group where signal_real should be
    used to be reported as signal_imag)."""
    from spinverse_fem.io.signals import read_signal_table

    path = _table(tmp_path / "t.h5", **replace)
    with pytest.raises(InputError) as e:
        read_signal_table(path)
    assert e.value.source == str(path) and e.value.field == field, str(e.value)
    assert words in str(e.value), str(e.value)


def test_valid_signal_table_reads(tmp_path):
    from spinverse_fem.io.signals import read_signal_table

    t = read_signal_table(_table(tmp_path / "t.h5", sequence_names=None))
    assert t.num_rows == 4 and t.sequence_names == () and t.sequence_index.dtype == np.int64
    t = read_signal_table(_table(tmp_path / "u.h5", sequence_index=np.zeros(4)))
    assert np.array_equal(t.sequence_index, np.zeros(4, dtype=np.int64))
