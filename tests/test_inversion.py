"""The inversion engine: gradients of the full objective, optimiser schedules, a small
reconstruction, and exact resume after a kill."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from spinverse_fem.config import parse_config
from spinverse_fem.evaluation.scoring import score
from spinverse_fem.inverse.case import Case
from spinverse_fem.inverse.driver import Inversion
from spinverse_fem.inverse.model import Model, PriorWeights
from spinverse_fem.inverse.optimisers import Adam
from spinverse_fem.inverse.parameters import ParameterMap
from spinverse_fem.inverse.taylor import taylor_test

ROOT = Path(__file__).resolve().parents[1]

SPHERE = ROOT / "examples" / "small_sphere.toml"


def sphere_text(optimizer="adam", iterations=40, every=10) -> str:
    """examples/small_sphere.toml with the optimiser, iterations per stage and checkpoint
    interval replaced."""
    text = SPHERE.read_text()
    for key, value in (("optimizer", f'"{optimizer}"'), ("iterations_per_stage", iterations),
                       ("checkpoint_every", every)):
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    return text


def sphere_config(optimizer="adam", iterations=40, every=10):
    return parse_config(sphere_text(optimizer, iterations, every))


def test_adam_schedule_matches_closed_form():
    """Reference: the paper's schedule written out: linear warm-up to lr over 50 iterations,
    then cosine decay to 0.1 lr at iteration 200."""
    a = Adam(-2.0, 2.0, lr=0.6, warmup=50, final_factor=0.1)
    assert a.learning_rate(0, 200) == pytest.approx(0.6 / 50)
    assert a.learning_rate(49, 200) == pytest.approx(0.6)
    assert a.learning_rate(50, 200) == pytest.approx(0.6)
    mid = 50 + 75
    assert a.learning_rate(mid, 200) == pytest.approx(
        0.6 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert a.learning_rate(200, 200) == pytest.approx(0.06)
    x = np.array([-1.9, 0.0, 1.5])
    np.testing.assert_allclose(a.x_of(a.v_of(x)), x, rtol=1e-12)


def test_full_objective_taylor(comm):
    """Reference: Taylor remainders of misfit + continuity + manifold in x = log10 kappa
    (second order, rate >= 1.9)."""
    cfg = sphere_config()
    case = Case(comm, cfg)
    misfit = case.misfit([0], num_modes=40)
    problem = case.phantom
    params = ParameterMap(problem.active, -2.0, 2.0, np.full(problem.faces.num_faces, 100.0))
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.0, 1.0, params.size)
    model = Model(params, misfit, case.priors, PriorWeights(2.0, 1.5), reference_x=x)
    res = taylor_test(model, x, direction=rng.standard_normal(x.size), h0=2e-3, halvings=4)
    assert min(res.rates1) >= 1.9, res.rates1


def run_inversion(comm, cfg, checkpoint=None, state=None):
    case = Case(comm, cfg)
    threshold = cfg.inversion.threshold_um_per_ms
    inv = Inversion(case, log=lambda s: None,
                    observer=lambda k: score(case.phantom, k, threshold, case.truth))
    st = inv.run(state or inv.initial_state(), checkpoint=checkpoint)
    return inv, st


def test_small_inversion_recovers_sphere(comm):
    """Reference: the ground-truth membrane (24 faces of a sphere r = 10 um on the bcc n = 3
    grid); noiseless targets, staged 10/60 -> 10/20 ms, Adam: face IoU >= 0.8 and CD-L2 small.
    On 2 ranks tests/test_examples.py inverts the same problem (examples/small_inversion.py,
    20 iterations per stage) with the same thresholds and checks that every rank agrees."""
    if comm.size > 1:
        pytest.skip("on 2 ranks: test_examples.py::test_small_inversion_recovers_sphere")
    inv, st = run_inversion(comm, sphere_config("adam", 40))
    m = inv.observer(inv.kappa(st.x))
    print(f"sphere n=3: {m}")
    assert m["iou"] >= 0.8
    assert m["cd_l2"] <= 3.0


def test_tao_resume_is_exact(comm):
    """Reference: the same TAO run continued past its first checkpoint; resuming from the
    state saved there must give the same kappa (TAO restarts at checkpoints)."""
    import copy

    cfg = sphere_config("blmvm", iterations=5, every=3)
    saved = {}

    def keep_first(st):
        saved.setdefault("state", copy.deepcopy(st))

    _, full = run_inversion(comm, cfg, checkpoint=keep_first)
    assert saved["state"].global_iteration == 3
    _, resumed = run_inversion(comm, cfg, state=saved["state"])
    print(f"max |resumed - full| in log10 kappa: {np.max(np.abs(resumed.x - full.x)):.3g}")
    # Both runs leave the same saved state, so only the two iterations after it can differ:
    # serially bit-for-bit with one thread; on 2 ranks parallel MUMPS is not bitwise
    # reproducible between calls (its dynamic scheduling follows message timing, ~1e-16), and
    # blmvm's line search amplifies that (measured up to 2.9e-5 over six iterations on a
    # loaded machine when the comparison run was a separate run from the start). A resume
    # that lost state (stage, mode count, x) differs by ~1e-3.
    np.testing.assert_allclose(resumed.x, full.x, rtol=0, atol=1e-9 if comm.size == 1 else 1e-7)


@pytest.mark.serial_only
def test_resume_after_kill_gives_same_kappa(tmp_path):
    """Reference: an uninterrupted `run_inversion.py` run. A second run is killed (SIGKILL)
    after its first checkpoint, then continued with --resume: result.h5 must hold the same kappa.
    Also checks every output file exists and metrics.json's CD-L2 equals an independent
    computation from interface.ply."""
    cfg = tmp_path / "sphere.toml"
    cfg.write_text(sphere_text("adam", iterations=12, every=4))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "run_inversion.py"), "--config", str(cfg)]
    r = subprocess.run(["timeout", "600", *cmd, "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("result.h5", "interface.xdmf", "interface.h5", "interface.ply", "metrics.json",
                 "history.png", "checkpoint.h5"):
        assert (tmp_path / "a" / name).exists(), name
    out_b = tmp_path / "b"
    p = subprocess.Popen([*cmd, "--out", str(out_b)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    t0 = time.time()
    while not (out_b / "checkpoint.h5").exists() and time.time() - t0 < 300:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    with h5py.File(out_b / "checkpoint.h5") as f:
        assert 0 < f.attrs["global_iteration"] < 24
    r = subprocess.run(["timeout", "600", *cmd, "--out", str(out_b), "--resume"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    with h5py.File(tmp_path / "a" / "result.h5") as fa, h5py.File(out_b / "result.h5") as fb:
        np.testing.assert_allclose(fb["kappa_um_per_ms"][:], fa["kappa_um_per_ms"][:],
                                   rtol=1e-12, atol=0)
    # metrics.json's CD-L2 against an independent recomputation from the PLY file
    import json

    from spinverse_fem.evaluation.metrics import chamfer_l2
    from spinverse_fem.io.ply import read_ply

    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    pts, tris = read_ply(tmp_path / "a" / "interface.ply")
    with h5py.File(tmp_path / "a" / "result.h5") as f:
        truth = f["membrane_truth"][:].astype(bool)
        faces, verts = f["faces"][:], f["vertices"][:]
    cd = chamfer_l2(pts[tris], verts[faces[truth]]) if len(tris) else 0.0
    assert metrics["cd_l2"] == pytest.approx(cd, rel=1e-12, abs=1e-12)
    # and against the package-free checker users run on their own output directories
    r = subprocess.run(["timeout", "120", sys.executable,
                        str(ROOT / "experiments" / "check_cd_from_ply.py"), str(tmp_path / "a")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "agree" in r.stdout, r.stdout + r.stderr
