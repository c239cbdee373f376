"""The reduced model on a frozen (Galerkin) basis and its exact, solve-free gradient.

References: the eigenbasis misfit at the refresh point (the two models coincide there); a dense
Galerkin model written out here (numpy eigh of the whole pencil at kappa_0, the projection
P^T L(kappa) P at another kappa, scipy expm of the K x K PGSE propagators: no package
propagator) for the value and, by central differences of that dense model, for directional
derivatives; Taylor remainders (second order) on the paper grid, also at its exactly degenerate
uniform start; an uninterrupted inversion for the driver's refresh schedule and resume.
Runs serially and under mpiexec -n 2 (the dense reference serially only).
"""

import re

import numpy as np
import pytest
import scipy.linalg

from spinverse_fem.config import parse_config
from spinverse_fem.inverse.case import Case
from spinverse_fem.inverse.driver import Inversion
from spinverse_fem.inverse.frozen_basis import FrozenBasisMisfit
from spinverse_fem.inverse.misfit import ReducedMisfit
from spinverse_fem.inverse.taylor import taylor_test
from tests.test_adjoint import SEQ, WAVE, box_model, paper_model, perturbed
from tests.test_inversion import sphere_text


def dense(A):
    n = A.getSize()[0]
    return A.getValues(range(n), range(n))


def dense_galerkin_misfit(ops, P, kappa, seq, target):
    """J = sum |S/S0 - T|^2 / n of the PGSE sequence `seq` (two pulses delta, separation
    Delta) for the Galerkin model on span(P) at kappa: S_c = nu0^T E3 E2 E1 nu0 with
    E1 = expm(-delta (Lr + i q g.W)), E2 = expm(-(Delta - delta) Lr), E3 = expm(-delta (Lr -
    i q g.W)); S0 = nu0^T expm(-TE Lr) nu0 ("own" normalisation)."""
    ops.set_kappa(kappa)
    Lr = P.T @ dense(ops.L) @ P
    Lr = 0.5 * (Lr + Lr.T)
    W = [P.T @ dense(J) @ P for J in ops.J]
    nu0 = P.T @ (dense(ops.M) @ np.ones(P.shape[0]))
    (h1, _), (h2, _), (h3, _) = seq.segments
    S = []
    for q, g in zip(seq.q_per_um_ms(), seq.directions):
        G = sum(gi * Wi for gi, Wi in zip(g, W))
        E1 = scipy.linalg.expm(-h1 * (Lr + 1j * q * G))
        E2 = scipy.linalg.expm(-h2 * Lr)
        E3 = scipy.linalg.expm(-h3 * (Lr - 1j * q * G))
        S.append(nu0 @ (E3 @ (E2 @ (E1 @ nu0))))
    s0 = nu0 @ scipy.linalg.expm(-seq.echo_time_ms * Lr) @ nu0
    r = np.array(S) / s0 - target
    return float(np.sum(np.abs(r) ** 2) / r.size)


def test_frozen_equals_eigenbasis_model_at_the_refresh_point(comm):
    """Reference: the eigenbasis misfit at the same kappa and K: the Galerkin matrix of the
    eigenbasis is diag(lambda), so the values agree to round-off (1e-12)."""
    model, problem = paper_model(comm)
    seqs = [SEQ, WAVE]
    targets = [np.full(s.num_measurements, 0.4 + 0.05j) for s in seqs]
    kappa = perturbed(problem, seed=2)
    common = dict(weight=100.0, normalisation="own", num_modes=40)
    ref = ReducedMisfit(model, seqs, targets, **common).cost(kappa)
    frozen = FrozenBasisMisfit(model, seqs, targets, **common)
    assert frozen.refresh(kappa) == 40
    assert frozen.cost(kappa) == pytest.approx(ref, rel=1e-12)
    # away from it the model differs from the eigenbasis model (it is another model) ...
    k1 = perturbed(problem, seed=3, spread=0.1) * kappa / problem.kappa
    other = ReducedMisfit(model, seqs, targets, **common).cost(k1)
    assert frozen.cost(k1) != pytest.approx(other, rel=1e-6)
    assert frozen.refreshes == 1          # ... with no further eigen-solve
    assert frozen.counters.eigen_solves == 1


def test_frozen_value_and_derivatives_equal_dense_galerkin_reference(comm):
    """Reference: dense_galerkin_misfit above (scipy expm, no package propagator) on a tiny box:
    the value at kappa_1 != kappa_0 to 1e-10, and the directional derivatives of the exact
    gradient along three random directions against Richardson-extrapolated central
    differences of the dense model (h = 1e-3, 2e-3 in log kappa: truncation ~h^4, expm
    round-off ~1e-13 / h) to 1e-6 relative."""
    if comm.size > 1:
        pytest.skip("dense reference needs the whole matrix on one rank")
    model, problem = box_model(comm, "robin", cells=(2, 1, 1))
    ops = model.ops
    K = 12
    k0 = perturbed(problem, seed=5, spread=0.5)
    ops.set_kappa(k0)
    lam, Phi = scipy.linalg.eigh(dense(ops.L), dense(ops.M))
    P = Phi[:, :K]
    target = np.full(SEQ.num_measurements, 0.3)
    misfit = FrozenBasisMisfit(model, [SEQ], [target], weight=1.0, normalisation="own",
                               num_modes=K)
    misfit.refresh(k0)
    k1 = k0 * np.exp(0.4 * np.random.default_rng(6).standard_normal(k0.size))
    value, grad = misfit.cost_and_gradient(k1)
    ref = dense_galerkin_misfit(ops, P, k1, SEQ, target)
    assert value == pytest.approx(ref, rel=1e-10)
    rng = np.random.default_rng(7)
    def central(d, h):
        return (dense_galerkin_misfit(ops, P, k1 * np.exp(h * d), SEQ, target)
                - dense_galerkin_misfit(ops, P, k1 * np.exp(-h * d), SEQ, target)) / (2 * h)

    for _ in range(3):
        d = rng.standard_normal(k1.size)
        fd = (4.0 * central(d, 1e-3) - central(d, 2e-3)) / 3.0     # Richardson: O(h^4)
        assert np.dot(grad * k1, d) == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("normalisation", ["reference", "own"])
def test_taylor_frozen_misfit(comm, normalisation):
    """Reference: Taylor remainders of the frozen model in log kappa (rate >= 1.95 over four
    halvings), basis frozen at one kappa and tested at another (20 % log-normal apart)."""
    model, problem = paper_model(comm)
    seqs = [SEQ, WAVE]
    targets = [np.full(s.num_measurements, 0.4 + 0.05j) for s in seqs]
    misfit = FrozenBasisMisfit(model, seqs, targets, weight=100.0, normalisation=normalisation,
                               s0_reference=[900.0, 950.0], num_modes=40)
    misfit.refresh(perturbed(problem, seed=8))
    res = taylor_test(misfit, perturbed(problem, seed=9), seed=1, h0=1e-2, halvings=4,
                      multiplicative=True)
    print(f"frozen/{normalisation}: rates {res.rates1}")
    assert min(res.rates1) >= 1.95
    assert misfit.counters.eigen_solves == 1


def test_taylor_frozen_at_degenerate_uniform_start(comm):
    """Reference: Taylor remainders at the paper start (kappa = 1 um/ms everywhere: exactly
    degenerate eigenvalues) with the basis frozen there: no gap enters the frozen model, so
    the remainders are second order from the first step (rate >= 1.95, no extra halvings)."""
    model, problem = paper_model(comm)
    misfit = FrozenBasisMisfit(model, [SEQ], [np.full(SEQ.num_measurements, 0.5)],
                               weight=100.0, normalisation="own", num_modes=60)
    kappa = np.ones(problem.faces.num_faces)
    res = taylor_test(misfit, kappa, seed=3, h0=1e-2, halvings=4, multiplicative=True)
    assert min(res.rates1) >= 1.95, res.rates1


def frozen_sphere_config(iterations=12, every=4, refresh=3, step=0.0):
    text = sphere_text("adam", iterations, every)
    text = re.sub(r"^\[inversion\]$", f'[inversion]\nbasis = "frozen"\n'
                  f"basis_refresh_every = {refresh}\nbasis_refresh_step = {step}", text,
                  flags=re.M)
    return parse_config(text)


@pytest.mark.parametrize("step", [0.0, 0.05])
def test_frozen_inversion_refreshes_on_schedule_and_resumes_exactly(comm, step):
    """Reference: an uninterrupted frozen-basis inversion (2 stages x 12 iterations, refresh
    every 3, checkpoints every 4). It refreshes at stage iterations 0, 3, 6, 9 of each stage
(twice at one point if the cut closed there and K was re-selected),
    and a run stopped at its second checkpoint (iteration 8: inside a refresh interval, basis
    from iteration 6) and resumed from the saved state ends on the same kappa (serially
    bit-for-bit). With basis_refresh_step 0.05 it also refreshes whenever a face moved more
    than 0.05 in log10 kappa since the last refresh: more refreshes, the same exact resume."""
    cfg = frozen_sphere_config(step=step)
    assert cfg.inversion.basis == "frozen"

    def run(state=None, checkpoint=None):
        case = Case(comm, cfg)
        inv = Inversion(case, log=lambda s: None)
        calls = []
        orig = case.stage_model

        def stage_model(*a, **k):
            m = orig(*a, **k)
            refresh = m.misfit.refresh
            m.misfit.refresh = lambda kappa: calls.append(kappa.tobytes()) or refresh(kappa)
            return m

        case.stage_model = stage_model
        st = inv.run(state or inv.initial_state(), checkpoint=checkpoint)
        # refresh points (a re-selection of K refreshes twice at the same point)
        return st, [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]

    full, calls = run()
    assert full.done and full.global_iteration == 24
    if step == 0.0:
        assert len(calls) == 8, len(calls)
    else:
        assert len(calls) > 8, len(calls)
    saved = {}

    class Stop(Exception):
        pass

    def stop_at_second(st):
        import copy

        if st.global_iteration == 8:
            saved["state"] = copy.deepcopy(st)
            raise Stop

    with pytest.raises(Stop):
        run(checkpoint=stop_at_second)
    st = saved["state"]
    assert st.basis_x is not None
    basis_iteration = st.basis_iteration
    resumed, calls_resumed = run(state=st)
    if step == 0.0:
        # the interrupted interval's basis (at iteration 6), then 9, then the second stage's 4
        assert basis_iteration == 6
        assert len(calls_resumed) == 6
    tol = 0.0 if comm.size == 1 else 1e-8
    np.testing.assert_allclose(resumed.x, full.x, rtol=0, atol=tol)
