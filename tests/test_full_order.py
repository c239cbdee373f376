"""Tests of the full-order Crank-Nicolson model and its discrete adjoint
(spinverse_fem.forward.full_order).

Each test names its independent reference. Runs serially and under `mpiexec -n 2` (the 1-vs-2-rank
comparison is serial-only: it launches its own mpiexec).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import dolfinx_solver  # noqa: F401  (before dolfinx/petsc4py)
import numpy as np
import pytest
from mpi4py import MPI

from spinverse_fem.config.protocol import Sequence
from spinverse_fem.fem.face_space import create_face_space
from spinverse_fem.fem.operators import BlochTorreyOperators
from spinverse_fem.forward.full_order import FullOrderModel, segment_steps
from spinverse_fem.meshes.box import box_grid
from spinverse_fem.meshes.paper import paper_meshes_dir

PAPER_GRID = paper_meshes_dir() / "019_torus_majr10_minr6.npz"
PARITY_SCRIPT = Path(__file__).parent / "mpi_scripts" / "full_order_parity.py"
D = 2.0  # um^2/ms


def _box_space(comm, upper=(10.0, 8.0, 6.0), cells=(2, 2, 1)):
    g = box_grid([0.0, 0.0, 0.0], upper, cells)
    return create_face_space(comm, g.points, g.tets)


def _gather_dense(A, comm) -> np.ndarray:
    """The global matrix (rows in PETSc numbering) on every rank."""
    r0, r1 = A.getOwnershipRange()
    return np.vstack(comm.allgather(A.getValues(range(r0, r1), range(A.getSize()[1]))))


@pytest.fixture(scope="module")
def paper_space():
    data = np.load(PAPER_GRID)
    return create_face_space(MPI.COMM_WORLD, data["points"].T, data["elements"].T), data


def test_segment_steps_hit_segment_ends():
    """Reference: hand-counted ceil(d / dt) steps (a 10 / 0.1 ratio must not round up to 101)."""
    grid = segment_steps(((10.0, 1.0), (0.0, 0.0), (2.5, 0.0), (10.0, -1.0)), 0.1)
    assert [n for _, n, _ in grid] == [100, 25, 100]
    assert [a for _, _, a in grid] == [1.0, 0.0, -1.0]
    assert sum(dt * n for dt, n, _ in grid) == pytest.approx(22.5, rel=1e-15)
    assert [n for _, n, _ in segment_steps(((1.3, 1.0), (1.3, -1.0)), 0.5)] == [3, 3]


@pytest.mark.parametrize("outer", ["neumann", "robin"])
def test_matches_dense_complex_crank_nicolson(outer):
    """Reference: complex-arithmetic Crank-Nicolson with numpy dense solves on the gathered
    M, L, J (no real block form, no transpose trick), on its own ceil-step time grid; a general
    refocused waveform with amplitudes +-1, +-0.5 and 0 and durations that are no step multiples."""
    comm = MPI.COMM_WORLD
    space = _box_space(comm)
    ops = BlochTorreyOperators(space, D, outer=outer)
    rng = np.random.default_rng(7)
    ops.set_kappa(10.0 ** rng.uniform(-1.0, 1.0, space.num_faces))
    segments = [(1.3, 1.0), (0.4, 0.0), (0.9, -0.5), (0.85, -1.0)]  # int f dt = 0
    seq = Sequence.waveform(segments, [0.0, 2000.0], [[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    time_step = 0.35
    S = FullOrderModel(ops, time_step, batch_size=2).signals(seq)

    Md, Ld = _gather_dense(ops.M, comm), _gather_dense(ops.L, comm)
    Jd = [_gather_dense(J, comm) for J in ops.J]
    q = seq.q_per_um_ms()
    ones = np.ones(Md.shape[0])
    ref = []
    for c in range(seq.num_measurements):
        G = sum(seq.directions[c][i] * Jd[i] for i in range(3))
        m = ones.astype(complex)
        for duration, amp in segments:
            n = math.ceil(round(duration / time_step, 9))
            dt = duration / n
            H = Ld + 1j * q[c] * amp * G
            lhs, rhs = Md + 0.5 * dt * H, Md - 0.5 * dt * H
            for _ in range(n):
                m = np.linalg.solve(lhs, rhs @ m)
        ref.append(ones @ Md @ m)
    ref = np.array(ref)
    assert np.max(np.abs(S - ref)) <= 1e-12 * np.max(np.abs(ref))
    # the b = 0 rows (two directions) are simulated once and must still both be filled
    assert S[0] == S[1]


def test_q0_conserves_volume_on_sealed_box():
    """Reference: the box's geometric volume 10 x 8 x 6 um^3 (with q = 0, neumann outer faces and
    L 1 = 0, CN conserves 1^T M m exactly)."""
    space = _box_space(MPI.COMM_WORLD)
    ops = BlochTorreyOperators(space, D, outer="neumann")
    ops.set_kappa(np.full(space.num_faces, 100.0))
    seq = Sequence.pgse(3.0, 7.0, [0.0], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    S = FullOrderModel(ops, 0.7).signals(seq)
    assert np.allclose(S, 480.0, rtol=1e-12, atol=0.0)


def test_second_order_convergence_in_time():
    """Reference: Richardson extrapolation of the same solver (S* = S_h + (S_h - S_2h) / 3 at the
    finest step); the errors against S* over four step sizes must fall at rate >= 1.8."""
    space = _box_space(MPI.COMM_WORLD, upper=(10.0, 10.0, 10.0), cells=(2, 2, 2))
    ops = BlochTorreyOperators(space, D, outer="neumann")
    ops.set_kappa(np.full(space.num_faces, 100.0))  # open: kappa h / D = 250
    g = np.array([1.0, 0.3, 0.2]) / np.linalg.norm([1.0, 0.3, 0.2])
    seq = Sequence.pgse(4.0, 8.0, [2000.0], [g])
    steps = [0.5, 0.25, 0.125, 0.0625, 0.03125]
    S = np.array([FullOrderModel(ops, h).signals(seq)[0] for h in steps])
    assert abs(S[-1]) < 0.5 * ops.volume()  # the gradient really attenuates
    S_star = S[-1] + (S[-1] - S[-2]) / 3.0
    err = np.abs(S[:-1] - S_star)
    rate = np.polyfit(np.log(steps[:-1]), np.log(err), 1)[0]
    assert rate >= 1.8, f"CN convergence rate {rate:.3f}, errors {err}"


@pytest.mark.parametrize("outer", ["neumann", "robin"])
def test_taylor_remainder_log_kappa(paper_space, outer):
    """Reference: the objective itself. With J(k) = sum_c |S_c / V - T_c|^2 (complex targets T)
    and a seeded random direction d in log kappa, |J(k e^{h d}) - J(k) - h <kappa_bar k, d>|
    must fall at second order over four halvings of h (first order if the gradient were wrong)."""
    space, data = paper_space
    ops = BlochTorreyOperators(space, D, outer=outer)
    rng = np.random.default_rng(11 if outer == "neumann" else 12)
    kappa = np.full(space.num_faces, 5.0)
    membrane = space.faces.lookup(np.sort(data["boundary_faces"].T, axis=1))
    kappa[membrane] = 0.05
    kappa *= np.exp(0.3 * rng.standard_normal(space.num_faces))
    # Not PGSE: PGSE signals are real (the propagator is M-self-adjoint up to s -> -s), which
    # would leave the Im S_bar path untested. Amplitudes +1 / -1 share one factorisation
    # (transposed solves); the 0.5 ms segment gets its own step size.
    segments = [(1.0, 1.0), (1.0, 0.0), (0.5, -1.0), (1.0, -0.5)]
    seq = Sequence.waveform(segments, [0.0, 1000.0], [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    model = FullOrderModel(ops, 1.0)
    V = ops.volume()
    T = 0.8 * np.exp(0.3j * np.arange(seq.num_measurements))

    def objective(k):
        return float(np.sum(np.abs(model.signals(seq, kappa=k) / V - T) ** 2))

    J0 = objective(kappa)
    S = model.signals(seq, kappa=kappa)
    assert np.max(np.abs(S.imag)) > 1e-5 * np.max(np.abs(S))  # round-off would be 1e-16
    S_bar = 2.0 * (S / V - T) / V  # dJ/dRe S + i dJ/dIm S
    S2, kappa_bar = model.signals_and_vjp(seq, S_bar, kappa=kappa)
    # parallel MUMPS is not bit-reproducible from call to call
    assert np.max(np.abs(S - S2)) <= 1e-12 * np.max(np.abs(S))
    d = rng.standard_normal(space.num_faces)
    slope = float(np.dot(kappa_bar * kappa, d))
    hs = 0.02 / 2.0 ** np.arange(5)
    rem = np.array([abs(objective(kappa * np.exp(h * d)) - J0 - h * slope) for h in hs])
    rates = np.log2(rem[:-1] / rem[1:])
    assert np.all(rates >= 1.9), f"Taylor rates {rates}, remainders {rem}"
    # the first-order term dominates: the test is not passing on a vanishing gradient
    assert abs(hs[-1] * slope) > 10.0 * rem[-1]
    if outer == "neumann":
        outer_faces = space.faces.cells[:, 1] < 0
        assert np.all(kappa_bar[outer_faces] == 0.0)
        assert np.any(kappa_bar[~outer_faces] != 0.0)


def test_adjoint_linear_and_checkpointing_consistent(paper_space):
    """Reference: the store-everything adjoint with one batch, and linearity in S_bar. Splitting
    S_bar into two parts with zero rows (partly skipped backward sweeps) and running with
    checkpoint interval 4 and batch size 1 must give the same kappa_bar to round-off."""
    space, _ = paper_space
    ops = BlochTorreyOperators(space, D, outer="robin")
    rng = np.random.default_rng(5)
    kappa = 10.0 ** rng.uniform(-1.0, 1.0, space.num_faces)
    seq = Sequence.pgse(2.0, 5.0, [0.0, 800.0], [[0.0, 0.0, 1.0], [0.8, 0.6, 0.0]])
    n = seq.num_measurements
    S_bar = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    mask = np.array([True, False, True, False])
    S_ref, g_ref = FullOrderModel(ops, 0.5).signals_and_vjp(seq, S_bar, kappa=kappa)
    other = FullOrderModel(ops, 0.5, checkpoint_interval=4, batch_size=1)
    S1, g1 = other.signals_and_vjp(seq, np.where(mask, S_bar, 0.0))
    _, g2 = other.signals_and_vjp(seq, np.where(mask, 0.0, S_bar))
    scale = np.max(np.abs(g_ref))
    assert scale > 0.0
    assert np.max(np.abs(S1 - S_ref)) <= 1e-12 * np.max(np.abs(S_ref))
    assert np.max(np.abs(g1 + g2 - g_ref)) <= 1e-11 * scale
    _, g0 = other.signals_and_vjp(seq, np.zeros(n))
    assert np.all(g0 == 0.0)


def test_solver_option_prefix_and_transposed_solve_guard():
    """Reference: the default MUMPS run. Through the spinverse_cn_ prefix switch to SuperLU_DIST,
    whose transposed solves PETSc 3.25 gets silently wrong: the model must either refuse it
    (SolverError) or reproduce the MUMPS signals; PETSc's own LU (serial) must reproduce them."""
    from petsc4py import PETSc

    from spinverse_fem.errors import SolverError

    comm = MPI.COMM_WORLD
    space = _box_space(comm)
    ops = BlochTorreyOperators(space, D, outer="robin")
    ops.set_kappa(np.full(space.num_faces, 3.0))
    seq = Sequence.pgse(2.0, 3.0, [1500.0], [[0.0, 0.6, 0.8]])
    ref = FullOrderModel(ops, 0.5).signals(seq)
    opts = PETSc.Options()
    key = "spinverse_cn_pc_factor_mat_solver_type"
    solvers = ["superlu_dist"] + (["petsc"] if comm.size == 1 else [])
    try:
        for solver in solvers:
            opts[key] = solver
            try:
                S = FullOrderModel(ops, 0.5).signals(seq)
            except SolverError:
                assert solver == "superlu_dist"
                continue
            assert np.max(np.abs(S - ref)) <= 1e-10 * np.max(np.abs(ref)), solver
    finally:
        opts.delValue(key)


@pytest.mark.serial_only
def test_one_vs_two_ranks(tmp_path):
    """Reference: the serial run of the same case (tests/mpi_scripts/full_order_parity.py) against
    `mpiexec -n 2`: signals and gradient agree to 1e-10 (relative to their largest entry)."""
    spec = importlib.util.spec_from_file_location("full_order_parity", PARITY_SCRIPT)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    serial = parity.compute(MPI.COMM_WORLD)

    out = tmp_path / "parity.npz"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = ["timeout", "300", str(mpiexec), "-n", "2", sys.executable, str(PARITY_SCRIPT), str(out)]
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=330)
    assert proc.returncode == 0, proc.stderr[-3000:]
    par = np.load(out)
    for key in ("S", "kappa_bar"):
        ref = serial[key]
        assert par[key].shape == ref.shape
        assert np.max(np.abs(par[key] - ref)) <= 1e-10 * np.max(np.abs(ref)), key
