"""Tests of interface extraction (spinverse_fem.evaluation.interface) and PLY input/output
(spinverse_fem.io.ply)."""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from spinverse_fem.errors import InputError
from spinverse_fem.evaluation.interface import extract_interface
from spinverse_fem.evaluation.metrics import chamfer_l2
from spinverse_fem.io.ply import read_ply, write_ply
from spinverse_fem.meshes.paper import paper_meshes_dir

MESH_DIR = str(paper_meshes_dir())
FILES = sorted(glob.glob(f"{MESH_DIR}/*.npz"))


def _ground_truth(path):
    d = np.load(path)
    points = d["points"].T.astype(np.float64)
    faces = d["facets"].T.astype(np.int64)
    keyed = {tuple(t) for t in np.sort(d["boundary_faces"].T, axis=1)}
    mask = np.array([tuple(f) in keyed for f in np.sort(faces, axis=1)])
    return points, faces, mask


def test_extract_interface():
    """kappa < threshold, strictly, restricted to active faces (definition in paper_setup.md)."""
    kappa = np.array([0.01, 0.999, 1.0, 100.0, 0.5])
    assert extract_interface(kappa).tolist() == [True, True, False, False, True]
    assert extract_interface(kappa, 0.1).tolist() == [True, False, False, False, False]
    active = np.array([True, True, True, True, False])
    assert extract_interface(kappa, active=active).tolist() == [True, True, False, False, False]
    # the paper's ground-truth field maps back to its membrane
    points, faces, mask = _ground_truth(FILES[5])
    assert np.array_equal(extract_interface(np.where(mask, 0.01, 100.0)), mask)
    with pytest.raises(ValueError, match="non-finite"):
        extract_interface(np.array([np.nan]))
    with pytest.raises(ValueError, match="active"):
        extract_interface(kappa, active=np.ones(3, bool))


def test_round_trip_keeps_only_used_vertices(tmp_path):
    """Write then read: the same triangles by coordinates (exactly), only used vertices kept,
    and no temporary file left behind (atomic write)."""
    points, faces, mask = _ground_truth(FILES[19])
    points = points + np.array([1e-7, np.pi, -1 / 3])  # digits that need full precision
    tris = faces[mask]
    path = tmp_path / "torus.ply"
    write_ply(path, points, tris)
    p2, t2 = read_ply(path)
    assert p2.shape == (np.unique(tris).size, 3)
    assert t2.dtype == np.int64 and t2.shape == tris.shape
    assert np.array_equal(p2[t2], points[tris])
    assert sorted(os.listdir(tmp_path)) == ["torus.ply"]
    # overwriting an existing file works and replaces it
    write_ply(path, points, tris[:3])
    assert read_ply(path)[1].shape == (3, 3)
    assert sorted(os.listdir(tmp_path)) == ["torus.ply"]


def test_empty_soup_round_trip(tmp_path):
    """An empty interface is a valid PLY with no vertices and no faces."""
    path = tmp_path / "empty.ply"
    write_ply(path, np.zeros((5, 3)), np.zeros((0, 3), int))
    p, t = read_ply(path)
    assert p.shape == (0, 3) and t.shape == (0, 3)


def test_binary_little_endian(tmp_path):
    """A binary_little_endian file built byte by byte here (with an extra vertex property and an
    extra element) reads back to the packed values."""
    pts = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 2.5, 0.0], [0.0, 0.0, -3.25]])
    tris = [(0, 1, 2), (0, 3, 1)]
    header = (b"ply\nformat binary_little_endian 1.0\ncomment hand made\n"
              b"element vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
              b"property uchar red\n"
              b"element face 2\nproperty list uchar int vertex_indices\n"
              b"element extra 1\nproperty double value\nend_header\n")
    body = b"".join(struct.pack("<fffB", *p, 7) for p in pts)
    body += b"".join(struct.pack("<Biii", 3, *t) for t in tris)
    body += struct.pack("<d", 42.0)
    path = tmp_path / "bin.ply"
    path.write_bytes(header + body)
    p, t = read_ply(path)
    np.testing.assert_array_equal(p, pts)
    assert t.tolist() == [list(x) for x in tris]
    # same file cut short
    path.write_bytes(header + body[:-20])
    with pytest.raises(InputError, match="bin.ply"):
        read_ply(path)


def test_ascii_with_crlf_and_comments(tmp_path):
    """Windows line ends, comments and a vertex_index property name are accepted."""
    text = ("ply\r\nformat ascii 1.0\r\ncomment x\r\nelement vertex 3\r\nproperty float x\r\n"
            "property float y\r\nproperty float z\r\nelement face 1\r\n"
            "property list uchar uint vertex_index\r\nend_header\r\n"
            "0 0 0\r\n1 0 0\r\n0 1 0\r\n3 0 2 1\r\n")
    path = tmp_path / "crlf.ply"
    path.write_bytes(text.encode())
    p, t = read_ply(path)
    assert p.shape == (3, 3) and t.tolist() == [[0, 2, 1]]


GOOD_HEAD = ("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
             "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
             "end_header\n")


@pytest.mark.parametrize("text, field", [
    ("solid x\n", None),                                                      # not a PLY
    ("ply\nformat ascii 1.0\nelement vertex 3\n", "header"),                  # no end_header
    ("ply\nformat binary_big_endian 1.0\nend_header\n", "format"),            # unsupported
    (GOOD_HEAD + "0 0 0\n1 0 0\n", "vertex"),                                 # truncated
    (GOOD_HEAD + "0 0 0\n1 0 0\n0 1 0\n", "face"),                            # no faces
    (GOOD_HEAD + "0 0 0\n1 0 0\n0 1 0\n4 0 1 2 0\n", "face"),                 # a quad
    (GOOD_HEAD + "0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "face"),                   # bad index
    (GOOD_HEAD + "0 0 0\n1 a 0\n0 1 0\n3 0 1 2\n", "vertex"),                 # not a number
    (GOOD_HEAD + "0 0 0\n1 0 0 9\n0 1 0\n3 0 1 2\n", "vertex"),               # extra value
    (GOOD_HEAD + "0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n5 5\n", None),                # trailing data
    (GOOD_HEAD.replace("property float z\n", ""), "vertex"),                  # no z
    (GOOD_HEAD.replace("element vertex 3", "element vertex three"), "element"),
    (GOOD_HEAD.replace("list uchar int", "list uchar float") + "0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n",
     "face"),                                                                 # float indices
])
def test_malformed_files_raise_input_error(tmp_path, text, field):
    """Malformed input: InputError whose message names the file (and the field, when known)."""
    path = tmp_path / "bad.ply"
    path.write_text(text)
    with pytest.raises(InputError) as exc:
        read_ply(path)
    assert "bad.ply" in str(exc.value)
    if field is not None:
        assert exc.value.field is not None and field in exc.value.field


def test_missing_file_raises_input_error(tmp_path):
    """A missing file is an InputError naming it."""
    with pytest.raises(InputError, match="nope.ply"):
        read_ply(tmp_path / "nope.ply")


def test_chamfer_from_ply_equals_arrays(tmp_path):
    """CD-L2 of two PLY round-tripped soups equals the CD-L2 of the arrays they came from."""
    points, faces, pred = _ground_truth(FILES[3])
    _, _, ref = _ground_truth(FILES[7])
    write_ply(tmp_path / "pred.ply", points, faces[pred])
    write_ply(tmp_path / "ref.ply", points, faces[ref])
    pp, pt = read_ply(tmp_path / "pred.ply")
    rp, rt = read_ply(tmp_path / "ref.ply")
    direct = chamfer_l2(points[faces[pred]], points[faces[ref]])
    assert direct > 0
    assert chamfer_l2(pp[pt], rp[rt]) == direct


def _package_modules_after(imports: str) -> set[str]:
    """spinverse_fem modules loaded by a fresh interpreter after `imports`."""
    script = (f"import sys\nimport {imports}\n"
              "print(' '.join(m for m in sys.modules if m.startswith('spinverse_fem.')))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


@pytest.mark.serial_only
def test_layers():
    """Reference: the layer rule. spinverse_fem.io may import only errors and config from the
    package; evaluation.interface (above inverse) must not import the io layer."""
    io = ", ".join(f"spinverse_fem.io.{m}" for m in
                   ("atomic", "kappa", "outputs", "plots", "ply", "signals", "targets"))
    outside = {m for m in _package_modules_after(io)
               if not m.startswith(("spinverse_fem.io", "spinverse_fem.errors",
                                    "spinverse_fem.config"))}
    assert outside == set()
    loaded = _package_modules_after("spinverse_fem.evaluation.interface")
    assert not {m for m in loaded if m.startswith("spinverse_fem.io")}
