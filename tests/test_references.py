"""Checks of the independent reference signals in tests/references.

Every reference is compared with something computed a different way:
closed forms against Gauss-Legendre quadrature, the spectral signals against
finite-volume Crank-Nicolson time stepping (with Richardson extrapolation),
membrane eigenvalues against a finite-volume eigen-solve, and known limits
(free diffusion, narrow pulses, kappa -> 0 and kappa -> infinity).

Units: um, ms, D in um^2/ms, kappa in um/ms, q in 1/(um ms), b in s/mm^2.
"""

import ast
import pathlib

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from references import slab
from references.membrane1d import (
    membrane_eigenpairs,
    membrane_pgse_signal,
    plane_membrane_box_signal,
)
from references.slab import (
    box_pgse_signal,
    pgse_b_value,
    pgse_q_from_b,
    pgse_segments,
    slab_moment_matrix,
    slab_pgse_signal,
    slab_waveform_signal,
)

L, A_MEM, D, DELTA_S, DELTA_L = 10.0, 4.0, 2.0, 5.0, 20.0  # um, um, um^2/ms, ms, ms
B_VALUES = (500.0, 1000.0, 2000.0)  # s/mm^2
KAPPAS = (0.01, 0.1, 1.0, 10.0)  # um/ms


def _q(b):
    return pgse_q_from_b(b, DELTA_S, DELTA_L)


# --- independent finite-volume Crank-Nicolson solver --------------------------------------------


def _fv_laplacian(length, n, membrane=None):
    """Cell-centred FV stiffness (n, n) / h of -D d^2/dx^2 with Neumann walls, and cell centres.

    membrane = (position, kappa): the face at that position gets the series
    conductance 1 / (h/(2D) + 1/kappa + h/(2D)) instead of D/h.
    """
    h = length / n
    g = np.full(n - 1, D / h)
    if membrane is not None:
        pos, kappa = membrane
        j = int(round(pos / h))
        assert abs(j * h - pos) < 1e-9 * length, "membrane must sit on a cell face"
        g[j - 1] = 0.0 if kappa == 0 else 1.0 / (h / D + 1.0 / kappa)
    diag = np.zeros(n)
    diag[:-1] += g
    diag[1:] += g
    K = sp.diags([-g, diag, -g], [-1, 0, 1], format="csr") / h
    return K, (np.arange(n) + 0.5) * h


def _cn_signal(K, potential, segments, q, dt_max):
    """Crank-Nicolson for dm/dt = -K m - i q f(t) potential m, m(0) = 1; returns mean(m(TE)).

    Steps are aligned with the waveform switches, so CN stays second order.
    """
    n = K.shape[0]
    eye = sp.identity(n, format="csc")
    m = np.ones(n, dtype=complex)
    for T, amp in segments:
        steps = int(np.ceil(T / dt_max - 1e-9))
        dt = T / steps
        Aop = K + 1j * q * amp * sp.diags(potential)
        lu = spla.splu((eye + 0.5 * dt * Aop).tocsc())
        rhs = (eye - 0.5 * dt * Aop).tocsr()
        for _ in range(steps):
            m = lu.solve(rhs @ m)
    return m.mean()  # uniform cells: the mean is S/S0


def _richardson2(S):
    """Two Richardson levels for three h^2-accurate values on grids refined by 2 (h and dt
    together)."""
    r1 = [(4 * S[i + 1] - S[i]) / 3 for i in range(2)]
    return (16 * r1[1] - r1[0]) / 15


def _cn_1d(b, membrane=None):
    segs = pgse_segments(DELTA_S, DELTA_L)
    S = []
    for lev in range(3):
        K, x = _fv_laplacian(L, 50 * 2**lev, membrane)
        S.append(_cn_signal(K, x, segs, _q(b), 0.1 / 2**lev))
    return _richardson2(S), S


# --- independence and conventions ----------------------------------------------------------------


def test_references_import_only_numpy_scipy_stdlib():
    """Independence: the reference package imports nothing from spinverse_fem (AST scan)."""
    allowed = {"__future__", "collections", "dataclasses", "functools", "numpy", "scipy"}
    pkg = pathlib.Path(__file__).parent / "references"
    files = sorted(pkg.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "slab.py", "membrane1d.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative import inside the reference package
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{f.name} imports {name}"


def test_pgse_b_q_conversion_roundtrip():
    """b = q^2 delta^2 (Delta - delta/3), with 1000 s/mm^2 = 1 ms/um^2."""
    q = pgse_q_from_b(1000.0, DELTA_S, DELTA_L)
    assert q == pytest.approx(1.0 / np.sqrt(25.0 * (20.0 - 5.0 / 3.0)), rel=1e-15)
    assert pgse_b_value(q, DELTA_S, DELTA_L) == pytest.approx(1.0, rel=1e-14)


# --- slab -----------------------------------------------------------------------------------------


def _gauss(a, b, n=200):
    x, w = np.polynomial.legendre.leggauss(n)
    return a + (x + 1) * (b - a) / 2, w * (b - a) / 2


def test_slab_moment_matrix_closed_form_matches_quadrature():
    """Closed-form W_mn = int x phi_m phi_n and orthonormality vs 200-point Gauss-Legendre."""
    N = 24
    x, w = _gauss(0.0, L)
    phi = slab.slab_modes(L, N, x)
    assert np.abs((phi * w) @ phi.T - np.eye(N)).max() < 1e-13
    assert np.abs((phi * x * w) @ phi.T - slab_moment_matrix(L, N)).max() < 1e-12


def test_slab_b0_gives_one_and_mode_truncation_error_decays_like_n_to_minus_5():
    """q = 0 gives S/S0 = 1; successive differences shrink by ~2^5 per doubling of N."""
    assert slab_pgse_signal(L, D, DELTA_S, DELTA_L, 0.0) == 1.0  # e_0 is exactly invariant
    q = _q(2000.0)
    S = [slab_pgse_signal(L, D, DELTA_S, DELTA_L, q, n_modes=n) for n in (16, 32, 64, 128)]
    d = np.abs(np.diff(S))
    ratios = d[:-1] / d[1:]
    assert np.all((ratios > 25) & (ratios < 40)), ratios


def test_slab_auto_mode_count_is_exposed_and_converged():
    """n_modes=None returns the N it used; doubling N again moves S/S0 by less than
    2 x SIGNAL_TOL."""
    q = _q(2000.0)
    S, N = slab_pgse_signal(L, D, DELTA_S, DELTA_L, q, return_n_modes=True)
    assert N in (32, 64, 128, 256, 512)
    assert abs(slab_pgse_signal(L, D, DELTA_S, DELTA_L, q, n_modes=2 * N) - S) < 2 * slab.SIGNAL_TOL


def _expm_longdouble(M):
    """exp(M) by Taylor series with scaling and squaring in extended precision (clongdouble)."""
    M = M.astype(np.clongdouble)
    s = max(0, int(np.ceil(np.log2(float(np.abs(M).sum(axis=0).max()) / 0.25))))
    B = M / np.longdouble(2) ** s
    E = np.eye(M.shape[0], dtype=np.clongdouble)
    term = E.copy()
    for j in range(1, 40):
        term = term @ B / j
        E = E + term
        if np.abs(term).max() < 1e-24:
            break
    for _ in range(s):
        E = E @ E
    return E


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="needs 80-bit long double")
def test_slab_expm_roundoff_is_below_1e12_against_extended_precision():
    """The double-precision scaling-and-squaring roundoff (the accuracy floor) at N = 64 modes."""
    N, q = 64, _q(2000.0)
    lam = slab.slab_eigenvalues(L, D, N).astype(np.longdouble)
    W = slab_moment_matrix(L, N).astype(np.longdouble)
    v = _expm_longdouble(-DELTA_S * (np.diag(lam) + 1j * np.longdouble(q) * W))[:, 0]
    # PGSE: the -1 lobe is the conjugate exponential, so
    # S/S0 = sum |v_j|^2 exp(-lambda_j (Delta - delta))
    exact = np.sum(np.abs(v) ** 2 * np.exp(-lam * (DELTA_L - DELTA_S)))
    assert abs(slab_pgse_signal(L, D, DELTA_S, DELTA_L, q, n_modes=N) - float(exact)) < 1e-12


def test_slab_pgse_is_origin_independent_real_and_unrefocused_waveform_gets_phase():
    """PGSE refocuses (F(TE) = 0): no origin dependence, real signal; a net area F picks up
    exp(-i q x0 F)."""
    q = _q(1000.0)
    ref = slab_pgse_signal(L, D, DELTA_S, DELTA_L, q, n_modes=64)
    assert abs(ref.imag) < 1e-14
    for x0 in (-5.0, 37.3):
        assert abs(slab_pgse_signal(L, D, DELTA_S, DELTA_L, q, n_modes=64, left_um=x0)
                   - ref) < 1e-12
    segs = [(DELTA_S, 1.0), (10.0, 0.0)]  # net area F = 5 ms
    s0 = slab_waveform_signal(L, D, segs, q, n_modes=64)
    x0 = 3.7
    s1 = slab_waveform_signal(L, D, segs, q, n_modes=64, left_um=x0)
    assert abs(s1 - s0 * np.exp(-1j * q * x0 * DELTA_S)) < 1e-12
    # with the origin at the centre the single lobe's signal is real by symmetry
    sc = slab_waveform_signal(L, D, segs, q, n_modes=64, left_um=-L / 2)
    assert abs(sc.imag) < 1e-13 and abs(s0.imag) > 1e-2


def test_slab_free_diffusion_limit_wall_correction_scales_as_one_over_length():
    """Large L: S/S0 -> exp(-bD), the excess coming from two wall layers, so (S - exp(-bD)) L is
    L-independent.

    Stated bound: 0 < S - exp(-bD) <= (2/L) sqrt(D TE) (1 - exp(-bD))
    (walls only reduce dephasing, in layers ~ sqrt(D TE) thick).
    """
    b = 1000.0
    free = np.exp(-1e-3 * b * D)
    layer = np.sqrt(D * (DELTA_L + DELTA_S))
    excess = {}
    for length in (40.0, 80.0):
        S = slab_pgse_signal(length, D, DELTA_S, DELTA_L, _q(b), tol=1e-8).real
        excess[length] = S - free
        assert 0 < excess[length] <= 2 / length * layer * (1 - free)
    assert excess[40.0] * 40.0 == pytest.approx(excess[80.0] * 80.0, rel=1e-4)


@pytest.mark.parametrize("K", [0.1, 0.3])
def test_slab_narrow_pulse_long_time_limit(K):
    """delta -> 0, D Delta / L^2 >> 1: S/S0 -> |int exp(i K x) dx / L|^2 = 2 (1 - cos KL) / (KL)^2,
    K = q delta.

    The finite-delta error is first order in delta and bounded by D K^2 delta.
    """
    Delta = 200.0  # lambda_1 Delta = 40: every non-constant mode has decayed
    exact = 2 * (1 - np.cos(K * L)) / (K * L) ** 2
    err = []
    for delta in (1e-2, 1e-3):
        S = slab_pgse_signal(L, D, delta, Delta, K / delta, n_modes=64)
        err.append(S.real - exact)
        assert abs(err[-1]) <= D * K**2 * delta
    assert 8 < err[0] / err[1] < 12


@pytest.mark.parametrize("b", B_VALUES)
def test_slab_matches_crank_nicolson(b):
    """Spectral slab signal vs FV Crank-Nicolson (h = 0.2/0.1/0.05 um, dt = h/2 ms, two
    Richardson levels)."""
    ref = slab_pgse_signal(L, D, DELTA_S, DELTA_L, _q(b))
    extrapolated, raw = _cn_1d(b)
    assert abs(raw[-1] - ref) < 1e-4  # plain second-order solution on the finest grid
    assert abs(extrapolated - ref) < 1e-9


def test_box_signal_is_product_of_slabs_and_direction_is_normalised():
    """Box along an axis = that slab; an unnormalised oblique direction is normalised."""
    q = _q(1000.0)
    lengths = (10.0, 8.0, 2.0)
    assert box_pgse_signal(lengths, D, DELTA_S, DELTA_L, q, (0, 1, 0)) == slab_pgse_signal(
        8.0, D, DELTA_S, DELTA_L, q
    )
    s = box_pgse_signal(lengths, D, DELTA_S, DELTA_L, q, (3, 4, 0))
    assert s == box_pgse_signal(lengths, D, DELTA_S, DELTA_L, q, (0.6, 0.8, 0))
    expected = slab_pgse_signal(10.0, D, DELTA_S, DELTA_L, 0.6 * q) * slab_pgse_signal(
        8.0, D, DELTA_S, DELTA_L, 0.8 * q
    )
    assert s == pytest.approx(expected, abs=1e-15)


def _cn_2d(q, g, membrane=None):
    """FV Crank-Nicolson on the square [0, L]^2, gradient direction g (2,), one Richardson step
    over 2 grids."""
    segs = pgse_segments(DELTA_S, DELTA_L)
    S = []
    for lev in range(2):
        n = 20 * 2**lev
        Kx, x = _fv_laplacian(L, n, membrane)
        Ky, y = _fv_laplacian(L, n)
        eye = sp.identity(n, format="csr")
        K = sp.kron(Kx, eye) + sp.kron(eye, Ky)
        pot = g[0] * np.repeat(x, n) + g[1] * np.tile(y, n)
        S.append(_cn_signal(K, pot, segs, q, 0.2 / 2**lev))
    return (4 * S[1] - S[0]) / 3


@pytest.mark.parametrize("kappa", [None, 0.1, 1.0])
def test_box_and_plane_membrane_separability_vs_2d_crank_nicolson(kappa):
    """Oblique gradient (0.6, 0.8, 0) on [0,10]^3 (optionally membrane x = 4 um) vs a 2-D FV solve.

    The 2-D Crank-Nicolson operator is not a product of 1-D ones, so this tests
    the separability itself (to the ~1e-7 accuracy of one Richardson step).
    """
    q = _q(2000.0)
    g = (0.6, 0.8, 0.0)
    if kappa is None:
        ref = box_pgse_signal((L, L, L), D, DELTA_S, DELTA_L, q, g)
        cn = _cn_2d(q, g)
    else:
        ref = plane_membrane_box_signal((L, L, L), 0, A_MEM, kappa, D, DELTA_S, DELTA_L, q, g)
        cn = _cn_2d(q, g, membrane=(A_MEM, kappa))
    assert abs(cn - ref) < 1e-6


# --- membrane -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [0.0, 1e-6, 0.01, 0.1, 1.0, 10.0, np.inf])
def test_membrane_modes_orthonormal_interface_conditions_and_closed_form_moments(kappa):
    """Eigenfunctions: orthonormal, flux-continuous, -D u' = kappa [u]; W and int phi vs
    quadrature."""
    lam, f = membrane_eigenpairs(L, A_MEM, kappa, D, D * (30 * np.pi / L) ** 2)
    assert np.all(np.diff(lam) >= 0) and lam[0] == 0.0
    xl, wl = _gauss(0.0, A_MEM, 120)
    xr, wr = _gauss(A_MEM, L, 120)
    x, w = np.concatenate([xl, xr]), np.concatenate([wl, wr])
    P = f(x)
    assert np.abs((P * w) @ P.T - np.eye(len(lam))).max() < 1e-12
    assert np.abs((P * x * w) @ P.T - f.moment_matrix()).max() < 1e-12
    assert np.abs(P @ w - f.integrals()).max() < 1e-12
    k, A, B = f.k, f.A, f.B
    du_left = -A * k * np.sin(k * A_MEM)
    du_right = B * k * np.sin(k * (L - A_MEM))
    jump = A * np.cos(k * A_MEM) - B * np.cos(k * (L - A_MEM))
    if kappa == 0.0:
        assert np.abs(du_left).max() < 1e-12 and np.abs(du_right).max() < 1e-12
    elif np.isinf(kappa):
        assert np.abs(du_left - du_right).max() < 1e-12 and np.abs(jump).max() < 1e-13
    else:
        assert np.abs(du_left - du_right).max() < 1e-12
        assert np.abs(-D * du_left - kappa * jump).max() < 1e-12


def _fv_eigenvalues(n, kappa, count):
    K, _ = _fv_laplacian(L, n, None if np.isinf(kappa) else (A_MEM, kappa))
    d, e = K.diagonal(), K.diagonal(1)
    return scipy.linalg.eigh_tridiagonal(d, e, eigvals_only=True, select="i",
                                         select_range=(0, count - 1))


@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.1, 1.0, 10.0, np.inf])
def test_membrane_eigenvalues_match_finite_volume_eigensolve(kappa):
    """No root missed or duplicated: the sorted spectrum below lam_max equals a fine FV
    eigen-solve's."""
    lam_max = D * (12.3 * np.pi / L) ** 2
    lam, _ = membrane_eigenpairs(L, A_MEM, kappa, D, lam_max)
    m = lam.size + 1
    fv = [_fv_eigenvalues(n, kappa, m) for n in (1000, 2000)]
    fv = (4 * fv[1] - fv[0]) / 3  # O(h^2) FV eigenvalues, one Richardson step
    assert np.allclose(fv[:-1], lam, rtol=1e-7, atol=1e-9)
    assert fv[-1] > lam_max * (1 + 1e-3)  # the next FV eigenvalue lies above the cut-off


def test_membrane_eigenvalues_interlace_and_increase_with_kappa():
    """k_n(0) <= k_n(kappa) <= n pi / L, and each k_n is non-decreasing in kappa."""
    lam_max = D * (20.5 * np.pi / L) ** 2
    lam0 = membrane_eigenpairs(L, A_MEM, 0.0, D, lam_max)[0]
    laminf = membrane_eigenpairs(L, A_MEM, np.inf, D, lam_max)[0]
    prev = lam0
    for kappa in (1e-3, 0.01, 0.1, 1.0, 10.0, 100.0):
        lam = membrane_eigenpairs(L, A_MEM, kappa, D, lam_max)[0]
        n = min(lam.size, laminf.size)
        assert np.all(lam[:n] >= prev[:n] - 1e-12) and np.all(lam[:n] <= laminf[:n] + 1e-12)
        prev = lam


def test_membrane_kappa_limits():
    """kappa = inf is the slab of length L and kappa -> inf converges like 1/kappa;
    kappa = 0 is (a/L) S_a + ((L-a)/L) S_{L-a}, and a tiny kappa is continuous with it
    (b = 2000 s/mm^2)."""
    q = _q(2000.0)
    s_slab = slab_pgse_signal(L, D, DELTA_S, DELTA_L, q)
    # both are within ~1e-11 of the limit (SIGNAL_TOL), with slightly different mode sets
    assert abs(membrane_pgse_signal(L, A_MEM, np.inf, D, DELTA_S, DELTA_L, q) - s_slab) < 3e-11
    # same mode count for all three, so truncation cancels in the differences
    s = {kap: membrane_pgse_signal(L, A_MEM, kap, D, DELTA_S, DELTA_L, q, n_modes=64)
         for kap in (1e3, 1e5, np.inf)}
    assert 70 < abs(s[1e3] - s[np.inf]) / abs(s[1e5] - s[np.inf]) < 130
    sealed = ((A_MEM / L) * slab_pgse_signal(A_MEM, D, DELTA_S, DELTA_L, q)
              + ((L - A_MEM) / L) * slab_pgse_signal(L - A_MEM, D, DELTA_S, DELTA_L, q))
    s0 = membrane_pgse_signal(L, A_MEM, 0.0, D, DELTA_S, DELTA_L, q)
    assert abs(s0 - sealed) < 5e-11
    s_tiny = membrane_pgse_signal(L, A_MEM, 1e-8, D, DELTA_S, DELTA_L, q, n_modes=64)
    assert abs(s_tiny - membrane_pgse_signal(L, A_MEM, 0.0, D, DELTA_S, DELTA_L, q,
                                             n_modes=64)) < 1e-7


@pytest.mark.parametrize("kappa", KAPPAS)
def test_membrane_matches_crank_nicolson_with_interface_flux(kappa):
    """Spectral membrane signal (b = 2000 s/mm^2) vs FV Crank-Nicolson with the membrane
    conductance."""
    b = 2000.0
    ref = membrane_pgse_signal(L, A_MEM, kappa, D, DELTA_S, DELTA_L, _q(b))
    extrapolated, raw = _cn_1d(b, membrane=(A_MEM, kappa))
    assert abs(raw[-1] - ref) < 1e-4
    assert abs(extrapolated - ref) < 1e-9


def test_plane_membrane_box_reduces_to_1d_factors():
    """Gradient along the membrane normal = 1-D membrane signal; along the plane = slab signal
    (membrane invisible)."""
    q = _q(1000.0)
    lengths = (L, 8.0, 2.0)
    assert plane_membrane_box_signal(lengths, 0, A_MEM, 0.1, D, DELTA_S, DELTA_L, q, (1, 0, 0)) == (
        membrane_pgse_signal(L, A_MEM, 0.1, D, DELTA_S, DELTA_L, q)
    )
    assert plane_membrane_box_signal(lengths, 0, A_MEM, 0.1, D, DELTA_S, DELTA_L, q, (0, 1, 0)) == (
        slab_pgse_signal(8.0, D, DELTA_S, DELTA_L, q)
    )
    # membrane on the y axis of a box: same as a 1-D membrane of length 8 um
    s = plane_membrane_box_signal(lengths, 1, 3.0, 1.0, D, DELTA_S, DELTA_L, q, (0, 1, 0))
    assert s == membrane_pgse_signal(8.0, 3.0, 1.0, D, DELTA_S, DELTA_L, q)


# -- concentric multilayer spheres and cylinders (references/multilayer.py) ------------------

def _bessel_roots(f, count, upper=40.0):
    import scipy.optimize

    xs = np.linspace(1e-3, upper, 8000)
    v = f(xs)
    roots = [scipy.optimize.brentq(f, xs[i], xs[i + 1]) for i in range(xs.size - 1)
             if v[i] * v[i + 1] < 0]
    return np.array(roots[:count])


@pytest.mark.parametrize("dim", [3, 2])
def test_multilayer_one_layer_eigenvalues_are_bessel_roots(dim):
    """Reference: lambda = D (x / R)^2 with x the roots of j_l' (sphere) or J_l' (disk), and
    lambda = 0 for l = 0: the radial P1 modes agree to 2e-5 (relative, 2000 elements)."""
    import scipy.special as sps
    from references.multilayer import Layers, radial_modes

    R, D = 5.0, 2.0
    one = Layers(radii=(R,), D=(D,), dim=dim)
    for order in (0, 1, 3):
        lam, _, _, _ = radial_modes(one, order, 5)
        if dim == 3:
            x = _bessel_roots(lambda z: sps.spherical_jn(order, z, derivative=True), 5)
        else:
            x = _bessel_roots(lambda z: sps.jvp(order, z), 5)
        ref = D * (x / R) ** 2
        got = lam[1:5] if order == 0 else lam[:4]
        assert abs(lam[0]) < 1e-8 or order > 0
        np.testing.assert_allclose(got, ref[:4], rtol=2e-5)


def test_multilayer_sphere_narrow_pulse_long_time_limit():
    """Reference: the narrow-pulse, long-time sphere signal [3 j1(k R) / (k R)]^2, k = q delta
    (delta = 5e-3 ms, Delta = 300 ms >> R^2 / D): agreement to 1e-3 absolute."""
    from references.multilayer import Layers, pgse_signal

    R = 5.0
    delta = 5e-3
    one = Layers(radii=(R,), D=(2.0,))
    k = np.array([0.3, 0.6, 1.0])
    got = pgse_signal(one, delta, 300.0, k / delta, orders=14, modes=25)
    kr = k * R
    ref = (3.0 * (np.sin(kr) - kr * np.cos(kr)) / kr**3) ** 2
    np.testing.assert_allclose(got.real, ref, atol=1e-3)
    assert np.max(np.abs(got.imag)) < 1e-10


@pytest.mark.parametrize("dim", [3, 2])
def test_multilayer_kappa_limits(dim):
    """References: (i) equal D and kappa -> infinity: the two-layer body is the one-layer body
    of the outer radius (1e-3 absolute at kappa 1e5); (ii) kappa = 0: the spectrum contains the
    inner body's own spectrum (1e-6 relative)."""
    from references.multilayer import Layers, pgse_signal, radial_modes

    q = np.array([0.05, 0.1])
    one = Layers(radii=(6.0,), D=(2.0,), dim=dim)
    two = Layers(radii=(3.0, 6.0), D=(2.0, 2.0), kappa=(1e5,), dim=dim)
    np.testing.assert_allclose(pgse_signal(two, 5.0, 15.0, q, orders=10, modes=20),
                               pgse_signal(one, 5.0, 15.0, q, orders=10, modes=20), atol=1e-3)
    sealed = Layers(radii=(3.0, 6.0), D=(1.0, 2.0), kappa=(0.0,), dim=dim)
    inner = Layers(radii=(3.0,), D=(1.0,), dim=dim)
    lam2 = radial_modes(sealed, 1, 12)[0]
    lam1 = radial_modes(inner, 1, 3)[0]
    for v in lam1:
        assert np.min(np.abs(lam2 - v)) <= 1e-6 * v


def test_multilayer_relaxation_and_spin_density_weighting():
    """Reference: with sealed interfaces (kappa = 0) the layers are independent:
    S0 = sum_i rho_i V_i exp(-TE / T2_i) (closed form) and S/S0 at any q the S0-weighted mean
    of each layer's own S/S0 (inner sphere: one layer; outer shell: from the two-layer body
    with rho = (0, 1))."""
    from references.multilayer import Layers, absolute_s0, pgse_signal

    r1, r2, TE = 3.0, 6.0, 25.0
    body = Layers(radii=(r1, r2), D=(1.0, 2.5), kappa=(0.0,), T2=(40.0, 80.0), rho=(1.5, 0.7))
    v1 = 4.0 / 3.0 * np.pi * r1**3
    v2 = 4.0 / 3.0 * np.pi * r2**3 - v1
    s0 = 1.5 * v1 * np.exp(-TE / 40.0) + 0.7 * v2 * np.exp(-TE / 80.0)
    assert absolute_s0(body, TE) == pytest.approx(s0, rel=1e-5)
    q = np.array([0.1, 0.2])
    whole = pgse_signal(body, 5.0, 20.0, q, orders=10, modes=20)
    core = pgse_signal(Layers(radii=(r1,), D=(1.0,)), 5.0, 20.0, q, orders=10, modes=20)
    shell = pgse_signal(Layers(radii=(r1, r2), D=(1.0, 2.5), kappa=(0.0,), rho=(0.0, 1.0)),
                        5.0, 20.0, q, orders=10, modes=20)
    w1 = 1.5 * v1 * np.exp(-TE / 40.0) / s0
    np.testing.assert_allclose(whole, w1 * core + (1.0 - w1) * shell, atol=1e-6)


def test_multilayer_planar_layers_equal_the_membrane_reference():
    """Reference: references.membrane1d (transcendental eigen-equation, one D) for two planar
    layers with equal D: the radial-FE matrix formalism in dim 1 agrees to 1e-6."""
    from references.multilayer import Layers, pgse_signal

    q = np.array([0.05, 0.1, 0.2])
    got = pgse_signal(Layers(radii=(4.0, 10.0), D=(2.0, 2.0), kappa=(0.1,), dim=1), 5.0, 20.0,
                      q, modes=60)
    ref = [membrane_pgse_signal(10.0, 4.0, 0.1, 2.0, 5.0, 20.0, qq) for qq in q]
    np.testing.assert_allclose(got, ref, atol=1e-6)
