"""Atomic file writes (spinverse_fem.io.atomic): all-or-nothing, umask, stale temporary files.

References: the target's previous bytes (a failed write must leave them untouched), the folder
listing before the write (no file may be left behind), the process umask (the mode a plain
open() gives), and RFC 8259 (JSON has no NaN or Infinity tokens). Pure file I/O: every MPI rank
works in its own temporary folder.
"""

import json
import os
import re
import stat
import subprocess
import sys

import h5py
import numpy as np
import pytest

from spinverse_fem.io import atomic
from spinverse_fem.io.atomic import (
    atomic_h5,
    atomic_path,
    remove_stale_temp_files,
    save_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)

OLD = b"old content\n"


class Boom(Exception):
    """The failure a test raises on purpose."""


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.0, 2.0))
    ax.plot([0.0, 1.0], [1.0, 0.0])
    return plt, fig


def _h5(path):
    with atomic_h5(path) as f:
        f["x"] = np.arange(3.0)


def _fig(path):
    plt, fig = _figure()
    try:
        save_figure_atomic(fig, path, dpi=20)
    finally:
        plt.close(fig)


WRITERS = {
    "text": lambda p: write_text_atomic(p, "new\n"),
    "json": lambda p: write_json_atomic(p, {"a": 1.0}),
    "h5": _h5,
    "png": _fig,
}


def _target(tmp_path, existing, name="out.dat"):
    path = tmp_path / name
    if existing:
        path.write_bytes(OLD)
    return path


def _unchanged(tmp_path, path, existing):
    """The folder holds exactly what it held before the write, with the same bytes."""
    assert sorted(p.name for p in tmp_path.iterdir()) == ([path.name] if existing else [])
    if existing:
        assert path.read_bytes() == OLD


@pytest.mark.parametrize("existing", [False, True])
def test_success_replaces_and_names_temp(tmp_path, existing):
    """Reference: the bytes written (the target holds them afterwards) and the documented name
    `.<name>.<16 hex>.tmp` of the temporary file, in the target's folder, while it is open."""
    path = _target(tmp_path, existing)
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path
        assert re.fullmatch(r"\.out\.dat\.[0-9a-f]{16}\.tmp", tmp.name)
        assert path.read_bytes() == OLD if existing else not path.exists()
        tmp.write_bytes(b"new\n")
    assert path.read_bytes() == b"new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.dat"]


def _fail_path(path):
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        raise Boom


def _fail_h5(path):
    with atomic_h5(path) as f:
        f["x"] = np.arange(3.0)
        raise Boom


def _fail_png(path):
    plt, fig = _figure()
    try:
        save_figure_atomic(fig, path, format="nonsense")
    finally:
        plt.close(fig)


FAILING = {
    "path": (_fail_path, Boom),
    "h5": (_fail_h5, Boom),
    # a str that the encoding cannot represent fails in the middle of the write
    "text": (lambda p: write_text_atomic(p, "abc \u00e9", encoding="ascii"), UnicodeEncodeError),
    "png": (_fail_png, ValueError),
}


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("kind", sorted(FAILING))
def test_failure_inside_block(tmp_path, kind, existing):
    """Reference: the target's previous bytes (or its absence) and the folder listing before the
    write; the exception raised inside the block reaches the caller."""
    path = _target(tmp_path, existing, name=f"out.{kind}")
    action, error = FAILING[kind]
    with pytest.raises(error):
        action(path)
    _unchanged(tmp_path, path, existing)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_at_h5_close(tmp_path, monkeypatch, existing):
    """Reference: the target's previous bytes; an HDF5 file whose close fails (e.g. the final
    flush hits a full disk) must not replace it."""
    path = _target(tmp_path, existing, name="out.h5")
    close = h5py.File.close

    def failing_close(self):
        close(self)
        raise OSError("simulated flush failure")

    monkeypatch.setattr(h5py.File, "close", failing_close)
    with pytest.raises(OSError, match="simulated flush failure"):
        _h5(path)
    _unchanged(tmp_path, path, existing)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_failure_at_replace(tmp_path, monkeypatch, kind, existing):
    """Reference: the target's previous bytes; when os.replace fails (e.g. the target is a
    directory elsewhere, or permissions) the complete temporary file is removed too."""
    path = _target(tmp_path, existing, name=f"out.{kind}")

    def failing_replace(src, dst):
        raise PermissionError("simulated replace failure")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError, match="simulated replace failure"):
        WRITERS[kind](path)
    _unchanged(tmp_path, path, existing)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_umask_honoured(tmp_path, kind, umask):
    """Reference: 0o666 & ~umask, the mode open() gives a new file (mkstemp's 0o600 would make
    outputs unreadable to the user's group)."""
    old = os.umask(umask)
    try:
        WRITERS[kind](tmp_path / f"new.{kind}")
        existing = tmp_path / f"old.{kind}"
        existing.write_bytes(OLD)
        os.chmod(existing, 0o600)
        WRITERS[kind](existing)
    finally:
        os.umask(old)
    for p in (tmp_path / f"new.{kind}", existing):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


@pytest.mark.serial_only
def test_stale_temp_files_of_a_killed_run(tmp_path):
    """Reference: the temporary file a process killed inside atomic_h5 leaves behind, found by
    listing the folder; only it is removed, never the target, other targets' temporary files or
    user files with similar names."""
    path = tmp_path / "result.h5"
    path.write_bytes(OLD)
    script = ("import os, sys\nfrom spinverse_fem.io.atomic import atomic_h5\n"
              "with atomic_h5(sys.argv[1]) as f:\n    f['x'] = [1.0]\n    os._exit(9)\n")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True)
        assert r.returncode == 9, r.stderr
    stale = sorted(p for p in tmp_path.iterdir() if p.name != "result.h5")
    assert len(stale) == 2
    keep = [".result.h5.backup.tmp", ".other.h5.0123456789abcdef.tmp", "result.h5.tmp",
            ".result.h5.0123456789abcdef.tmp.png"]
    for name in keep:
        (tmp_path / name).write_bytes(OLD)

    assert remove_stale_temp_files(tmp_path, "result.h5") == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["result.h5"])
    assert path.read_bytes() == OLD
    assert remove_stale_temp_files(tmp_path, "result.h5") == []
    assert remove_stale_temp_files(tmp_path / "absent", "result.h5") == []


def test_json_non_finite_written_as_null(tmp_path):
    """Reference: RFC 8259 (no NaN/Infinity tokens): the file must parse with a reader that
    refuses them, non-finite floats (also numpy's, nested in lists, tuples and dicts) read back
    as null, finite values exactly."""
    path = tmp_path / "m.json"
    data = {"nan": float("nan"), "inf": float("inf"), "ninf": -np.inf, "np": np.float64("nan"),
            "nested": {"list": [1.5, float("nan")], "tuple": (np.inf, 2)}, "ok": 0.1, "s": "x"}
    write_json_atomic(path, data)

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back == {"nan": None, "inf": None, "ninf": None, "np": None,
                    "nested": {"list": [1.5, None], "tuple": [None, 2]}, "ok": 0.1, "s": "x"}
    # a non-finite value the cleaner does not rewrite (a dict key) raises instead of being
    # written as the token NaN, and leaves no file
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "bad.json", {float("nan"): 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_figure_needs_a_format(tmp_path):
    """Reference: the PNG signature (8 bytes, ISO/IEC 15948) of the file written; a path
    without suffix and no format= is refused before anything is written."""
    _fig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt, fig = _figure()
    try:
        with pytest.raises(ValueError, match="no suffix"):
            save_figure_atomic(fig, tmp_path / "figure")
    finally:
        plt.close(fig)
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_only_module_that_replaces():
    """Reference: the package sources; every temporary-file-and-replace goes through io.atomic
    except the two callers the lead switches later (cli/objective.py, inverse/driver.py)."""
    root = os.path.dirname(os.path.dirname(atomic.__file__))
    allowed = {os.path.join("io", "atomic.py"), os.path.join("cli", "objective.py")}
    found = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                full = os.path.join(folder, name)
                with open(full, encoding="utf-8") as fh:
                    if re.search(r"mkstemp|os\.replace", fh.read()):
                        found.add(os.path.relpath(full, root))
    assert found <= allowed, found - allowed
