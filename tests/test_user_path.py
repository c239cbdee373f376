"""The everyday path of `spinverse invert` and friends (issue 11), run as a user runs them
(subprocesses under a wall-clock limit): Ctrl-C / SIGTERM and --resume, progress lines and
notes, one final iterate everywhere, the fit of the final kappa, warm start and extension, file
modes, a user's own gmsh mesh, and where PETSc options go. Each test names its reference.

The small sphere of examples/small_sphere.toml (one Adam iteration takes ~0.4 s serially).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import meshio
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPHERE = ROOT / "examples" / "small_sphere.toml"
OWN_MESH = ROOT / "examples" / "own_mesh.toml"
OWN_MSH = ROOT / "meshes" / "data" / "two_membranes.msh"
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
# the commands run as subprocesses (one test under its own mpiexec): not under the suite's
# mpiexec; the in-process tests run under it too
serial = pytest.mark.serial_only

INVERT_OUTPUTS = ("result.h5", "checkpoint.h5", "interface.xdmf", "interface.h5",
                  "interface.ply", "metrics.json", "history.png", "fit.png")
INTERRUPTED = re.compile(r"^interrupted at stage (\d+), iteration (\d+); continue with --resume$")


def sphere_text(iterations=20, every=10, optimizer="adam", **replace) -> str:
    """examples/small_sphere.toml with [inversion] keys replaced (or added)."""
    text = SPHERE.read_text()
    keys = dict(optimizer=f'"{optimizer}"', iterations_per_stage=iterations,
                checkpoint_every=every, **replace)
    for key, value in keys.items():
        line = f"{key} = {value}"
        text, n = re.subn(rf"^{key} = .*$", line, text, flags=re.M)
        if not n:
            text = text.replace("[inversion]\n", f"[inversion]\n{line}\n")
    return text


def one_sequence_text(**replace) -> str:
    """The sphere with only its 10/60 sequence (one curriculum stage), a warm-up of 2, a constant
    learning rate after it and no manifold weight: then how long the stage is planned to be
    changes no iterate, so a run of 4 + 3 iterations must equal one of 7."""
    head, *seqs = sphere_text(4, 2, adam_warmup=2, adam_final_lr_factor=1.0,
                              manifold_weight=0.0, **replace).split("[[sequence]]")
    keep = [s for s in seqs if 'name = "10/60"' in s]
    assert len(keep) == 1
    return head + "[[sequence]]" + keep[0]


def run(args, timeout=600, mpi=0, umask=None):
    """`spinverse ARGS` (under `mpiexec -n MPI` if mpi) killed after `timeout` s."""
    cmd = [str(BIN / "spinverse"), *map(str, args)]
    if mpi:
        cmd = [str(BIN / "mpiexec"), "-n", str(mpi), *cmd]
    cmd = ["timeout", str(timeout), *cmd]
    if umask is not None:
        cmd = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV)


HYDRA_CRASH = "HYD_pmcd_pmip_control_cmd_cb"


def interrupt(args, after: str, sig: int, mpi=0, timeout=600):
    """Start `spinverse ARGS`, send `sig` once a stdout line contains `after`, and wait.
    Returns (returncode, stdout, stderr). `timeout` (1) passes the signal on to the command
    (and mpiexec on to every rank)."""
    cmd = [str(BIN / "spinverse"), *map(str, args)]
    if mpi:
        cmd = [str(BIN / "mpiexec"), "-n", str(mpi), *cmd]
    p = subprocess.Popen(["timeout", str(timeout), *cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if after in line:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=timeout + 60)
    return p.returncode, "".join(lines) + out, err


def assert_clean_stop(rc, out, err, code):
    """Exit code `code`, one interrupted line on stdout, nothing on stderr (no traceback, no
    PETSc banner). Returns (stage, iteration) of the line."""
    assert rc == code, f"rc {rc}\n{out}\n{err}"
    assert err.strip() == "", err
    assert "Traceback" not in out and "PETSC ERROR" not in out and "Caught signal" not in out
    hits = [INTERRUPTED.match(line) for line in out.splitlines()]
    hits = [h for h in hits if h]
    assert len(hits) == 1, out
    return int(hits[0].group(1)), int(hits[0].group(2))


def kappa_of(folder) -> np.ndarray:
    with h5py.File(Path(folder) / "result.h5") as f:
        return f["kappa_um_per_ms"][:]


def history_of(folder) -> dict:
    with h5py.File(Path(folder) / "result.h5") as f:
        return {k: f[f"history/{k}"][:] for k in f["history"]}


@pytest.fixture(scope="module")
def sphere(tmp_path_factory):
    """The sphere with 2 stages x 20 Adam iterations, checkpoints every 10, its signals
    (`spinverse simulate`), and the uninterrupted reference run written under umask 027."""
    d = tmp_path_factory.mktemp("sphere")
    cfg = d / "sphere.toml"
    cfg.write_text(sphere_text(20, 10))
    signals = d / "signals.h5"
    r = run(["simulate", cfg, "--out", signals])
    assert r.returncode == 0, r.stderr
    ref = d / "reference"
    r = run(["invert", "--config", cfg, "--target", signals, "--out", ref], umask=0o027)
    assert r.returncode == 0, r.stderr
    return dict(config=cfg, signals=signals, ref=ref, stdout=r.stdout, stderr=r.stderr)


# -- 1. interrupting and resuming ----------------------------------------------------------------

@serial
def test_sigint_checkpoints_the_iteration_and_resume_is_exact(tmp_path, sphere):
    """Reference: the uninterrupted run (kappa and history, rtol 1e-12: Adam's state is saved
    exactly). SIGINT after iteration 3 of 40: exit 130, one line, no traceback, the lock
    released, a checkpoint at the iteration the line names (not a segment boundary's)."""
    out = tmp_path / "run"
    args = ["invert", "--config", sphere["config"], "--target", sphere["signals"], "--out", out]
    rc, stdout, stderr = interrupt(args, "it  3/40", signal.SIGINT)
    stage, it = assert_clean_stop(rc, stdout, stderr, 130)
    print(f"stopped at stage {stage}, iteration {it}")
    assert stage == 1 and 3 <= it < 20
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.h5"]  # no .lock, no temp file
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["global_iteration"] == it and f.attrs["stage"] == 0
        assert len(f["history/misfit"]) == it  # one row per iteration taken
    r = run([*args, "--resume"])
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'checkpoint.h5'}: stage 1, iteration {it}" in r.stdout
    np.testing.assert_allclose(kappa_of(out), kappa_of(sphere["ref"]), rtol=1e-12, atol=0)
    h, ref = history_of(out), history_of(sphere["ref"])
    np.testing.assert_array_equal(h["iteration"], ref["iteration"])
    np.testing.assert_allclose(h["misfit"], ref["misfit"], rtol=1e-12)


@serial
def test_sigterm_before_the_first_checkpoint_keeps_the_work(tmp_path, sphere):
    """SIGTERM as soon as the set-up is done (before the first segment's checkpoint at
    iteration 10): exit 143, no PETSc banner (PETSc's own SIGTERM handler is replaced), the
    start state or the iterations done so far checkpointed; --resume gives the reference's
    kappa (rtol 1e-12)."""
    out = tmp_path / "run"
    args = ["invert", "--config", sphere["config"], "--target", sphere["signals"], "--out", out]
    rc, stdout, stderr = interrupt(args, "grid: ", signal.SIGTERM)
    stage, it = assert_clean_stop(rc, stdout, stderr, 143)
    print(f"stopped at stage {stage}, iteration {it}")
    assert stage == 1 and it < 10
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["global_iteration"] == it
    assert not (out / ".lock").exists()
    r = run([*args, "--resume"])
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(kappa_of(out), kappa_of(sphere["ref"]), rtol=1e-12, atol=0)


@serial
def test_sigint_to_mpiexec_stops_both_ranks_at_one_iteration(tmp_path, sphere):
    """mpiexec forwards SIGINT to both ranks; they agree (allreduce) on the iteration to stop
    at: exit 130, one line (rank 0), the checkpoint of that iteration, and a --resume under
    mpiexec that records every iteration exactly once. Reference for the kappa: the serial run
    of the same configuration (log10 kappa to 0.05: parallel MUMPS is not bitwise reproducible
    and twenty Adam steps amplify its round-off)."""
    cfg = tmp_path / "sphere10.toml"
    cfg.write_text(sphere_text(10, 5))
    out, serial_out = tmp_path / "mpi", tmp_path / "serial"
    args = ["invert", "--config", cfg, "--target", sphere["signals"], "--out", out]
    for _ in range(3):
        rc, stdout, stderr = interrupt(args, "it  2/20", signal.SIGINT, mpi=2, timeout=900)
        if HYDRA_CRASH not in stderr + stdout:
            break
        # MPICH's hydra proxy sometimes dies on the forwarded Ctrl-C on a loaded machine
        # (`assert (!closed) failed` in the proxy; seen in CI about once in 20 runs, with
        # mpiexec exiting 0 or 255 and the ranks' output lost): its bug, not ours. Such a try
        # says nothing about our stop; the next one is judged normally.
        shutil.rmtree(out, ignore_errors=True)
    stage, it = assert_clean_stop(rc, stdout, stderr, 130)
    assert stage == 1 and 2 <= it < 10
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["global_iteration"] == it
    r = run([*args, "--resume"], mpi=2, timeout=900)
    assert r.returncode == 0, r.stderr
    h = history_of(out)
    np.testing.assert_array_equal(h["iteration"], np.arange(21))  # 0..19 and the final 20
    r = run(["invert", "--config", cfg, "--target", sphere["signals"], "--out", serial_out])
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.log10(kappa_of(out)), np.log10(kappa_of(serial_out)),
                               rtol=0, atol=0.05)


@pytest.mark.parametrize("optimizer, stops_at, resumes_at", [("adam", 1, 1), ("blmvm", 2, 0)])
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_iteration(comm, optimizer, stops_at,
                                                                    resumes_at):
    """In process (also under mpiexec -n 2): `stop()` answers on the last rank only, at its
    third call (segment start, then one per iteration): every rank stops at the same
    iteration. Adam stops before the step it was about to take (state exact); blmvm, inside
    its segment, returns the segment's start. Reference: an uninterrupted run (serially
    to 1e-10, across ranks to 1e-6: round-off, parallel MUMPS)."""
    from spinverse_fem.config import parse_config
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.inverse.driver import Inversion

    cfg = parse_config(sphere_text(4, 4, optimizer))

    def inversion():
        return Inversion(Case(comm, cfg), log=lambda s: None)

    full = inversion()
    ref = full.run(full.initial_state())
    calls = []

    def stop():
        calls.append(1)
        return int(signal.SIGINT) if comm.rank == comm.size - 1 and len(calls) >= 3 else 0

    inv = inversion()
    state = inv.run(inv.initial_state(), stop=stop)
    assert comm.allgather(inv.stopped) == [inv.stopped] * comm.size
    assert inv.stopped.signal == signal.SIGINT and inv.stopped.stage == 0
    assert (inv.stopped.iteration, inv.stopped.resume_iteration) == (stops_at, resumes_at)
    assert not state.done and state.global_iteration == resumes_at
    assert len(state.history["misfit"]) == resumes_at
    again = inversion().run(state)
    assert again.done and again.global_iteration == 8
    # round-off only: serially bit for bit on the development machine but 5e-14 on CI's (its
    # OpenBLAS kernels differ); across ranks parallel MUMPS is not bitwise reproducible between
    # calls, which eight blmvm iterations amplify to ~3e-8 in x (measured)
    np.testing.assert_allclose(again.x, ref.x, rtol=0, atol=1e-10 if comm.size == 1 else 1e-6)


# -- 2. progress lines and notes -----------------------------------------------------------------

@serial
def test_progress_lines_show_k_of_n_pace_and_eta_and_warnings_are_notes(sphere):
    """One line per iteration k = 0..39 as `it k/40` with seconds per iteration and an ETA,
    then `final it 40/40`; the eigenbasis cap warning is one `note:` line without source path
    or category, each distinct note once; nothing on stderr."""
    out = sphere["stdout"]
    assert sphere["stderr"] == ""
    its = [int(m.group(1)) for m in re.finditer(r"^  stage \d it +(\d+)/40 .* s\s+"
                                                r"(?:\d+\.\d+) s/it  ETA \d+ (?:s|min)",
                                                out, flags=re.M)]
    assert its == list(range(40)), out
    assert len(re.findall(r"^  final it 40/40  misfit ", out, flags=re.M)) == 1
    notes = [ln for ln in out.splitlines() if ln.startswith("note: ")]
    assert any(re.fullmatch(r"note: \d+ eigenvalues lie below the cutoff; keeping \d+ "
                            r"\(max_modes = 60\)", n) for n in notes), notes
    assert len(notes) == len(set(notes))
    assert "UserWarning" not in out and ".py:" not in out and "warnings.warn" not in out


# -- 3. one final iterate ------------------------------------------------------------------------

@serial
def test_final_misfit_history_and_written_kappa_are_one_iterate(tmp_path, sphere):
    """metrics.json's final_misfit == the last history row == result.h5's final_misfit == the
    summary line == the misfit `spinverse objective` computes from result.h5's kappa (the last
    stage's sequences and mode count, the same target file and normalisation; rtol 1e-9: the
    objective's propagator tolerance is 2^-53, the inversion's 2^-40)."""
    from spinverse_fem.config import load_config
    from spinverse_fem.inverse.curriculum import stages

    ref = sphere["ref"]
    metrics = json.loads((ref / "metrics.json").read_text())
    h = history_of(ref)
    with h5py.File(ref / "result.h5") as f:
        stored = float(f.attrs["final_misfit"])
        modes = int(f["stages/1"].attrs["modes"])
    assert metrics["final_misfit"] == h["misfit"][-1] == stored
    assert metrics["iterations"] == h["iteration"][-1] == 40
    assert h["stage"][-1] == 1 and h["modes"][-1] == modes
    assert f"iteration 40, final misfit {stored:.4e}" in sphere["stdout"]
    cfg = load_config(sphere["config"])
    last = [cfg.sequences[i].name for i in stages(cfg)[-1].sequences]
    assert last == ["10/20"]
    r = run(["objective", sphere["config"], "--target", sphere["signals"], "--kappa",
             ref / "result.h5", "--sequences", *last, "--modes", modes,
             "--out", tmp_path / "objective.h5"])
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "objective.h5") as f:
        j = float(f["objective"][()])
    assert j == pytest.approx(stored, rel=1e-9)
    assert j != pytest.approx(h["misfit"][-2], rel=1e-6)  # not the point before the last step


# -- 4. the fit ----------------------------------------------------------------------------------

@serial
def test_result_holds_the_signals_of_the_final_kappa(sphere):
    """result.h5 fit/<k>: the targets, b and directions are the signal table's rows of sequence
    k; the predicted signals of the last stage's sequence give the final misfit again
    (w/N sum |S/S0 - T|^2, w = 100; rtol 1e-9); fit.png is written."""
    from spinverse_fem.io.signals import read_signal_table

    table = read_signal_table(sphere["signals"])
    ref = sphere["ref"]
    metrics = json.loads((ref / "metrics.json").read_text())
    with h5py.File(ref / "result.h5") as f:
        g = f["fit"]
        assert json.loads(g.attrs["sequence_names"]) == list(table.sequence_names)
        assert g.attrs["modes"] == f["stages/1"].attrs["modes"] and g.attrs["iteration"] == 40
        fit = {}
        for k, name in enumerate(table.sequence_names):
            s = g[str(k)]
            rows = table.rows_of(k)
            assert s.attrs["name"] == name
            target = s["target_real"][:] + 1j * s["target_imag"][:]
            np.testing.assert_array_equal(target, table.signal[rows])
            np.testing.assert_array_equal(s["b_s_per_mm2"][:], table.b_s_per_mm2[rows])
            np.testing.assert_array_equal(s["direction"][:], table.direction[rows])
            fit[name] = (s["predicted_real"][:] + 1j * s["predicted_imag"][:], target)
    pred, target = fit["10/20"]
    misfit = 100.0 / pred.size * np.sum(np.abs(pred - target) ** 2)
    assert misfit == pytest.approx(metrics["final_misfit"], rel=1e-9)
    png = (ref / "fit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_fit_and_decay_plots_say_what_line_and_band_are(tmp_path, monkeypatch):
    """The legends (read from the figures before they are saved) name the direction mean and
    the min-max band, for measured and predicted."""
    from spinverse_fem.io import plots
    from spinverse_fem.io.signals import SignalTable

    legends = []

    def capture(fig, path, **kwargs):
        for leg in [*fig.legends, *(a.get_legend() for a in fig.axes)]:
            if leg is not None:
                legends.append([t.get_text() for t in leg.get_texts()])

    monkeypatch.setattr(plots, "save_figure_atomic", capture)
    b = np.repeat([0.0, 1000.0, 2000.0], 3)
    signal_ = np.exp(-b / 1000.0 * np.tile([0.5, 1.0, 1.5], 3)).astype(complex)
    nan = np.full(9, np.nan)
    table = SignalTable(signal=signal_, b_s_per_mm2=b, direction=np.tile(np.eye(3), (3, 1)),
                        sequence_index=np.zeros(9, dtype=int), delta_ms=nan, Delta_ms=nan,
                        echo_time_ms=nan, sequence_names=("10/20",))
    plots.plot_signal_decay(table, tmp_path / "d.png")
    plots.plot_fit(tmp_path / "f.png", dict(names=["10/20"], b=[b], target=[signal_],
                                            predicted=[0.9 * signal_]))
    decay, fit = legends
    assert decay == ["10/20 ms", "line: mean over directions", "band: min-max over directions"]
    assert fit == ["measured: mean over directions", "measured: min-max over directions",
                   "predicted: mean over directions", "predicted: min-max over directions"]
    bs, mean, lo, hi = plots.direction_spread(b, signal_)
    np.testing.assert_allclose(mean[1], np.mean(np.exp([-0.5, -1.0, -1.5])))
    assert (lo[2], hi[2]) == (np.exp(-3.0), np.exp(-1.0))


# -- 5. warm start and extension -----------------------------------------------------------------

@serial
def test_warm_start_from_a_kappa_file(tmp_path):
    """Reference: the same run with inversion.start_um_per_ms = 3 (bit-for-bit: x0 = log10 3
    either way). A kappa file of another grid is refused (exit 2, the file and field named,
    no output folder left); values outside the bounds are clipped with a note."""
    from spinverse_fem.config import parse_config
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.io.kappa import write_kappa

    text = one_sequence_text()
    cfg = tmp_path / "one.toml"
    cfg.write_text(text)
    ph = build_phantom(parse_config(text))
    k3 = tmp_path / "k3.h5"
    write_kappa(k3, np.full(ph.faces.num_faces, 3.0), ph.faces.faces, ph.grid.points)
    r = run(["invert", "--config", cfg, "--out", tmp_path / "warm", "--iterations", 3,
             "--start-kappa", k3])
    assert r.returncode == 0, r.stderr
    assert f"warm start from {k3}: kappa in [3, 3] um/ms on the 504 active faces" in r.stdout
    cfg3 = tmp_path / "one3.toml"
    cfg3.write_text(one_sequence_text(start_um_per_ms=3.0))
    r = run(["invert", "--config", cfg3, "--out", tmp_path / "config", "--iterations", 3])
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(kappa_of(tmp_path / "warm"), kappa_of(tmp_path / "config"))
    np.testing.assert_array_equal(history_of(tmp_path / "warm")["misfit"],
                                  history_of(tmp_path / "config")["misfit"])
    assert json.loads((tmp_path / "warm" / "metrics.json").read_text())["start"] == \
        f"kappa file {k3}"

    other = build_phantom(parse_config(OWN_MESH.read_text().replace(
        "../meshes/data/", f"{OWN_MSH.parent}/")))
    wrong = tmp_path / "wrong.h5"
    write_kappa(wrong, np.ones(other.faces.num_faces), other.faces.faces, other.grid.points)
    r = run(["invert", "--config", cfg, "--out", tmp_path / "refused", "--iterations", 1,
             "--start-kappa", wrong])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"spinverse: error: {wrong}: ") and "vertices" in r.stderr
    assert not (tmp_path / "refused").exists()

    kappa = np.full(ph.faces.num_faces, 3.0)
    kappa[np.flatnonzero(ph.active)[:5]] = [1e-5, 0.0, 1e3, 1e4, 1e5]
    wide = tmp_path / "wide.h5"
    write_kappa(wide, kappa, ph.faces.faces, ph.grid.points)
    r = run(["invert", "--config", cfg, "--out", tmp_path / "wide", "--iterations", 1,
             "--start-kappa", wide])
    assert r.returncode == 0, r.stderr
    assert "2 below kappa_min and 3 above kappa_max clipped to the bounds" in r.stdout


@serial
def test_extend_a_finished_run(tmp_path):
    """Reference: a run of 7 iterations. A finished run of 4 extended by 3 (`--extend 3`)
    continues its Adam state and gives the same kappa and history bit for bit (constant
    learning rate after the warm-up, no manifold ramp: see one_sequence_text). --extend without
    a checkpoint is refused."""
    cfg = tmp_path / "one.toml"
    cfg.write_text(one_sequence_text())
    short, long_ = tmp_path / "short", tmp_path / "long"
    r = run(["invert", "--config", cfg, "--out", short, "--extend", 3])
    assert r.returncode == 2 and "no checkpoint to extend" in r.stderr, r.stderr
    for out, n in ((short, 4), (long_, 7)):
        r = run(["invert", "--config", cfg, "--out", out, "--iterations", n])
        assert r.returncode == 0, r.stderr
    assert history_of(short)["iteration"][-1] == 4
    r = run(["invert", "--config", cfg, "--out", short, "--iterations", 4, "--extend", 3])
    assert r.returncode == 0, r.stderr
    assert "extending: stage 1 runs to its iteration 7 (3 more than 4)" in r.stdout
    assert re.search(r"^  stage 1 it 6/7 ", r.stdout, flags=re.M)
    assert re.search(r"^  final it 7/7 ", r.stdout, flags=re.M)
    np.testing.assert_array_equal(kappa_of(short), kappa_of(long_))
    h, ref = history_of(short), history_of(long_)
    np.testing.assert_array_equal(h["iteration"], np.arange(8))
    np.testing.assert_array_equal(h["misfit"], ref["misfit"])
    assert json.loads((short / "metrics.json").read_text())["iterations"] == 7


# -- 6. file modes -------------------------------------------------------------------------------

@serial
def test_invert_outputs_follow_the_umask(sphere):
    """The reference run was made under umask 027: every output 0640, the folder 0750."""
    ref = sphere["ref"]
    assert stat.S_IMODE(ref.stat().st_mode) == 0o750
    assert sorted(p.name for p in ref.iterdir()) == sorted(INVERT_OUTPUTS)
    for name in INVERT_OUTPUTS:
        assert stat.S_IMODE((ref / name).stat().st_mode) == 0o640, name


# -- 7. a user's own gmsh mesh -------------------------------------------------------------------

def tagged_membrane(path=OWN_MSH, tag=2) -> set:
    """The membrane triangles of a .msh file as a set of sorted vertex-coordinate triples."""
    m = meshio.gmsh.read(str(path))
    tris = [(c.data, m.cell_data["gmsh:physical"][i]) for i, c in enumerate(m.cells)
            if c.type == "triangle"]
    out = set()
    for data, tags in tris:
        for t in data[np.asarray(tags).ravel() == tag]:
            out.add(tuple(sorted(tuple(np.round(m.points[v], 9)) for v in t)))
    return out


@serial
def test_own_mesh_example_finds_the_tagged_membrane(tmp_path):
    """Reference: the 36 triangles tagged 2 in meshes/data/two_membranes.msh (read with
    meshio): `spinverse simulate examples/own_mesh.toml` reports them as the membrane, and the
    membrane faces of its signal table are exactly those triangles. The PETSc option given on
    the command line reaches SLEPc (-spinverse_eps_view prints the solver)."""
    truth = tagged_membrane()
    assert len(truth) == 36
    out = tmp_path / "signals.h5"
    r = run(["simulate", OWN_MESH, "--out", out, "-spinverse_eps_view"])
    assert r.returncode == 0, r.stderr
    assert "grid: 324 tetrahedra, 738 faces; membrane: 36 interior + 0 outer faces" in r.stdout
    assert "EPS Object: (spinverse_)" in r.stdout
    with h5py.File(out) as f:
        faces, verts, membrane = f["faces"][:], f["vertices"][:], f["membrane"][:].astype(bool)
        assert f["signal_real"].shape == (20,)
    found = {tuple(sorted(tuple(np.round(verts[v], 9)) for v in t)) for t in faces[membrane]}
    assert found == truth


def test_gmsh_41_files_are_read_like_22(tmp_path):
    """docs/own_mesh.md says gmsh's default format 4.1 is read too. Reference: the shipped 2.2
    file; the same mesh written as gmsh 4.1 ASCII (entities carrying the physical tags, as gmsh
    writes them) gives the same tetrahedra and membrane."""
    from spinverse_fem.meshes.readers import read_grid

    m = meshio.gmsh.read(str(OWN_MSH))
    blocks = []  # (cell type, cells, physical tag), one per type and tag
    for i, c in enumerate(m.cells):
        tags = np.asarray(m.cell_data["gmsh:physical"][i]).ravel()
        blocks += [(c.type, c.data[tags == t], int(t)) for t in np.unique(tags)]
    # entities: volume 1 (physical 3); surfaces 1 (outer, physical 1) and 2 (membrane, 2)
    lines = ["$MeshFormat", "4.1 0 8", "$EndMeshFormat", "$Entities", "0 0 2 1",
             "1 0 0 0 12 6 6 1 1 0", "2 4 0 0 8 6 6 1 2 0", "1 0 0 0 12 6 6 1 3 0",
             "$EndEntities", "$Nodes", f"1 {len(m.points)} 1 {len(m.points)}",
             f"3 1 0 {len(m.points)}"]
    lines += [str(i + 1) for i in range(len(m.points))]
    lines += [" ".join(f"{x:.17g}" for x in p) for p in m.points]
    lines += ["$EndNodes", "$Elements"]
    n = sum(len(d) for _, d, _ in blocks)
    lines.append(f"{len(blocks)} {n} 1 {n}")
    tag, surface = 1, {1: 1, 2: 2}
    for kind, data, phys in blocks:
        dim, etype, entity = (3, 4, 1) if kind == "tetra" else (2, 2, surface[phys])
        lines.append(f"{dim} {entity} {etype} {len(data)}")
        for row in data:
            lines.append(" ".join(map(str, [tag, *(row + 1)])))
            tag += 1
    lines.append("$EndElements")
    v41 = tmp_path / "two_membranes_41.msh"
    v41.write_text("\n".join(lines) + "\n")
    a, b = read_grid(OWN_MSH, membrane_tag=2), read_grid(v41, membrane_tag=2)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.tets, b.tets)
    np.testing.assert_array_equal(a.membrane_triangles, b.membrane_triangles)
    assert tagged_membrane(v41) == tagged_membrane()


# -- 8. where PETSc options go -------------------------------------------------------------------

def test_docs_and_help_say_where_petsc_options_go():
    """docs/units_and_files.md no longer says the command line is not passed to PETSc, and says
    how it is; every command's --help says where PETSc options go (evaluate: that it takes
    none)."""
    from spinverse_fem.cli.app import build_parser

    doc = (ROOT / "docs" / "units_and_files.md").read_text()
    assert "not passed to PETSc" not in doc
    assert "go after the command as single-dash `-key value` pairs" in doc
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        text = parser.format_help()
        if name == "evaluate":
            assert "takes no PETSc options" in text
        else:
            assert "PETSc and SLEPc options go after the command" in text, name
            assert "-spinverse_eps_" in text and "-spinverse_tao_" in text, name
