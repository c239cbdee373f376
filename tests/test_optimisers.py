"""The optimisers through PETSc TAO: Adam as a TAO type (TAOPYTHON context `AdamTao`) against the
plain `Adam` loop, bitwise, on 1 and 2 ranks; blmvm through the same `TaoSegment`; type errors.

The suite also runs under `mpiexec -n 2`: every rank computes the plain (pure numpy, hence
rank-count independent) reference loop itself, so equality on each run is equality across rank
counts; the TAO path also runs on PETSc.COMM_SELF in the same process for a direct 1-rank vs
n-rank comparison.
"""

import dolfinx_solver  # noqa: F401
import numpy as np
import pytest
from petsc4py import PETSc

from spinverse_fem.errors import InputError, SolverError
from spinverse_fem.inverse.optimisers import TAO_PREFIX, Adam, AdamSettings, AdamState, TaoSegment

N = 50
LOWER, UPPER = -2.0, 2.0
# warm-up (3 it) and cosine decay both inside 14 iterations; ||dPhi/dv|| falls from ~4200 to
# ~730 on this start: clip = 1000 is active, then not (asserted), both branches exercised
SETTINGS = AdamSettings(lr=0.3, warmup=3, final_factor=0.1, clip=1000.0, betas=(0.9, 0.999),
                        eps=1e-8)
X0 = np.linspace(-1.9, 1.9, N)


def rosenbrock(x):
    """Extended Rosenbrock sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2 and its gradient."""
    d = x[1:] - x[:-1] ** 2
    f = float(np.sum(100.0 * d**2 + (1.0 - x[:-1]) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * x[:-1] * d - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * d
    return f, g


class Weighted:
    """w * rosenbrock with w changed by `before_iteration`, as the driver changes prior weights
    there: a missing, extra or misplaced call changes the iterates."""

    def __init__(self):
        self.w, self.calls = 1.0, 0

    def before_iteration(self, x):
        self.calls += 1
        self.w = 1.0 + 0.01 * self.calls

    def __call__(self, x):
        f, g = rosenbrock(x)
        return self.w * f, self.w * g


def frozen_step(adam, state, grad_x, i, n):
    """`Adam.step` as it was before the TAO refactoring (commit 6ed830a), kept verbatim in
    arithmetic so that the refactoring itself is checked too."""
    sig = 1.0 / (1.0 + np.exp(-state.v))
    g = grad_x * (adam.upper - adam.lower) * sig * (1.0 - sig)
    norm = float(np.linalg.norm(g))
    if adam.clip and norm > adam.clip:
        g = g * (adam.clip / norm)
    state.t += 1
    state.m = adam.b1 * state.m + (1 - adam.b1) * g
    state.s = adam.b2 * state.s + (1 - adam.b2) * g * g
    mhat = state.m / (1 - adam.b1**state.t)
    shat = state.s / (1 - adam.b2**state.t)
    state.v = state.v - adam.learning_rate(i, n) * mhat / (np.sqrt(shat) + adam.eps)


def plain_loop(settings, iterations, stage_length, step=None):
    """The driver's pre-TAO Adam path (_adam_segment): x = x_of(v); before_iteration(x);
    cost and gradient; record; step. Returns records [(x, Phi)], final x, state, v-grad norms."""
    adam = Adam.from_settings(LOWER, UPPER, settings)
    fun = Weighted()
    state = adam.start(X0)
    records, norms = [], []
    for i in range(iterations):
        x = adam.x_of(state.v)
        fun.before_iteration(x)
        f, grad = fun(x)
        records.append((x, f))
        norms.append(float(np.linalg.norm(adam.v_gradient(state.v, grad))))
        (step or adam.step)(state, grad, i, stage_length)
    return records, adam.x_of(state.v), state, norms


def checkpointed(state):
    """What a checkpoint write + read gives back (h5 stores the float64 bytes)."""
    return AdamState(v=np.frombuffer(state.v.tobytes()).copy(),
                     m=np.frombuffer(state.m.tobytes()).copy(),
                     s=np.frombuffer(state.s.tobytes()).copy(), t=int(state.t))


def tao_adam(comm, segments, stage_length, tao_type="adam", settings=SETTINGS):
    """Adam through TaoSegment, one new segment (new TAO) per entry of `segments`, the state
    handed over through `checkpointed` as a resumed run would."""
    fun = Weighted()
    records, state, x, stage_iteration, reasons = [], None, X0, 0, []
    for n in segments:
        seg = TaoSegment(comm, N, LOWER, UPPER, tao_type=tao_type, adam=settings)
        x, reason, state = seg.run(
            x, fun, n, monitor=lambda it, xm, f, gnorm: records.append((it, xm, f, gnorm)),
            before_iteration=fun.before_iteration, adam_state=state,
            stage_iteration=stage_iteration, stage_length=stage_length)
        reasons.append(reason)
        stage_iteration += n
        state = checkpointed(state)
    return records, x, state, reasons


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and np.array_equal(a, b), np.max(np.abs(a - b))


@pytest.mark.parametrize("which", ["self", "world"])
def test_tao_adam_is_bitwise_the_plain_adam_loop(which):
    """Reference: the plain Adam loop of the driver (start / step / x_of, `plain_loop`), and the
    pre-refactoring step arithmetic (`frozen_step`). Two segments of 7 iterations in one stage
    of 14, state handed over through a checkpoint round trip; np.array_equal, not allclose."""
    comm = PETSc.COMM_SELF if which == "self" else PETSc.COMM_WORLD
    ref, x_ref, st_ref, norms = plain_loop(SETTINGS, 14, 14)
    frozen, x_frozen, st_frozen, _ = plain_loop(SETTINGS, 14, 14, step=lambda s, g, i, n:
                                                frozen_step(Adam.from_settings(
                                                    LOWER, UPPER, SETTINGS), s, g, i, n))
    assert any(v > SETTINGS.clip for v in norms) and any(v < SETTINGS.clip for v in norms)
    assert_same_bits(x_frozen, x_ref)

    records, x, state, reasons = tao_adam(comm, [7, 7], 14)
    assert reasons == ["DIVERGED_MAXITS"] * 2
    # the monitor sees x_k before its step, with Phi(x_k); it = 0..6 in each segment
    assert [r[0] for r in records] == list(range(7)) * 2
    for (it, xm, f, gnorm), (xr, fr), nr in zip(records, ref, norms):
        assert_same_bits(xm, xr)
        assert f == fr and gnorm == nr
    assert_same_bits(x, x_ref)
    for k in ("v", "m", "s"):
        assert_same_bits(getattr(state, k), getattr(st_ref, k))
    assert state.t == st_ref.t == 14
    assert np.all((x > LOWER) & (x < UPPER))
    # every rank holds the same iterate
    gathered = PETSc.COMM_WORLD.tompi4py().allgather(x.tobytes())
    assert all(b == gathered[0] for b in gathered)


def test_tao_adam_on_self_equals_world():
    """Reference: the same TAO Adam on PETSc.COMM_SELF (one rank's layout) in this process;
    under mpiexec -n 2 the COMM_WORLD run distributes the Vec over 2 ranks."""
    a = tao_adam(PETSc.COMM_SELF, [5, 4], 9)
    b = tao_adam(PETSc.COMM_WORLD, [5, 4], 9)
    assert_same_bits(a[1], b[1])
    for (_, xa, fa, ga), (_, xb, fb, gb) in zip(a[0], b[0]):
        assert_same_bits(xa, xb)
        assert fa == fb and ga == gb


def with_options(values: dict):
    """Set `-spinverse_*` options for the duration of a block (the options database is global
    to the process, so every test must leave it as it found it)."""
    class _Ctx:
        def __enter__(self):
            opts = PETSc.Options(TAO_PREFIX)
            for k, v in values.items():
                opts.setValue(k, v)

        def __exit__(self, *exc):
            opts = PETSc.Options(TAO_PREFIX)
            for k in values:
                opts.delValue(k)
    return _Ctx()


def test_option_selects_adam_and_its_settings():
    """Reference: the plain Adam loop with lr = 0.05 and 3 iterations; the segment is built as
    blmvm and `-spinverse_tao_type adam -spinverse_tao_max_it 3 -spinverse_tao_adam_lr 0.05`
    must turn it into that Adam run."""
    settings = AdamSettings(**{**SETTINGS.__dict__, "lr": 0.05})
    ref, x_ref, st_ref, _ = plain_loop(settings, 3, 3)
    with with_options({"tao_type": "adam", "tao_max_it": "3", "tao_adam_lr": "0.05"}):
        records, x, state, reasons = tao_adam(PETSc.COMM_WORLD, [10], None, tao_type="blmvm")
        # the alias is restored after TaoSetFromOptions
        assert PETSc.Options(TAO_PREFIX).getString("tao_type") == "adam"
    assert len(records) == 3 and reasons == ["DIVERGED_MAXITS"]
    assert_same_bits(x, x_ref)
    assert_same_bits(state.v, st_ref.v) and state.t == 3


def test_blmvm_through_taosegment_finds_bounded_quadratic_minimiser():
    """Reference: the analytic minimiser of 0.5 sum_i d_i (x_i - c_i)^2 on [-2, 2]^n, which is
    clip(c, -2, 2) (d_i > 0, separable); half of the c_i lie outside the bounds."""
    n = 40
    d = 1.0 + np.arange(n) / n
    c = np.linspace(-3.0, 3.0, n)

    def fun(x):
        return float(0.5 * np.sum(d * (x - c) ** 2)), d * (x - c)

    its = []
    seg = TaoSegment(PETSc.COMM_WORLD, n, LOWER, UPPER, tao_type="blmvm")
    x, reason, state = seg.run(np.zeros(n), fun, 200,
                               monitor=lambda it, xm, f, g: its.append(it))
    assert reason.startswith("CONVERGED"), reason
    assert state is None
    assert np.all((x >= LOWER) & (x <= UPPER))
    np.testing.assert_allclose(x, np.clip(c, LOWER, UPPER), rtol=0, atol=1e-6)
    assert its and its[0] == 1 and its == list(range(1, len(its) + 1))


def test_unknown_type_is_an_input_error():
    """Reference: spinverse_fem.errors.InputError naming the optimiser option, whether the type
    comes from the code (tao_type) or from -spinverse_tao_type."""
    def fun(x):
        return float(np.sum(x**2)), 2 * x

    seg = TaoSegment(PETSc.COMM_WORLD, 4, LOWER, UPPER, tao_type="no_such_tao")
    with pytest.raises(InputError, match="optimizer: tao_type: unknown optimiser 'no_such_tao'"):
        seg.run(np.zeros(4), fun, 3)
    with with_options({"tao_type": "nope"}):
        seg = TaoSegment(PETSc.COMM_WORLD, 4, LOWER, UPPER, tao_type="blmvm")
        with pytest.raises(InputError, match="-spinverse_tao_type: unknown optimiser 'nope'"):
            seg.run(np.zeros(4), fun, 3)


@pytest.mark.parametrize("tao_type", ["adam", "blmvm"])
def test_callback_errors_come_through_unwrapped(tao_type):
    """Reference: the exception the objective raised (petsc4py would otherwise turn it into
    PETSc.Error(101)), so the command line still reports a SolverError as one message."""
    def fun(x):
        raise SolverError("eigensolver did not converge")

    seg = TaoSegment(PETSc.COMM_WORLD, 4, LOWER, UPPER, tao_type=tao_type)
    with pytest.raises(SolverError, match="eigensolver"):
        seg.run(np.zeros(4), fun, 3)


def test_adam_stops_on_tao_convergence_test():
    """Reference: TAO's default convergence test (||g|| <= gatol, g = dPhi/dv for Adam): with
    -spinverse_tao_gatol above the first gradient norm, Adam stops at iteration 0 before its
    first step, x = x(v0), state untouched, reason CONVERGED_GATOL."""
    adam = Adam.from_settings(LOWER, UPPER, SETTINGS)
    with with_options({"tao_gatol": "1e10"}):
        records, x, state, reasons = tao_adam(PETSc.COMM_WORLD, [5], 14)
    assert reasons == ["CONVERGED_GATOL"] and len(records) == 1 and state.t == 0
    assert_same_bits(x, adam.x_of(adam.start(X0).v))
