"""`spinverse simulate` as a user runs it: output layout, bad input (exit 2, one message naming
file and field, no output file), and 1-vs-2-rank parity through mpiexec (with a timeout)."""

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
pytestmark = pytest.mark.serial_only


run = run_cli


def small_config(tmp_path, **replace):
    text = EXAMPLE.read_text().replace("cells = [20, 4, 4]", "cells = [10, 2, 2]")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    p = tmp_path / "case.toml"
    p.write_text(text)
    return p


def test_simulate_writes_signal_table(tmp_path):
    """Reference: the config itself (rows = sequence x b x direction in config order, b = 0 rows
    equal 1) and the issue's file layout."""
    out = tmp_path / "out" / "signals.h5"
    r = run(["simulate", small_config(tmp_path), "--out", out])
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        n = 4 * 3
        for key in ("signal_real", "signal_imag", "b_s_per_mm2", "delta_ms", "Delta_ms"):
            assert f[key].shape == (n,)
        assert f["direction"].shape == (n, 3)
        np.testing.assert_allclose(f["b_s_per_mm2"][:], np.repeat([0, 500, 1000, 2000], 3))
        np.testing.assert_allclose(f["direction"][:3], [[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]])
        np.testing.assert_allclose(f["signal_real"][:3], 1.0, atol=1e-12)
        assert np.all(np.diff(f["signal_real"][::3]) < 0)   # decays with b along x
        assert "[geometry]" in f.attrs["config"]
    assert (tmp_path / "out" / "signals_decay.png").stat().st_size > 1000


@pytest.mark.parametrize("replace, field", [
    ({"outer = \"neumann\"": "outer = \"neumann\"\ncolour = 3"}, "permeability.colour"),
    ({"barrier_um_per_ms = 0.1": "barrier_um_per_ms = -0.1"}, "barrier_um_per_ms"),
    ({"diffusivity_um2_per_ms = 2.0": "diffusivity_um2_per_ms = -2.0"}, "diffusivity_um2_per_ms"),
    ({"[0.6, 0.8, 0.0]": "[0.6, 0.9, 0.0]"}, "directions"),
    ({"[0.0, 500.0,": "[-1.0, 500.0,"}, "b_s_per_mm2"),
    ({"delta_ms = 5.0": "delta_ms = 25.0"}, "delta_ms"),
])
def test_bad_config_exits_2_without_output(tmp_path, replace, field):
    """Reference: the issue's list of bad inputs; each must name the file and the field."""
    cfg = small_config(tmp_path, **replace)
    out = tmp_path / "signals.h5"
    r = run(["simulate", cfg, "--out", out])
    assert r.returncode == 2
    assert "case.toml" in r.stderr and field in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("defect", ["inverted", "duplicate"])
def test_bad_mesh_file_exits_2(tmp_path, defect):
    """Reference: a gmsh file with an inverted or a duplicated tetrahedron must be refused."""
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=float)
    tets = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])
    tets = tets[:, [1, 0, 2, 3]] if defect == "inverted" else np.vstack([tets, tets[:1]])
    msh = tmp_path / "bad.msh"
    meshio.write(str(msh), meshio.Mesh(pts, [("tetra", tets)]), file_format="gmsh22",
                 binary=False)
    cfg = tmp_path / "case.toml"
    cfg.write_text(EXAMPLE.read_text().split("[geometry]")[0].replace(
        'kind = "box"\nlower_um = [0.0, 0.0, 0.0]\nupper_um = [10.0, 10.0, 10.0]\n'
        'cells = [20, 4, 4]', f'kind = "file"\npath = "{msh}"')
        + EXAMPLE.read_text().split("[geometry]")[1].split("\n", 4)[4].replace(
            "[permeability]", '[geometry]\nkind = "none"\n[permeability]'))
    out = tmp_path / "signals.h5"
    r = run(["simulate", cfg, "--out", out])
    assert r.returncode == 2, r.stderr
    assert "bad.msh" in r.stderr
    assert not out.exists()


def test_mpi_parity_of_signals_and_faces(tmp_path):
    """Reference: the serial run. Two ranks must give the same signals to 1e-10 and the same
    canonical faces (mpiexec under a timeout, so a deadlock fails)."""
    cfg = small_config(tmp_path)
    r1 = run(["simulate", cfg, "--out", tmp_path / "s1.h5"])
    r2 = run(["simulate", cfg, "--out", tmp_path / "s2.h5"], mpi=2)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    with h5py.File(tmp_path / "s1.h5") as a, h5py.File(tmp_path / "s2.h5") as b:
        for key in ("signal_real", "signal_imag"):
            np.testing.assert_allclose(a[key][:], b[key][:], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(a["faces"][:], b["faces"][:])
        np.testing.assert_array_equal(a["membrane"][:], b["membrane"][:])


def test_simulate_full_order_model_is_normalised_like_the_reduced(tmp_path):
    """Reference: the reduced model's table from the same config: `--model full` (Crank-Nicolson,
    [full_order] time_step_ms) writes the same layout, its b = 0 rows are exactly 1 (S0 is its
    own b = 0 signal) and its signals agree with the reduced ones to 5e-3 (time step and mode
    truncation; tests/test_reduced_vs_full_order.py measures the convergence)."""
    cfg = small_config(tmp_path)
    tables = {}
    for model in ("reduced", "full"):
        out = tmp_path / model / "signals.h5"
        r = run(["simulate", cfg, "--out", out, "--model", model])
        assert r.returncode == 0, r.stderr
        if model == "full":
            assert "full-order Crank-Nicolson" in r.stdout
        with h5py.File(out) as f:
            tables[model] = f["signal_real"][:] + 1j * f["signal_imag"][:]
            b = f["b_s_per_mm2"][:]
    full, red = tables["full"], tables["reduced"]
    np.testing.assert_allclose(full[b == 0], 1.0, atol=1e-13)
    np.testing.assert_allclose(full, red, atol=5e-3)


def test_myelinated_axon_example_runs_as_the_how_to_says(tmp_path):
    """Reference: docs/compartments.md, section 3: the log lines it shows for
    examples/myelinated_axon.toml (three compartments with their spin densities, two
    membranes, 78 modes) appear verbatim in `spinverse simulate`'s output; the b = 0 rows are
    1 and the signals decay with b; `spinverse invert` on those signals runs (2 iterations)
    and lowers the misfit."""
    import json
    import re

    example = ROOT / "examples" / "myelinated_axon.toml"
    doc = (ROOT / "docs" / "compartments.md").read_text()
    shown = doc.split("The log states what was read")[1].split("```")[1].strip().splitlines()
    assert len(shown) == 7
    out = tmp_path / "axon.h5"
    r = run(["simulate", example, "--out", out])
    assert r.returncode == 0, r.stderr
    for line in shown:
        assert line in r.stdout, line
    with h5py.File(out) as f:
        s, b = f["signal_real"][:], f["b_s_per_mm2"][:]
    np.testing.assert_allclose(s[b == 0], 1.0, atol=1e-12)
    assert np.all(np.diff(s[::4]) < 0)
    r = run(["invert", "--config", example, "--target", out, "--out", tmp_path / "fit",
             "--iterations", "2"])
    assert r.returncode == 0, r.stderr
    misfits = [float(m) for m in re.findall(r"misfit ([-+0-9.e]+)", r.stdout)]
    assert misfits[-1] < misfits[0]
    assert "compartment 'myelin'" in r.stdout
    assert json.loads((tmp_path / "fit" / "metrics.json").read_text())
