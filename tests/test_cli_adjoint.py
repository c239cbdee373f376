"""`spinverse objective` / `spinverse taylor` and the pieces behind them (targets, full-order
misfit), as a user runs them.

Every test names its independent reference. The subprocess tests (serial_only) run the installed
`spinverse` script, under mpiexec with a timeout where two ranks are compared; the in-process
tests also run under `mpiexec -n 2`.
"""

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_helpers import run_cli

from spinverse_fem.config import parse_config
from spinverse_fem.config.protocol import Sequence
from spinverse_fem.errors import InputError
from spinverse_fem.io.kappa import write_kappa
from spinverse_fem.io.signals import table_from_sequences, write_signal_table
from spinverse_fem.io.targets import load_targets
from spinverse_fem.meshes.box import box_grid

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plane_box.toml"
BIN = Path(sys.executable).parent


def config_text(normalisation="reference", **replace):
    """examples/plane_box.toml on a 10 x 2 x 2 box, 2.5 um length scale (about 40 modes at the
    start kappa), a 0.5 ms Crank-Nicolson step and the given normalisation."""
    text = (EXAMPLE.read_text().replace("cells = [20, 4, 4]", "cells = [10, 2, 2]")
            .replace("length_scale_um = 1.0", "length_scale_um = 2.5"))
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text + (f'\n[full_order]\ntime_step_ms = 0.5\n\n[inversion]\n'
                   f'normalisation = "{normalisation}"\n')


run = run_cli


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Folder with case.toml (reference), case_own.toml and signals.h5 from `simulate`."""
    d = tmp_path_factory.mktemp("adjoint_cli")
    (d / "case.toml").write_text(config_text("reference"))
    (d / "case_own.toml").write_text(config_text("own"))
    r = run(["simulate", d / "case.toml", "--out", d / "signals.h5"])
    assert r.returncode == 0, r.stderr
    return d


def random_kappa_file(case, path, seed=0, scale=None):
    """kappa = exp(0.3 N(0,1)) um/ms on every face (breaks the grid's symmetric degeneracies),
    optionally multiplied by `scale` (F,)."""
    with h5py.File(case / "signals.h5") as f:
        faces, vertices = f["faces"][:], f["vertices"][:]
    kappa = np.exp(0.3 * np.random.default_rng(seed).standard_normal(len(faces)))
    if scale is not None:
        kappa = kappa * scale
    write_kappa(path, kappa, faces, vertices)
    return kappa


def read_result(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


# -- subprocess tests ------------------------------------------------------------------------------

@pytest.mark.serial_only
def test_objective_gradient_matches_cli_finite_differences(case):
    """Reference: central finite differences of the `objective` value, each from two further
    runs of the command with kappa files perturbed on one face (the adjoint is never used)."""
    kfile = case / "k0.h5"
    kappa = random_kappa_file(case, kfile, seed=1)
    out = case / "r0.h5"
    r = run(["objective", case / "case.toml", "--target", case / "signals.h5", "--kappa", kfile,
             "--out", out])
    assert r.returncode == 0, r.stderr
    assert "J = " in r.stdout and "modes" in r.stdout
    data, attrs = read_result(out)
    grad, K = data["gradient"], int(attrs["modes"])
    assert attrs["model"] == "reduced" and attrs["normalisation"] == "reference" and K > 10
    assert np.array_equal(data["kappa_um_per_ms"], kappa)
    np.testing.assert_allclose(data["gradient_log10"], grad * kappa * math.log(10.0),
                               rtol=1e-14, atol=0)
    assert json.loads(attrs["counters"])["adjoint"] == 1
    # the faces with the largest sensitivity (interior faces: the outer ones are Neumann)
    faces = np.argsort(-np.abs(grad))[:2]
    assert np.all(data["active"][faces] == 1)
    eps = 1e-3
    for f in faces:
        values = []
        for sign in (1.0, -1.0):
            scale = np.ones_like(kappa)
            scale[f] = 1.0 + sign * eps
            kf = case / f"k_{f}_{sign:+.0f}.h5"
            random_kappa_file(case, kf, seed=1, scale=scale)
            o = case / f"r_{f}_{sign:+.0f}.h5"
            rr = run(["objective", case / "case.toml", "--target", case / "signals.h5",
                      "--kappa", kf, "--modes", K, "--out", o])
            assert rr.returncode == 0, rr.stderr
            values.append(read_result(o)[0]["objective"])
        fd = (values[0] - values[1]) / (2.0 * eps * kappa[f])
        assert abs(fd - grad[f]) <= 1e-5 * abs(grad[f]), (f, fd, grad[f])


@pytest.mark.serial_only
@pytest.mark.parametrize("model, config", [("reduced", "case.toml"), ("full", "case_own.toml")])
def test_taylor_command_passes(case, model, config):
    """Reference: Taylor remainders of the command's own objective values in a seeded random
    log-kappa direction: second order (rates ~2) for an exact gradient, first order without."""
    js = case / f"taylor_{model}.json"
    r = run(["taylor", case / config, "--target", case / "signals.h5", "--model", model,
             "--seed", "3", "--h0", "1e-2", "--halvings", "4", "--json", js])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    res = json.loads(js.read_text())
    assert res["model"] == model and res["passed"] is True
    assert res["normalisation"] == ("own" if model == "full" else "reference")
    assert len(res["h"]) == 5 and res["h"][0] == 1e-2
    assert min(res["second_order_rates"]) >= 1.9 and max(res["second_order_rates"]) <= 2.2
    assert all(abs(x - 1.0) < 0.1 for x in res["first_order_rates"])
    rows = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(("1.", "5.", "2.", "6."))]
    assert len(rows) == 5


def _bad_kappa_faces(case, path):
    with h5py.File(case / "signals.h5") as f:
        faces, vertices = f["faces"][:], f["vertices"][:]
    faces = faces.copy()
    faces[:4, 2] = faces[:4, 2] + 1000       # four faces that are not in the grid
    write_kappa(path, np.ones(len(faces)), faces, vertices)


def _negative_kappa(case, path):
    with h5py.File(case / "signals.h5") as f:
        scale = np.ones(f["faces"].shape[0])
    scale[10] = -1.0
    random_kappa_file(case, path, scale=scale)


def _target_rows(case, path, drop=1, b_change=None):
    with h5py.File(case / "signals.h5") as src, h5py.File(path, "w") as dst:
        n = src["signal_real"].shape[0]
        for key in src.keys():
            a = src[key][()]
            if a.ndim and a.shape[0] == n and key not in ("faces", "vertices", "membrane",
                                                          "kappa_um_per_ms"):
                a = a[:n - drop]
            if key == "b_s_per_mm2" and b_change is not None:
                a = a.copy()
                a[b_change] *= 1.5
            dst[key] = a
        for k, v in src.attrs.items():
            dst.attrs[k] = v


@pytest.mark.serial_only
@pytest.mark.parametrize("bad, words", [
    ("kappa_faces", ["kfile.h5", "faces", "4 grid faces are absent"]),
    ("kappa_negative", ["kfile.h5", "kappa_um_per_ms", "negative"]),
    ("target_rows", ["target.h5", "mismatched signal tables", "11 rows"]),
    ("target_b", ["target.h5", "mismatched signal tables", "b_s_per_mm2"]),
    ("config_Delta", ["signals.h5", "mismatched signal tables", "Delta_ms"]),
    ("sequence_name", ["case", "--sequences", "no sequence named"]),
])
def test_bad_inputs_exit_2_without_output(case, tmp_path, bad, words):
    """Reference: the issue's list of bad inputs (a kappa file for other faces or with a
    negative value; a target table with a row missing, other b-values, or other timing than the
    config; an unknown sequence): one message naming file and field, exit 2, no output."""
    cfg, target, extra = case / "case.toml", case / "signals.h5", []
    kfile = tmp_path / "kfile.h5"
    if bad == "kappa_faces":
        _bad_kappa_faces(case, kfile)
        extra = ["--kappa", kfile]
    elif bad == "kappa_negative":
        _negative_kappa(case, kfile)
        extra = ["--kappa", kfile]
    elif bad == "target_rows":
        target = tmp_path / "target.h5"
        _target_rows(case, target)
    elif bad == "target_b":
        target = tmp_path / "target.h5"
        _target_rows(case, target, drop=0, b_change=5)
    elif bad == "config_Delta":
        cfg = tmp_path / "case.toml"
        cfg.write_text(config_text(**{"Delta_ms = 20.0": "Delta_ms = 25.0"}))
    elif bad == "sequence_name":
        extra = ["--sequences", "5/20", "10/60"]
    out = tmp_path / "out" / "result.h5"
    # (both commands share the input checks: taylor is run for two of the cases)
    commands = ("objective", "taylor") if bad in ("kappa_negative", "target_rows") else \
        ("objective",)
    for command in commands:
        args = [command, cfg, "--target", target, *extra]
        r = run(args + (["--out", out] if command == "objective" else []))
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        for w in words:
            assert w in r.stderr, r.stderr
        assert r.stdout == ""
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.serial_only
@pytest.mark.parametrize("model", ["reduced", "full"])
def test_two_ranks_give_the_same_gradient(case, model):
    """Reference: the serial run of the same command; 2 ranks (mpiexec under a timeout) must
    give the same objective and gradient to 1e-10 (relative to max |gradient|)."""
    kfile = case / "k_mpi.h5"
    random_kappa_file(case, kfile, seed=4)
    res = []
    for n in (0, 2):
        out = case / f"mpi_{model}_{n}.h5"
        r = run(["objective", case / "case_own.toml", "--target", case / "signals.h5",
                 "--kappa", kfile, "--model", model, "--out", out], mpi=n)
        assert r.returncode == 0, r.stderr[-2000:]
        res.append(read_result(out))
    (a, aa), (b, ba) = res
    assert ba["ranks"] == 2 and aa["modes"] == ba["modes"]
    assert abs(a["objective"] - b["objective"]) <= 1e-10 * abs(a["objective"])
    g = np.max(np.abs(a["gradient"]))
    assert g > 0 and np.max(np.abs(a["gradient"] - b["gradient"])) <= 1e-10 * g
    np.testing.assert_array_equal(a["faces"], b["faces"])


# -- in-process tests (serial and mpiexec -n 2) ----------------------------------------------------

LONG_SEQUENCE = """
[[sequence]]
type = "pgse"
name = "long"
delta_ms = 5.0
Delta_ms = 30.0
b_s_per_mm2 = [0.0, 800.0]
directions = [[0.0, 0.0, 1.0]]
"""


def test_load_targets_splits_rows_per_sequence(tmp_path):
    """Reference: the table written here (rows in config order) and its per-sequence S0."""
    cfg = parse_config(config_text() + LONG_SEQUENCE)
    rng = np.random.default_rng(0)
    sig = [rng.standard_normal(s.num_measurements) + 1j * rng.standard_normal(s.num_measurements)
           for s in cfg.sequences]
    table = table_from_sequences(cfg.sequences, sig, cfg.text, s0=[950.0, 820.5])
    path = tmp_path / "t.h5"
    write_signal_table(path, table)
    targets, s0 = load_targets(path, cfg)
    assert s0 == [950.0, 820.5]
    assert all(np.array_equal(t, s) for t, s in zip(targets, sig))
    # measured data without S0: targets only
    write_signal_table(path, table_from_sequences(cfg.sequences, sig, cfg.text))
    assert load_targets(path, cfg)[1] is None
    # the same b-values and directions but another timing are other measurements
    other = parse_config(config_text().replace("Delta_ms = 20.0", "Delta_ms = 21.0")
                         + LONG_SEQUENCE)
    with pytest.raises(InputError, match="mismatched signal tables: rows of sequence 0") as e:
        load_targets(path, other)
    assert e.value.field == "Delta_ms"
    with pytest.raises(InputError, match="mismatched signal tables: 14 rows"):
        load_targets(path, parse_config(config_text()))


def _tiny_full_model(comm, outer):
    from spinverse_fem.fem.face_space import create_face_space
    from spinverse_fem.fem.operators import BlochTorreyOperators
    from spinverse_fem.forward.full_order import FullOrderModel

    g = box_grid([0.0, 0.0, 0.0], [10.0, 8.0, 6.0], (2, 2, 1))
    space = create_face_space(comm, g.points, g.tets)
    ops = BlochTorreyOperators(space, 2.0, outer=outer)
    kappa = 10.0 ** np.random.default_rng(2).uniform(-1.0, 1.0, space.num_faces)
    ops.set_kappa(kappa)
    return FullOrderModel(ops, 0.5), kappa


SEQS = [Sequence.pgse(2.0, 4.0, [0.0, 1000.0, 3000.0], [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]),
        # a refocused general waveform: complex signals (tests the Im S_bar path)
        Sequence.waveform([(1.0, 1.0), (1.0, 0.0), (0.5, -1.0), (1.0, -0.5)], [2000.0],
                          [[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])]
TARGETS = [np.full(6, 0.7 + 0.02j), np.array([0.5 + 0.1j, 0.6 - 0.05j])]


@pytest.mark.parametrize("normalisation", ["own", "reference"])
def test_full_order_misfit_value_by_hand(comm, normalisation):
    """Reference: J assembled by hand from FullOrderModel.signals of each sequence and, for
    "own", of a separate b = 0 PGSE/waveform sequence with the same timing (not the appended
    row the misfit uses)."""
    from spinverse_fem.inverse.misfit import FullOrderMisfit

    model, kappa = _tiny_full_model(comm, "robin")
    s0_ref = [450.0, 470.0]
    misfit = FullOrderMisfit(model, SEQS, TARGETS, weight=100.0, normalisation=normalisation,
                             s0_reference=s0_ref)
    value = misfit.cost(kappa)
    ref, n = 0.0, 8
    for k, (seq, t) in enumerate(zip(SEQS, TARGETS)):
        S = model.signals(seq, kappa=kappa)
        if normalisation == "own":
            b0 = Sequence(seq.name, seq.segments, [0.0], [[0.0, 1.0, 0.0]])
            s0 = model.signals(b0, kappa=kappa)[0]
            assert abs(s0.imag) <= 1e-12 * abs(s0) and s0.real < model.ops.volume()
            s0 = s0.real
        else:
            s0 = s0_ref[k]
        ref += 100.0 / n * np.sum(np.abs(S / s0 - t) ** 2)
    assert abs(value - ref) <= 1e-12 * ref
    assert misfit.counters.forward == 1


@pytest.mark.parametrize("normalisation, outer", [("own", "robin"), ("reference", "neumann")])
def test_full_order_misfit_taylor(comm, normalisation, outer):
    """Reference: Taylor remainders of FullOrderMisfit.objective in a seeded log-kappa direction
    (second order, rate >= 1.9, only for the exact gradient incl. the S0 sensitivity)."""
    from spinverse_fem.inverse.misfit import FullOrderMisfit
    from spinverse_fem.inverse.taylor import taylor_test

    model, kappa = _tiny_full_model(comm, outer)
    misfit = FullOrderMisfit(model, SEQS, TARGETS, weight=100.0, normalisation=normalisation,
                             s0_reference=[450.0, 470.0])
    rates = taylor_test(misfit, kappa, seed=5, h0=5e-2, halvings=4, multiplicative=True).rates1
    assert min(rates) >= 1.9, rates
    if normalisation == "own":
        # without the S0 term the gradient is wrong: first-order remainders
        class NoS0(FullOrderMisfit):
            def cotangents(self, k):
                return [np.append(c[:-1], 0.0) for c in super().cotangents(k)]

        bad = NoS0(model, SEQS, TARGETS, weight=100.0, normalisation="own")
        rates_bad = taylor_test(bad, kappa, seed=5, h0=5e-2, halvings=4,
                                multiplicative=True).rates1
        assert max(rates_bad) < 1.5, rates_bad
    model.destroy()


def test_taylor_command_exit_1_for_a_wrong_gradient(comm, tmp_path, monkeypatch, capsys):
    """Reference: the command's own pass rule; a gradient scaled by 1.5 (through the misfit the
    command uses) must give first-order remainders and exit code 1, the exact one exit code 0."""
    from spinverse_fem import cli
    from spinverse_fem.inverse.misfit import SignalMisfit

    d = Path(comm.bcast(str(tmp_path), root=0))     # rank 0's folder, shared by every rank
    if comm.rank == 0:
        (d / "case.toml").write_text(config_text("own"))
    comm.Barrier()
    assert cli.main(["simulate", str(d / "case.toml"), "--out", str(d / "s.h5")]) == 0
    comm.Barrier()
    args = ["taylor", str(d / "case.toml"), "--target", str(d / "s.h5"), "--modes", "20",
            "--halvings", "3"]
    assert cli.main(args) == 0
    exact = SignalMisfit.cost_and_gradient

    def scaled(self, kappa):
        J, g = exact(self, kappa)
        return J, 1.5 * g

    monkeypatch.setattr(SignalMisfit, "cost_and_gradient", scaled)
    assert cli.main(args + ["--json", str(d / "t.json")]) == 1
    if comm.rank == 0:
        assert "FAIL" in capsys.readouterr().out
        res = json.loads((d / "t.json").read_text())
        assert res["passed"] is False and res["modes"] <= 20
        assert max(abs(r - 1.0) for r in res["second_order_rates"]) < 0.2
