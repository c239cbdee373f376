"""Tests of spinverse_fem.forward.propagator (dense Bloch-Torrey propagation and its reverse mode).

Independent references: scipy.linalg.expm products per measurement; the closed-form slab
model of tests/references/slab.py; closed-form limits (q = 0, one mode); the published
Al-Mohy & Higham theta_m table; Taylor remainders and central finite differences for the
gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from references.slab import slab_eigenvalues, slab_moment_matrix, slab_waveform_signal

from spinverse_fem.forward.propagator import (
    SequencePropagator,
    choose_taylor_parameters,
    exp_divided_differences,
    propagate,
    signal_vjp,
    taylor_theta,
)

PGSE = [(5.0, 1.0), (7.0, 0.0), (5.0, -1.0)]
# not antisymmetric in time, includes a zero segment and fractional amplitudes
FIVE = [(2.0, 1.0), (3.0, -0.5), (1.0, 0.0), (4.0, 0.7), (2.0, -1.0)]


def random_model(K: int, seed: int = 0):
    """lam (K,) in [0, 2] 1/ms with lam[0] = 0 and an exactly triple eigenvalue; W_i = Q^T
    diag(x_i) Q with positions x_i in [0, 10] um (symmetric, off-centre); nu0 = Q^T 1."""
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.uniform(0.0, 2.0, K))
    lam[0] = 0.0
    lam[5:8] = lam[5]
    Q, _ = np.linalg.qr(rng.standard_normal((K, K)))
    W = np.stack([Q.T @ np.diag(rng.uniform(0.0, 10.0, K)) @ Q for _ in range(3)])
    W = 0.5 * (W + W.transpose(0, 2, 1))
    nu0 = Q.T @ np.ones(K)
    return lam, W, nu0


def random_protocol(seed: int = 1):
    """Shared directions (3 columns each), sign-flipped copies, unique directions, a q = 0
    column and a zero direction; q in [0.02, 0.12] 1/(um ms)."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((4, 3))
    d /= np.linalg.norm(d, axis=1)[:, None]
    u = rng.standard_normal((5, 3))
    u /= np.linalg.norm(u, axis=1)[:, None]
    dirs = np.concatenate([np.repeat(d, 3, axis=0), -d[:2], u, np.zeros((1, 3))])
    q = rng.uniform(0.02, 0.12, dirs.shape[0])
    q[0] = 0.0
    return q, dirs


def expm_signals(lam, W, nu0, segments, q, dirs, readout=None):
    """Reference: S_c = a^T prod_j expm(-dt_j (Lambda + i q_c f_j g_c.W)) nu0, a = readout
    (default nu0)."""
    a = nu0 if readout is None else readout
    out = []
    for qc, g in zip(q, dirs):
        G = np.tensordot(g, W, axes=1)
        x = nu0.astype(complex)
        for dt, f in segments:
            x = scipy.linalg.expm(-dt * (np.diag(lam) + 1j * qc * f * G)) @ x
        out.append(a @ x)
    return np.array(out)


# -- Taylor parameters ----------------------------------------------------------------------

# Al-Mohy & Higham 2011 Table 3.1 / Higham, Functions of Matrices, Table A.3 (u = 2^-53)
PUBLISHED_THETA = {
    2: 2.58e-8, 3: 1.39e-5, 4: 3.40e-4, 5: 2.40e-3, 6: 9.07e-3, 7: 2.38e-2, 8: 5.00e-2,
    9: 8.96e-2, 10: 1.44e-1, 12: 3.00e-1, 15: 6.41e-1, 18: 1.09, 20: 1.44, 25: 2.43,
    30: 3.54, 35: 4.7, 40: 6.0, 45: 7.2, 50: 8.5, 55: 9.9,
}


def test_taylor_theta_reproduces_published_table():
    for m, ref in PUBLISHED_THETA.items():
        # table values carry 3 (m <= 30) or 2 significant digits
        rtol = 5e-3 if m <= 30 else 1e-2
        assert taylor_theta(m) == pytest.approx(ref, rel=rtol), m


def test_choose_taylor_parameters_is_cost_optimal_and_valid():
    assert choose_taylor_parameters(0.0) == (0, 1)
    for norm in (1e-3, 0.5, 3.0, 9.0, 24.6, 33.0, 120.0):
        m, s = choose_taylor_parameters(norm)
        assert norm / s <= taylor_theta(m)
        # no admissible (m', s') is cheaper
        best = min(mm * max(1, int(np.ceil(norm / taylor_theta(mm)))) for mm in range(1, 56))
        assert m * s == best


# -- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [PGSE, FIVE], ids=["pgse", "five-segment"])
@pytest.mark.parametrize("reversal", [True, False], ids=["reversal", "direct"])
def test_forward_matches_expm_products(segments, reversal):
    lam, W, nu0 = random_model(40)
    q, dirs = random_protocol()
    prop = SequencePropagator(lam, W, nu0, segments, q, dirs, use_time_reversal=reversal)
    S = prop.signals()
    ref = expm_signals(lam, W, nu0, segments, q, dirs)
    assert prop.time_reversal == (reversal and segments is PGSE)
    kinds = {b["kind"] for b in prop.stats["batches"]}
    assert kinds == {"shared", "mixed"} and prop.stats["n_zero"] == 2
    np.testing.assert_allclose(S, ref, rtol=1e-12, atol=0)


def test_forward_matches_slab_reference_with_offset_origin():
    """Slab [x0, x0 + L] with x0 = 40 um: the large diagonal of W is removed by the trace
    shift; a waveform with net area picks up the phase exp(-i q x0 int f)."""
    L, D, K, x0 = 10.0, 2.0, 48, 40.0
    lam = slab_eigenvalues(L, D, K)
    W = np.zeros((3, K, K))
    W[0] = slab_moment_matrix(L, K) + x0 * np.eye(K)
    nu0 = np.zeros(K)
    nu0[0] = np.sqrt(L)
    unbalanced = [(3.0, 1.0), (4.0, 0.0), (2.0, -1.0), (1.0, 0.5)]
    for segments in ([(8.0, 1.0), (12.0, 0.0), (8.0, -1.0)], unbalanced):
        qs = np.array([0.02, 0.05, 0.1])
        S = propagate(lam, W, nu0, segments, qs, np.tile([1.0, 0.0, 0.0], (3, 1))) / L
        ref = [slab_waveform_signal(L, D, segments, qq, n_modes=K, left_um=x0) for qq in qs]
        np.testing.assert_allclose(S, ref, rtol=1e-12, atol=0)


def test_zero_gradient_limit_is_diagonal_decay():
    lam, W, nu0 = random_model(30)
    TE = sum(dt for dt, _ in FIVE)
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    S = propagate(lam, W, nu0, FIVE, np.array([0.0, 0.1, 1e-9]), dirs)
    exact = np.sum(nu0**2 * np.exp(-lam * TE))
    np.testing.assert_allclose(S[:2], exact, rtol=1e-14)
    # q -> 0 through the Taylor path is continuous (first-order deviation ~ 1e-9)
    assert abs(S[2] - exact) <= 1e-7 * abs(exact)


def test_single_mode_free_diffusion_phase():
    """K = 1, lam = 0, W_i = x0_i: nu' = -i q f (g.x0) nu, so S = V exp(-i q g.x0 int f)."""
    x0 = np.array([3.0, -7.0, 11.0])
    W = x0[:, None, None] * np.ones((3, 1, 1))
    V = 5.0
    g = np.array([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    q = np.array([0.3, 0.2])
    S = propagate(np.zeros(1), W, np.array([np.sqrt(V)]), PGSE, q, g)
    np.testing.assert_allclose(S, V, rtol=1e-14)
    net = [(3.0, 1.0), (2.0, -0.25)]
    area = 3.0 - 0.5
    S = propagate(np.zeros(1), W, np.array([np.sqrt(V)]), net, q, g)
    np.testing.assert_allclose(S, V * np.exp(-1j * q * (g @ x0) * area), rtol=1e-13)


def test_single_mode_gradient_closed_form():
    """K = 1: S = nu0^2 exp(-lam TE - i q g.x0 A), A = int f. Here the shifted generator is
    zero, so the whole W dependence flows through the trace shift (eta factors)."""
    x0 = np.array([3.0, -7.0, 11.0])
    W = x0[:, None, None] * np.ones((3, 1, 1))
    lam, nu0 = np.array([0.04]), np.array([1.7])
    net = [(3.0, 1.0), (2.0, -0.25)]
    TE, area = 5.0, 2.5
    g = np.array([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    q = np.array([0.3, 0.2])
    S_bar = np.array([0.7 - 0.2j, -1.1 + 0.4j])
    S, (lam_bar, W_bar, nu0_bar) = signal_vjp(lam, W, nu0, net, q, g, S_bar)
    S_exact = nu0**2 * np.exp(-lam * TE - 1j * q * (g @ x0) * area)
    np.testing.assert_allclose(S, S_exact, rtol=1e-13)
    # dJ = Re(sum conj(S_bar) dS)
    dS_dx0 = (-1j * q * area * S_exact)[:, None] * g
    np.testing.assert_allclose(W_bar[:, 0, 0], np.real(np.conj(S_bar) @ dS_dx0), rtol=1e-12)
    np.testing.assert_allclose(lam_bar, np.real(np.conj(S_bar) @ (-TE * S_exact)), rtol=1e-12)
    np.testing.assert_allclose(nu0_bar, np.real(np.conj(S_bar) @ (2.0 * S_exact / nu0)), rtol=1e-12)


def test_rejects_asymmetric_W_and_bad_shapes():
    lam, W, nu0 = random_model(6)
    q, dirs = np.array([0.1]), np.array([[1.0, 0.0, 0.0]])
    Wa = W.copy()
    Wa[0, 0, 1] += 1e-3
    with pytest.raises(ValueError, match="symmetric"):
        SequencePropagator(lam, Wa, nu0, PGSE, q, dirs)
    with pytest.raises(ValueError):
        SequencePropagator(lam, W[:2], nu0, PGSE, q, dirs)
    with pytest.raises(ValueError):
        SequencePropagator(lam, W, nu0, [(-1.0, 1.0)], q, dirs)
    with pytest.raises(ValueError):
        SequencePropagator(lam, W, nu0, PGSE, q, dirs).vjp(np.zeros(2))


# -- reverse mode ---------------------------------------------------------------------------


def _objective(segments, q, dirs, target, weights, reversal):
    def J(lam, W, nu0):
        S = propagate(lam, W, nu0, segments, q, dirs, use_time_reversal=reversal)
        return float(np.sum(weights * np.abs(S - target) ** 2))

    def grad(lam, W, nu0):
        prop = SequencePropagator(lam, W, nu0, segments, q, dirs, use_time_reversal=reversal)
        S = prop.signals()
        # J = sum w |S - T|^2: dJ/dRe S + i dJ/dIm S = 2 w (S - T)
        return prop.vjp(2.0 * weights * (S - target))

    return J, grad


@pytest.mark.parametrize(
    "segments, reversal",
    [(PGSE, True), (PGSE, False), (FIVE, False)],
    ids=["pgse-reversal", "pgse-direct", "five-segment"],
)
def test_vjp_taylor_remainder_is_second_order(segments, reversal):
    rng = np.random.default_rng(7)
    lam, W, nu0 = random_model(40)
    q, dirs = random_protocol()
    ref = expm_signals(lam, W, nu0, segments, q, dirs)
    target = ref * (1.0 + 0.1 * rng.standard_normal(ref.size)) + 0.05j * np.abs(ref)
    weights = rng.uniform(0.5, 1.5, ref.size)
    J, grad = _objective(segments, q, dirs, target, weights, reversal)
    lam_bar, W_bar, nu0_bar = grad(lam, W, nu0)
    assert np.allclose(W_bar, W_bar.transpose(0, 2, 1), rtol=0, atol=0)

    dlam = rng.standard_normal(lam.size)
    dW = rng.standard_normal(W.shape)
    dW = dW + dW.transpose(0, 2, 1)
    dnu0 = rng.standard_normal(nu0.size)
    slope = lam_bar @ dlam + np.sum(W_bar * dW) + nu0_bar @ dnu0
    J0 = J(lam, W, nu0)
    hs = 4e-3 / 2.0 ** np.arange(16)
    steps = np.array([J(lam + h * dlam, W + h * dW, nu0 + h * dnu0) - J0 for h in hs])
    rem = np.abs(steps - hs * slope)
    orders = np.log2(rem[:-1] / rem[1:])
    # every halving whose remainder is well above round-off (~1e-16 J0) is second order;
    # here that holds for 15 halvings, down to remainders ~1e-11 J0
    clean = rem[1:] > 1e4 * 1e-16 * J0
    assert clean.sum() >= 12, rem
    assert np.all((orders[clean] >= 1.9) & (orders[clean] <= 2.1)), orders
    # the test is sharp: a slope wrong by one part in 1e4 is first order at small h
    bad = np.abs(steps - hs * slope * (1.0 + 1e-4))
    assert bad[-1] > 5.0 * rem[-1]


def test_vjp_matches_central_differences_and_paths_agree():
    rng = np.random.default_rng(3)
    lam, W, nu0 = random_model(24, seed=5)
    q, dirs = random_protocol(seed=2)
    ref = expm_signals(lam, W, nu0, PGSE, q, dirs)
    target = ref * (1.0 + 0.2 * rng.standard_normal(ref.size))
    weights = np.ones(ref.size)
    J, grad = _objective(PGSE, q, dirs, target, weights, False)
    lam_bar, W_bar, nu0_bar = grad(lam, W, nu0)

    # the time-reversal formula is a different computation of the same map
    _, grad_rev = _objective(PGSE, q, dirs, target, weights, True)
    for a, b in zip(grad_rev(lam, W, nu0), (lam_bar, W_bar, nu0_bar)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * np.max(np.abs(b)))

    eps = 1e-6

    def central(perturb):
        return (J(*perturb(eps)) - J(*perturb(-eps))) / (2.0 * eps)

    for k in (0, 6, 23):
        e = np.zeros_like(lam)
        e[k] = 1.0
        fd = central(lambda t: (lam + t * e, W, nu0))
        assert lam_bar[k] == pytest.approx(fd, rel=1e-6, abs=1e-7 * np.max(np.abs(lam_bar)))
        fd = central(lambda t: (lam, W, nu0 + t * e))
        assert nu0_bar[k] == pytest.approx(fd, rel=1e-6, abs=1e-7 * np.max(np.abs(nu0_bar)))
    for i, p, r in ((0, 0, 0), (1, 2, 9), (2, 17, 4)):
        E = np.zeros_like(W)
        E[i, p, r] += 1.0
        E[i, r, p] += 1.0
        fd = central(lambda t: (lam, W + t * E, nu0))
        # symmetric perturbation of a pair (or one diagonal entry, counted twice)
        assert np.sum(W_bar * E) == pytest.approx(fd, rel=1e-6, abs=1e-7 * np.max(np.abs(W_bar)))


def test_signal_vjp_matches_propagator_and_zero_columns_have_closed_form_gradient():
    lam, W, nu0 = random_model(12, seed=4)
    TE = sum(dt for dt, _ in FIVE)
    q = np.array([0.0, 0.0])
    dirs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    S_bar = np.array([1.0 + 2.0j, -0.5 + 0.0j])
    S, (lam_bar, W_bar, nu0_bar) = signal_vjp(lam, W, nu0, FIVE, q, dirs, S_bar)
    # S = sum nu0^2 exp(-lam TE) is real, so only Re(S_bar) contributes
    e = np.exp(-lam * TE)
    np.testing.assert_allclose(lam_bar, 0.5 * (-TE) * nu0**2 * e, rtol=1e-14)
    np.testing.assert_allclose(nu0_bar, 0.5 * 2.0 * nu0 * e, rtol=1e-14)
    assert not np.any(W_bar)


def test_exp_divided_differences_is_the_frechet_derivative():
    """Against scipy.linalg.expm_frechet at diagonal L, with exact and near degeneracies and
    a large t * gap (where a naive exp(-t a) expm1(-t d) / d gives 0 * inf)."""
    lam = np.array([0.0, 0.0, 1e-12, 0.3, 0.3 + 1e-9, 2.0, 4.9])
    E = np.random.default_rng(0).standard_normal((lam.size, lam.size))
    E = E + E.T
    for t in (0.0, 0.7, 25.0):
        _, ref = scipy.linalg.expm_frechet(-t * np.diag(lam), -t * E)
        D = exp_divided_differences(lam, t)
        np.testing.assert_allclose(D * E, ref, rtol=1e-10, atol=1e-15)
    D = exp_divided_differences(np.array([0.0, 10.0, 100.0]), 100.0)
    assert np.all(np.isfinite(D))
    assert D[0, 1] == pytest.approx((1.0 - np.exp(-1000.0)) / -10.0, rel=1e-14)


@pytest.mark.parametrize("segments, reversal", [(PGSE, True), (FIVE, False)],
                         ids=["pgse-reversal", "five-segment"])
def test_full_generator_cotangent_taylor_remainder(segments, reversal):
    """vjp(full_lam=True) differentiates a full symmetric generator L at L = diag(lam). The
    reference evaluates J(L) independently by rotating to the eigenbasis of L:
    L = U diag(mu) U^T gives the same signals with (mu, U^T W_i U, U^T nu0)."""
    rng = np.random.default_rng(11)
    lam, W, nu0 = random_model(30)
    q, dirs = random_protocol()
    ref = expm_signals(lam, W, nu0, segments, q, dirs)
    target = ref * (1.0 + 0.1 * rng.standard_normal(ref.size))

    def J(L, Wm, v):
        mu, U = np.linalg.eigh(L)
        Wr = np.einsum("ji,ajk,kl->ail", U, Wm, U)
        S = propagate(mu, Wr, U.T @ v, segments, q, dirs, use_time_reversal=reversal)
        return float(np.sum(np.abs(S - target) ** 2))

    prop = SequencePropagator(lam, W, nu0, segments, q, dirs, use_time_reversal=reversal)
    S_bar = 2.0 * (prop.signals() - target)
    L_bar, W_bar, nu0_bar = prop.vjp(S_bar, full_lam=True)
    lam_bar, W_bar_d, nu0_bar_d = prop.vjp(S_bar)
    np.testing.assert_allclose(np.diag(L_bar), lam_bar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(W_bar, W_bar_d, rtol=1e-12, atol=1e-16)
    assert np.array_equal(L_bar, L_bar.T)

    dL = rng.standard_normal(L_bar.shape)
    dL = dL + dL.T
    dW = rng.standard_normal(W.shape)
    dW = dW + dW.transpose(0, 2, 1)
    dnu0 = rng.standard_normal(nu0.size)
    slope = np.sum(L_bar * dL) + np.sum(W_bar * dW) + nu0_bar @ dnu0
    L0 = np.diag(lam)
    J0 = J(L0, W, nu0)
    hs = 2e-3 / 2.0 ** np.arange(10)
    rem = np.array([abs(J(L0 + h * dL, W + h * dW, nu0 + h * dnu0) - J0 - h * slope) for h in hs])
    orders = np.log2(rem[:-1] / rem[1:])
    assert np.all((orders >= 1.9) & (orders <= 2.3)), orders
