"""Hostile but fair input (issue 11), run as a user runs the commands: every case ends in one
message naming the file (or option) and the field, exit code 2, no traceback, no output file
and no input destroyed; no MPI rank is left waiting (mpiexec under a timeout).

Reference for every case: the project's rule for bad input (README, "Commands"): one message
naming file and field, exit code 2, no output file.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import meshio
import numpy as np
import pytest
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plane_box.toml"
BIN = Path(sys.executable).parent
# the commands are run as subprocesses (some under their own mpiexec): not under the suite's
# mpiexec; the unit tests of io.paths at the end run under it too
serial = pytest.mark.serial_only

SMALL = EXAMPLE.read_text().replace("cells = [20, 4, 4]", "cells = [10, 2, 2]")
# an inversion of a few seconds: few modes, two Adam iterations, a checkpoint after each
QUICK_INVERSION = (SMALL.replace("length_scale_um = 1.0", "length_scale_um = 1.0\nmax_modes = 20")
                   + "[inversion]\noptimizer = \"adam\"\niterations_per_stage = 2\n"
                   "checkpoint_every = 1\n")


def write_config(folder: Path, text: str = SMALL, name: str = "case.toml", **replace) -> Path:
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / name
    path.write_text(text)
    return path


def assert_refused(r, *words):
    """Exit code 2, one line on stderr containing every word, no traceback."""
    assert r.returncode != 124, f"timed out (a hang)\n{r.stdout}\n{r.stderr}"
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("spinverse: error: "), err
    for w in words:
        assert str(w) in err, (w, err)


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    """A valid signal table of SMALL (written by `spinverse simulate`)."""
    d = tmp_path_factory.mktemp("signals")
    cfg = write_config(d)
    out = d / "signals.h5"
    r = run_cli(["simulate", cfg, "--out", out])
    assert r.returncode == 0, r.stderr
    return out


def kappa_file(folder: Path, cfg_text: str, values) -> Path:
    """A kappa file on the grid of cfg_text: values(phantom) -> kappa (F,)."""
    from spinverse_fem.config import parse_config
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.io.kappa import write_kappa

    ph = build_phantom(parse_config(cfg_text, source=str(folder / "k.toml")))
    path = folder / "kappa.h5"
    write_kappa(path, values(ph), ph.faces.faces, ph.grid.points)
    return path


# -- 1. an output that is an input ---------------------------------------------------------------

@serial
@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
def test_simulate_refuses_to_overwrite_its_config(tmp_path, how):
    cfg = write_config(tmp_path)
    before = cfg.read_bytes()
    if how == "same path":
        args = [cfg, "--out", cfg]
    elif how == "other spelling":
        (tmp_path / "sub").mkdir()
        args = [cfg, "--out", tmp_path / "sub" / ".." / cfg.name]
    elif how == "symlink":
        (tmp_path / "link.toml").symlink_to(cfg)
        args = [tmp_path / "link.toml", "--out", cfg]
    else:
        os.link(cfg, tmp_path / "hard.h5")
        args = [cfg, "--out", tmp_path / "hard.h5"]
    r = run_cli(["simulate", *args])
    assert_refused(r, "--out", "same file as the configuration")
    assert cfg.read_bytes() == before
    assert not list(tmp_path.glob("*_decay.png")) and not list(tmp_path.glob(".*.tmp"))


@serial
def test_simulate_refuses_to_overwrite_a_file_the_config_reads(tmp_path):
    """The grid file named by grid.path is an input too."""
    from spinverse_fem.meshes.box import box_grid

    g = box_grid((0, 0, 0), (10, 10, 10), (2, 2, 2))
    msh = tmp_path / "grid.msh"
    meshio.write(str(msh), meshio.Mesh(g.points, [("tetra", g.tets)]), file_format="gmsh22",
                 binary=False)
    before = msh.read_bytes()
    cfg = write_config(tmp_path, SMALL.split("[geometry]")[0].replace(
        SMALL.split("[geometry]")[0].split("[grid]")[1], f'\nkind = "file"\npath = "{msh}"\n')
        + "[geometry]\nkind = \"none\"\n[permeability]" + SMALL.split("[permeability]")[1])
    r = run_cli(["simulate", cfg, "--out", msh])
    assert_refused(r, "grid.msh", "--out", "grid.path")
    assert msh.read_bytes() == before


@serial
def test_invert_refuses_an_output_folder_that_would_replace_its_target(tmp_path, signals):
    out = tmp_path / "run"
    out.mkdir()
    target = out / "result.h5"
    shutil.copy(signals, target)
    before = target.read_bytes()
    r = run_cli(["invert", "--config", write_config(tmp_path, QUICK_INVERSION), "--target",
                 target, "--out", out])
    assert_refused(r, "result.h5", "--out", "same file as the target")
    assert target.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["result.h5"]


@serial
def test_evaluate_refuses_to_overwrite_its_result(tmp_path):
    kappa = kappa_file(tmp_path, SMALL, lambda ph: np.full(ph.faces.num_faces, 5.0))
    before = kappa.read_bytes()
    r = run_cli(["evaluate", write_config(tmp_path), kappa, "--out", kappa])
    assert_refused(r, "kappa.h5", "--out", "same file as the result")
    assert kappa.read_bytes() == before


# -- 2. evaluate --threshold ---------------------------------------------------------------------

@serial
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_evaluate_refuses_a_threshold_that_is_not_positive(tmp_path, value):
    kappa = kappa_file(tmp_path, SMALL, lambda ph: np.full(ph.faces.num_faces, 5.0))
    out = tmp_path / "m.json"
    r = run_cli(["evaluate", write_config(tmp_path), kappa, f"--threshold={value}", "--out", out])
    assert_refused(r, "--threshold", "positive")
    assert not out.exists()


@serial
def test_evaluate_honours_a_small_threshold(tmp_path):
    """kappa 0.5 on every face: the config's threshold (1 um/ms) takes every active face, a
    threshold of 0.25 none; the threshold used is reported."""
    kappa = kappa_file(tmp_path, SMALL, lambda ph: np.full(ph.faces.num_faces, 0.5))
    cfg = write_config(tmp_path)
    default = run_cli(["evaluate", cfg, kappa])
    small = run_cli(["evaluate", cfg, kappa, "--threshold", "0.25", "--out", tmp_path / "m.json"])
    assert default.returncode == 0 and small.returncode == 0, small.stderr
    d, s = json.loads(default.stdout), json.loads(small.stdout)
    assert d["threshold_um_per_ms"] == 1.0 and d["interface_faces"] > 0
    assert s["threshold_um_per_ms"] == 0.25 and s["interface_faces"] == 0
    assert json.loads((tmp_path / "m.json").read_text()) == s


# -- 3. meshes -----------------------------------------------------------------------------------

def file_grid_config(folder: Path, msh: Path) -> Path:
    head = SMALL.split("[geometry]")[0]
    grid = head.split("[grid]")[1]
    return write_config(folder, head.replace(grid, f'\nkind = "file"\npath = "{msh}"\n')
                        + "[geometry]\nkind = \"none\"\n[permeability]"
                        + SMALL.split("[permeability]")[1])


@serial
def test_hexahedron_among_tetrahedra_is_refused(tmp_path):
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1],
                    [2, 0, 0], [3, 0, 0], [3, 1, 0], [2, 1, 0],
                    [2, 0, 1], [3, 0, 1], [3, 1, 1], [2, 1, 1]], dtype=float)
    msh = tmp_path / "mixed.msh"
    meshio.write(str(msh), meshio.Mesh(pts, [("tetra", np.array([[0, 1, 2, 3], [1, 2, 3, 4]])),
                                             ("hexahedron", np.arange(5, 13)[None])]),
                 file_format="gmsh22", binary=False)
    out = tmp_path / "s.h5"
    r = run_cli(["simulate", file_grid_config(tmp_path, msh), "--out", out])
    assert_refused(r, "mixed.msh", "cells", "1 hexahedron")
    assert not out.exists()


@pytest.mark.parametrize("content, words", [
    (b"garbage\x00\x01 not a mesh\n", "cannot read as gmsh"),
    (b"$MeshFormat\n2.2 0 8\n$EndMeshFormat\n$Nodes\n3\n1 0 0\n$EndNodes\n",
     "cannot read as gmsh"),
    (b"", "cannot read as gmsh"),
    (b"$MeshFormat\n2.2 0 8\n", "no tetrahedra"),
])
@serial
def test_garbage_msh_is_refused(tmp_path, content, words):
    """meshio.read prints and calls sys.exit(1) on the first one."""
    msh = tmp_path / "garbage.msh"
    msh.write_bytes(content)
    out = tmp_path / "s.h5"
    r = run_cli(["simulate", file_grid_config(tmp_path, msh), "--out", out])
    assert_refused(r, "garbage.msh", words)
    assert r.stdout.strip() == ""
    assert not out.exists()


# -- 4. one run per output folder ----------------------------------------------------------------

@serial
def test_second_run_into_a_locked_folder_is_refused(tmp_path):
    """The lock is held by this (live) process, as a first run would hold it."""
    from spinverse_fem.io.paths import OutputLock

    out = tmp_path / "run"
    cfg = write_config(tmp_path, QUICK_INVERSION)
    out.mkdir()
    with OutputLock(out):
        r = run_cli(["invert", "--config", cfg, "--out", out], timeout=120)
        assert_refused(r, "run", "--out", "another run", f"PID {os.getpid()}", ".lock")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert list(out.iterdir()) == []


@serial
def test_stale_lock_and_temp_files_of_a_killed_run_are_taken_over(tmp_path):
    """A lock file whose run is gone (no flock held) and the temporary files of an interrupted
    atomic write: the next run takes the lock over with a note, removes the temporary files,
    completes, and releases the lock."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999999 somehost\n")
    stale = [out / ".result.h5.0123456789abcdef.tmp", out / ".checkpoint.h5.fedcba9876543210.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    keep = out / "notes.txt"
    keep.write_text("mine")
    r = run_cli(["invert", "--config", write_config(tmp_path, QUICK_INVERSION), "--out", out],
                timeout=300)
    assert r.returncode == 0, r.stderr
    assert "took over the lock" in r.stdout and "PID 999999999" in r.stdout
    assert "removed 2 temporary file(s)" in r.stdout
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert not (out / ".lock").exists()
    assert (out / "result.h5").is_file() and (out / "checkpoint.h5").is_file()


# -- 5. output paths under MPI -------------------------------------------------------------------

@pytest.mark.parametrize("case, words", [
    ("file in the way", ["afile", "--out", "is a file, not a folder"]),
    ("empty", ["--out", "empty path"]),
    ("under a file", ["afile/sub", "--out", "afile is a file"]),
])
@serial
def test_invert_output_folder_problems_under_mpi(tmp_path, case, words):
    """Rank 0 checks, every rank raises the same error: no rank hangs (was: rank 1 waited
    forever after rank 0 failed in mkdir)."""
    (tmp_path / "afile").write_text("in the way")
    out = {"file in the way": "afile", "empty": "", "under a file": "afile/sub"}[case]
    cfg = write_config(tmp_path, QUICK_INVERSION)
    r = subprocess.run(["timeout", "120", str(BIN / "mpiexec"), "-n", "2",
                        str(BIN / "spinverse"), "invert", "--config", str(cfg), "--out", out],
                       capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_refused(r, *words)
    assert (tmp_path / "afile").read_text() == "in the way"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "case.toml"]


@serial
def test_simulate_output_that_is_a_folder_under_mpi(tmp_path):
    (tmp_path / "results").mkdir()
    r = run_cli(["simulate", write_config(tmp_path), "--out", tmp_path / "results"], timeout=120,
                mpi=2)
    assert_refused(r, "results", "--out", "is a folder; a file name is expected")
    assert list((tmp_path / "results").iterdir()) == []


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only bind mount (we run as root, so permission bits would not stop a write)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True)
    if r.returncode != 0:
        if os.geteuid() != 0:
            os.chmod(src, 0o555)
            yield src
            os.chmod(src, 0o755)
            return
        pytest.skip("root without mount privileges: no read-only folder can be made")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@serial
def test_unwritable_output_folder_under_mpi(tmp_path, read_only_folder):
    cfg = write_config(tmp_path, QUICK_INVERSION)
    r = run_cli(["invert", "--config", cfg, "--out", read_only_folder / "run"], timeout=120,
                mpi=2)
    assert_refused(r, "run", "--out", "not writable")
    r = run_cli(["simulate", cfg, "--out", read_only_folder / "s.h5"], timeout=120)
    assert_refused(r, "s.h5", "--out", "not writable")


@serial
def test_full_disk_leaves_no_file(tmp_path):
    """A 16 kB tmpfs: the signal table does not fit; one message, no temporary file (HDF5 used
    to fail in its close with a cascade of errors and a segmentation fault)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        r = run_cli(["simulate", write_config(tmp_path), "--out", disk / "s.h5"], timeout=120)
        assert_refused(r, "s.h5", "--out", "No space left on device")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- 6. sizes that cannot fit --------------------------------------------------------------------

GRID_BOX = "cells = [10, 2, 2]"


@pytest.mark.parametrize("replace, words", [
    ({"directions = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]]": "fibonacci = 10000000"},
     ["sequence[0].fibonacci", "10000000 measurements", "at most 100000"]),
    ({'kind = "box"\nlower_um = [0.0, 0.0, 0.0]\nupper_um = [10.0, 10.0, 10.0]\n' + GRID_BOX:
      'kind = "bcc"\ncubes = 10000\ncube_um = 1.0'},
     ["grid.cubes", "1.2e+13 tetrahedra", "at most 2e+06"]),
    ({GRID_BOX: "cells = [100000, 100000, 100000]"}, ["grid.cells", "6e+15 tetrahedra"]),
    ({"length_scale_um = 1.0": "length_scale_um = 1.0\n[target]\ngrid_refinement = 1000"},
     ["target.grid_refinement", "refined 1000 times", "at most 2e+06"]),
])
@serial
def test_absurd_sizes_are_refused_up_front(tmp_path, replace, words):
    out = tmp_path / "s.h5"
    r = run_cli(["simulate", write_config(tmp_path, **replace), "--out", out], timeout=60)
    assert_refused(r, "case.toml", *words)
    assert not out.exists()


# -- 7. what used to end in a traceback ----------------------------------------------------------

@serial
def test_config_that_is_not_utf8_text(tmp_path):
    for name, data in {"latin1.toml": SMALL.replace("plane", "plane # caf\u00e9").encode("latin-1"),
                       "binary.toml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}.items():
        cfg = tmp_path / name
        cfg.write_bytes(data)
        r = run_cli(["simulate", cfg, "--out", tmp_path / "s.h5"])
        assert_refused(r, name, "line ", "not UTF-8")
    assert not (tmp_path / "s.h5").exists()


@serial
def test_camino_file_that_is_binary(tmp_path):
    scheme = tmp_path / "proto.scheme"
    scheme.write_bytes(b"VERSION: STEJSKALTANNER\n\xff\xfe\x00\x01")
    seq = SMALL[SMALL.index("[[sequence]]"):]
    cfg = write_config(tmp_path, SMALL.replace(seq, f'[[sequence]]\ntype = "camino"\n'
                                               f'file = "{scheme.name}"\n'))
    r = run_cli(["simulate", cfg, "--out", tmp_path / "s.h5"])
    assert_refused(r, "proto.scheme", "line 2", "not UTF-8")


@serial
def test_empty_sequence_list(tmp_path):
    cfg = write_config(tmp_path, "sequence = []\n" + SMALL[:SMALL.index("[[sequence]]")])
    r = run_cli(["simulate", cfg, "--out", tmp_path / "s.h5"])
    assert_refused(r, "case.toml", "sequence", "at least one [[sequence]]")


@serial
def test_unknown_optimiser_is_refused_at_load_time(tmp_path):
    cfg = write_config(tmp_path, QUICK_INVERSION.replace('optimizer = "adam"',
                                                         'optimizer = "nosuchtao"'))
    r = run_cli(["invert", "--config", cfg, "--out", tmp_path / "run"])
    assert_refused(r, "case.toml", "inversion.optimizer", "nosuchtao", "blmvm")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("replace, field", [
    ({"open_um_per_ms = 1.0e4": "open_um_per_ms = 1e300"}, "permeability.open_um_per_ms"),
    ({"barrier_um_per_ms = 0.1": "barrier_um_per_ms = 1e300"}, "permeability.barrier_um_per_ms"),
    ({"length_scale_um = 1.0": "length_scale_um = 1.0\n[inversion]\nkappa_max_um_per_ms = 1e300"
      "\nstart_um_per_ms = 1e300"}, "inversion.kappa_max_um_per_ms"),
])
@serial
def test_non_physical_permeability_in_the_config(tmp_path, replace, field):
    r = run_cli(["simulate", write_config(tmp_path, **replace), "--out", tmp_path / "s.h5"])
    assert_refused(r, "case.toml", field, "not a physical permeability", "1e+06")
    assert not (tmp_path / "s.h5").exists()


@serial
def test_non_physical_permeability_in_a_kappa_file(tmp_path):
    kappa = kappa_file(tmp_path, SMALL, lambda ph: np.full(ph.faces.num_faces, 1e300))
    r = run_cli(["evaluate", write_config(tmp_path), kappa, "--out", tmp_path / "m.json"])
    assert_refused(r, "kappa.h5", "kappa_um_per_ms", "1e+06")
    assert not (tmp_path / "m.json").exists()


def _rewrite(path: Path, key: str, value=None, attr: bool = False, group: bool = False):
    with h5py.File(path, "r+") as f:
        if attr:
            f.attrs[key] = value
            return
        del f[key]
        if group:
            f.create_group(key)
        else:
            f[key] = value


@pytest.mark.parametrize("edit, field, words", [
    (dict(key="signal_real", group=True), "signal_real", "is a group, not a dataset"),
    (dict(key="signal_real", value=np.zeros((12, 2))), "signal_real", "has shape (12, 2)"),
    (dict(key="signal_real", value=1.0), "signal_real", "has shape ()"),
    (dict(key="direction", value=np.zeros(12)), "direction", "expected (12, 3)"),
    (dict(key="sequence_index", value=np.array([b"a"] * 12)), "sequence_index",
     "must hold real numbers"),
    (dict(key="sequence_index", value=np.full(12, 0.5)), "sequence_index", "integers"),
    (dict(key="sequence_names", value="not json", attr=True), "sequence_names",
     "JSON list of strings"),
    (dict(key="sequence_names", value='{"a": 1}', attr=True), "sequence_names",
     "JSON list of strings"),
])
@serial
def test_malformed_target_file(tmp_path, signals, edit, field, words):
    target = tmp_path / "target.h5"
    shutil.copy(signals, target)
    _rewrite(target, **edit)
    out = tmp_path / "run"
    r = run_cli(["invert", "--config", write_config(tmp_path, QUICK_INVERSION), "--target",
                 target, "--out", out])
    assert_refused(r, "target.h5", f": {field}:", words)
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished quick inversion (its checkpoint.h5 is the reference for the damaged ones)."""
    d = tmp_path_factory.mktemp("run")
    cfg = write_config(d, QUICK_INVERSION)
    r = run_cli(["invert", "--config", cfg, "--out", d / "out"], timeout=300)
    assert r.returncode == 0, r.stderr
    return cfg, d / "out"


@pytest.mark.parametrize("damage, words", [
    ("truncated", ["checkpoint.h5", "cannot read checkpoint"]),
    ("garbage", ["checkpoint.h5", "cannot read checkpoint"]),
    ("no x", ["checkpoint.h5: x: missing"]),
    ("no history", ["checkpoint.h5: history/misfit: missing"]),
    ("x of strings", ["checkpoint.h5: x: cannot be read"]),
    ("short x", ["checkpoint.h5: x: has 3 values"]),
])
@serial
def test_damaged_checkpoint_on_resume(tmp_path, finished_run, damage, words):
    cfg, ref = finished_run
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "checkpoint.h5"
    shutil.copy(ref / "checkpoint.h5", ckpt)
    if damage == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00" * 4096)
    else:
        with h5py.File(ckpt, "r+") as f:
            if damage == "no x":
                del f["x"]
            elif damage == "no history":
                del f["history/misfit"]
            elif damage == "x of strings":
                del f["x"]
                f["x"] = np.array([b"a", b"b"])
            else:
                del f["x"]
                f["x"] = np.zeros(3)
    before = ckpt.read_bytes()
    r = run_cli(["invert", "--config", cfg, "--out", out, "--resume"], timeout=300)
    assert_refused(r, *words)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.h5"]


@serial
def test_bad_petsc_option_values(tmp_path):
    """An unknown solver type is refused before any solve, naming the option; a bad value found
    inside a solver (PETSc.Error, reported by petsc4py as a SystemError) names the options
    prefix; the same under two ranks."""
    cfg = write_config(tmp_path)
    out = tmp_path / "s.h5"
    r = run_cli(["simulate", cfg, "--out", out, "-spinverse_eps_type", "nosuch"])
    assert_refused(r, "-spinverse_eps_type", "unknown EPS type 'nosuch'", "krylovschur")
    r = run_cli(["simulate", cfg, "--out", out, "-spinverse_eps_tol", "abc"], mpi=2,
                timeout=120)
    assert_refused(r, "PETSc error code", "EPSSetFromOptions", "abc", "prefix spinverse_",
                   "-spinverse_eps_tol abc")
    assert "/" not in r.stderr.split("(PETSc options")[0], "no source paths"
    assert not out.exists()


@serial
def test_ncv_without_mpd_is_completed(tmp_path):
    """-spinverse_eps_ncv alone: SLEPc needs ncv <= nev + mpd while the eigenbasis sets mpd for
    its own ncv (77 modes wanted here: mpd 77, so ncv 200 failed); mpd = ncv is added."""
    out = tmp_path / "s.h5"
    r = run_cli(["simulate", write_config(tmp_path), "--out", out, "-spinverse_eps_ncv", "200"])
    assert r.returncode == 0, r.stderr
    assert out.is_file()


@serial
def test_help_says_where_petsc_options_go():
    for command in ("simulate", "objective", "taylor", "invert"):
        r = run_cli([command, "--help"])
        assert r.returncode == 0
        assert "-spinverse_eps_" in r.stdout and "-spinverse_tao_" in r.stdout, command
        assert "-spinverse_eps_mpd" in r.stdout


# -- 8. / 10. temporary files and file modes of simulate -----------------------------------------

@serial
def test_simulate_removes_stale_temp_files_and_uses_the_umask(tmp_path):
    out = tmp_path / "o" / "signals.h5"
    out.parent.mkdir()
    stale = [out.parent / ".signals.h5.0123456789abcdef.tmp",
             out.parent / ".signals_decay.png.00112233445566ff.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    other = out.parent / ".other.h5.0123456789abcdef.tmp"
    other.write_bytes(b"someone else's")
    cmd = f"umask 027 && exec {BIN / 'spinverse'} simulate {write_config(tmp_path)} --out {out}"
    r = subprocess.run(["timeout", "300", "sh", "-c", cmd], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "removed 2 temporary file(s)" in r.stdout
    assert not any(p.exists() for p in stale) and other.exists()
    for p in (out, out.with_name("signals_decay.png")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


# -- 9. evaluate without a ground truth ----------------------------------------------------------

@serial
def test_evaluate_without_ground_truth_reports_truth_free_metrics(tmp_path):
    """Reference: the plane x = 4 um as the prediction (kappa 0.1 on its faces, 10 elsewhere) on
    a box with neumann outer faces: an open sheet spanning the box, so no edge is a branch,
    its boundary edges are open, and it splits the box into two sealed compartments."""
    text = SMALL.replace('kind = "plane"\naxis = "x"\nposition_um = 4.0', 'kind = "none"')
    cfg = write_config(tmp_path, text)

    def plane(ph):
        x = ph.grid.points[ph.faces.faces][:, :, 0]
        return np.where(np.all(np.isclose(x, 4.0), axis=1), 0.1, 10.0)

    kappa = kappa_file(tmp_path, text, plane)
    r = run_cli(["evaluate", cfg, kappa])
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["ground_truth"] is False and "cd_l2" not in m and "iou" not in m
    assert m["interface_faces"] == 8  # the 2 x 2 squares of the plane, 2 triangles each
    assert m["branch_pct"] == 0.0 and m["open_pct"] > 0
    assert m["pred_sealed_compartments"] == 2
    assert sum(m["pred_sealed_compartment_tets"]) == 240


# -- io.paths: the same verdict on every rank (run serially and under the suite's mpiexec) -------

def _shared_folder(comm, tmp_path) -> Path:
    """Rank 0's tmp_path on every rank (pytest gives each process its own)."""
    return Path(comm.bcast(str(tmp_path), root=0))


def test_check_outputs_raises_the_same_error_on_every_rank(comm, tmp_path):
    from spinverse_fem.errors import InputError
    from spinverse_fem.io.paths import Output, check_outputs

    folder = _shared_folder(comm, tmp_path)
    if comm.rank == 0:
        (folder / "afile").write_text("x")
        (folder / "in.toml").write_text("x")
    comm.Barrier()
    cases = [
        ([Output(folder / "afile" / "sub", kind="dir")], [], "afile is a file"),
        ([Output(folder / "afile", kind="dir")], [], "is a file, not a folder"),
        ([Output("", kind="dir")], [], "empty path"),
        ([folder], [], "is a folder"),
        ([folder / "in.toml"], [("configuration", folder / "in.toml")],
         "same file as the configuration"),
        ([Output(folder / "run", kind="dir", files=("result.h5",))],
         [("target", folder / "run" / "result.h5")], "same file as the target"),
    ]
    for outputs, inputs, words in cases:
        with pytest.raises(InputError, match=words) as e:
            check_outputs(outputs, inputs, comm)
        assert e.value.field == "--out"
        messages = comm.allgather(str(e.value))
        assert len(set(messages)) == 1
    # a good folder is created once, by rank 0, and reported on every rank
    created = check_outputs([Output(folder / "new" / "run", kind="dir")], [], comm, create=True)
    assert created == [folder / "new" / "run"] and (folder / "new" / "run").is_dir()


def test_on_root_shares_rank_0s_outcome(comm):
    from spinverse_fem.errors import InputError
    from spinverse_fem.io.paths import on_root

    assert on_root(comm, lambda: comm.rank * 10 + 7) == 7

    def fails():
        raise InputError("f.h5", "x", "bad")

    with pytest.raises(InputError, match="f.h5: x: bad"):
        on_root(comm, fails)

    def crashes():
        raise ZeroDivisionError("boom")

    expected = ZeroDivisionError if comm.rank == 0 else RuntimeError
    with pytest.raises(expected, match="boom"):
        on_root(comm, crashes)


def test_output_lock_is_exclusive_and_released(comm, tmp_path):
    from spinverse_fem.errors import InputError
    from spinverse_fem.io.paths import OutputLock

    folder = _shared_folder(comm, tmp_path) / "run"
    if comm.rank == 0:
        folder.mkdir()
    comm.Barrier()
    with OutputLock(folder, comm) as lock:
        assert lock.note is None
        if comm.rank == 0:
            assert (folder / ".lock").read_text().split()[0] == str(os.getpid())
            with pytest.raises(InputError, match="another run"):
                OutputLock(folder).acquire()   # a second run on this host
        comm.Barrier()
    comm.Barrier()
    assert not (folder / ".lock").exists()
    with OutputLock(folder, comm):   # free again
        pass
