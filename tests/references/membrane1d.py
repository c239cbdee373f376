"""Exact (spectral) Bloch-Torrey signals for a 1-D two-compartment domain.

Independent reference for the finite-element code: numpy/scipy only, nothing
from ``spinverse_fem``.

Domain ``[0, L]`` (um) with a permeable membrane at ``x = a``; ``b = L - a``.
Neumann walls at 0 and L; at the membrane the flux is continuous and
proportional to the jump::

    D u'(a-) = D u'(a+),     -D u'(a) = kappa (u(a-) - u(a+)),

kappa in um/ms, D in um^2/ms.  Eigenfunctions are ``A cos(k x)`` on the left
and ``B cos(k (L - x))`` on the right, eigenvalue ``lambda = D k^2`` (1/ms).
The two interface conditions give the 2x2 system

    [ sin(ka)                     sin(kb)      ] [A]   [0]
    [ D k sin(ka) - kappa cos(ka)  kappa cos(kb) ] [B] = [0]

whose determinant is the secular function

    F(k) = kappa sin(kL) - D k sin(ka) sin(kb).

Dividing by kappa sin(ka) sin(kb) gives ``H(k) = cot(ka) + cot(kb) - D k / kappa``,
strictly decreasing between its poles, which are the sealed (kappa = 0)
wave numbers ``n pi / a`` and ``m pi / b``.  Hence, for 0 < kappa < inf, the
spectrum is exactly

* k = 0 (the constant);
* one root in every open interval between consecutive distinct poles;
* every double pole (``n pi / a = m pi / b``), where F vanishes for all kappa
  (the mode does not feel the membrane: cos(kx) with u'(a) = 0).

So no root can be missed: each is bracketed by two known poles, and the
number of eigenvalues with k <= K is N_0(K) - 1 or N_0(K) (the last gap may
be cut by K), where N_0 counts the sealed spectrum with multiplicity.  Near a
pole the trig functions are evaluated relative to the pole (see ``_trig``) so
that roots within O(kappa) of a pole keep full relative accuracy.  The result is
also checked against the interlacing ``k_n(0) <= k_n(kappa) <= k_n(inf) = n pi / L``
(monotonicity in kappa plus min-max with the one continuity constraint).  kappa = 0 (union of
both slabs' spectra, with the double zero) and kappa = inf (one slab) are
handled explicitly.

Signal: matrix formalism as in ``slab`` with c(0) = projection of 1 on the
modes (u_n = integral phi_n) and S/S0 = u^T P u / L.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from .slab import SIGNAL_TOL, converge_modes, pgse_segments, propagate_signal, slab_pgse_signal

_N_START = 16
_N_MAX = 4096


def _sinc(x):
    """sin(x)/x with the removable singularity filled (numpy's sinc is sin(pi x)/(pi x))."""
    return np.sinc(np.asarray(x, dtype=float) / np.pi)


def _J(omega, c):
    """integral_0^c y cos(omega y) dy = c^2 (sinc(omega c) - sinc(omega c / 2)^2 / 2).

    Written with sinc so it stays accurate (no 1/omega^2 cancellation) as omega -> 0.
    """
    return c * c * (_sinc(omega * c) - 0.5 * _sinc(0.5 * omega * c) ** 2)


def _C(omega, c):
    """integral_0^c cos(omega y) dy."""
    return c * _sinc(omega * c)


def secular(k, L, a, kappa, D):
    """F(k) = kappa sin(kL) - D k sin(ka) sin(k(L-a)); k in 1/um, returns um/ms."""
    k = np.asarray(k, dtype=float)
    return kappa * np.sin(k * L) - D * k * np.sin(k * a) * np.sin(k * (L - a))


def _sealed_wavenumbers(L, a, k_max):
    """Sorted sealed wave numbers <= k_max with multiplicity.

    Returns (k, side, index): side 0 = left slab (k = n pi / a), 1 = right
    slab (k = m pi / b); index = n or m.
    """
    b = L - a
    nl = np.arange(int(np.floor(k_max * a / np.pi)) + 1)
    nr = np.arange(int(np.floor(k_max * b / np.pi)) + 1)
    k = np.concatenate([nl * np.pi / a, nr * np.pi / b])
    side = np.concatenate([np.zeros(nl.size, int), np.ones(nr.size, int)])
    index = np.concatenate([nl, nr])
    order = np.lexsort((side, k))
    return k[order], side[order], index[order]


def _poles(L, a, k_hi):
    """Distinct sealed wave numbers <= k_hi as tuples (p, n, m).

    p = n pi / a and/or m pi / b; n or m is -1 when p is not a pole of that
    side; a double pole has both.
    """
    k, side, index = _sealed_wavenumbers(L, a, k_hi)
    poles = []
    for kk, sd, ix in zip(k, side, index):
        # A common value n pi/a = m pi/b arrives twice up to rounding.
        if poles and abs(kk - poles[-1][0]) <= 1e-12 * max(1.0, kk):
            p, n, m = poles[-1]
            poles[-1] = (p, ix if sd == 0 else n, ix if sd == 1 else m)
        else:
            poles.append((kk, ix if sd == 0 else -1, ix if sd == 1 else -1))
    return poles


def _trig(pole, t, a, b):
    """k = p + t and sin/cos of ka, kb, accurate to relative eps near the pole.

    sin(ka) next to p = n pi / a would lose relative accuracy if computed as
    sin(fl(k a)); sin(n pi + t a) = (-1)^n sin(t a) does not.  That matters
    for small kappa, where roots sit within O(kappa) of a pole.
    """
    p, n, m = pole
    k = p + t
    if n >= 0:
        sgn = -1.0 if n % 2 else 1.0
        sa, ca = sgn * np.sin(t * a), sgn * np.cos(t * a)
    else:
        sa, ca = np.sin(k * a), np.cos(k * a)
    if m >= 0:
        sgn = -1.0 if m % 2 else 1.0
        sb, cb = sgn * np.sin(t * b), sgn * np.cos(t * b)
    else:
        sb, cb = np.sin(k * b), np.cos(k * b)
    return k, sa, ca, sb, cb


def _secular_trig(k, sa, ca, sb, cb, kappa, D):
    # sin(kL) = sin(ka) cos(kb) + cos(ka) sin(kb), kept in the accurate form.
    return kappa * (sa * cb + ca * sb) - D * k * sa * sb


def _root_between(P, P2, L, a, kappa, D):
    """The unique root in the open interval between consecutive poles P, P2; returns _trig
    output."""
    b = L - a
    w = P2[0] - P[0]

    def trig(t):
        # Evaluate relative to whichever pole is closer.
        return _trig(P, t, a, b) if t <= 0.5 * w else _trig(P2, t - w, a, b)

    _, sa, _, sb, _ = trig(0.5 * w)
    s_sign = np.sign(sa * sb)  # sin(ka) sin(kb) has no zero inside the interval

    def g(t):
        # F = kappa sin(ka) sin(kb) H and H decreases from +inf to -inf.
        return s_sign * _secular_trig(*trig(t), kappa, D)

    # At a double pole F = 0 exactly; step inside until g has the sign that
    # H > 0 (left end) / H < 0 (right end) predicts.
    lo, eps = 0.0, 1e-3 * w
    while g(lo) <= 0.0:
        lo, eps = eps, eps * 1e-3
        if eps < 1e-300:
            return trig(0.0)
    hi, eps = w, 1e-3 * w
    while g(hi) >= 0.0:
        hi, eps = w - eps, eps * 1e-3
        if eps < 1e-300:
            return trig(w)
    t = scipy.optimize.brentq(g, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    return trig(t)


def _spectrum(L, a, kappa, D, k_max):
    """Wave numbers k <= k_max with accurate trig; returns dict of (n,) arrays k, sa, ca, sb, cb,
    side."""
    if not (0.0 < a < L):
        raise ValueError("membrane position must satisfy 0 < a < L")
    if kappa < 0:
        raise ValueError("kappa must be >= 0")
    b = L - a
    if kappa == 0.0 or np.isinf(kappa):
        if kappa == 0.0:
            k, side, _ = _sealed_wavenumbers(L, a, k_max)
        else:
            k = np.arange(int(np.floor(k_max * L / np.pi)) + 1) * np.pi / L
            side = -np.ones(k.size, int)
        return dict(k=k, sa=np.sin(k * a), ca=np.cos(k * a), sb=np.sin(k * b), cb=np.cos(k * b),
                    side=side)
    # Poles up to one beyond k_max so that the last root <= k_max is bracketed.
    poles = _poles(L, a, k_max + np.pi / min(a, b) + 1e-9)
    rows = [_trig(poles[0], 0.0, a, b)]  # k = 0, the constant mode
    for j in range(len(poles) - 1):
        if poles[j][0] > k_max:
            break
        if j > 0 and poles[j][1] >= 0 and poles[j][2] >= 0:
            rows.append(_trig(poles[j], 0.0, a, b))  # double pole: membrane-blind mode
        rows.append(_root_between(poles[j], poles[j + 1], L, a, kappa, D))
    rows = sorted((r for r in rows if r[0] <= k_max), key=lambda r: r[0])
    k, sa, ca, sb, cb = (np.array(c) for c in zip(*rows))
    _check_count_and_interlacing(k, L, a, k_max)
    return dict(k=k, sa=sa, ca=ca, sb=sb, cb=cb, side=-np.ones(k.size, int))


def membrane_wavenumbers(L, a, kappa, D, k_max):
    """All eigen wave numbers k <= k_max (1/um), ascending, with multiplicity; shape (n,)."""
    return _spectrum(L, a, kappa, D, k_max)["k"]


def _check_count_and_interlacing(k, L, a, k_max):
    """Raise if the root count or the interlacing k_n(0) <= k_n <= n pi / L fails."""
    k0 = _sealed_wavenumbers(L, a, k_max)[0]
    # One root per gap between distinct poles plus 0 and the double poles:
    # N_0(K) - 1 <= N_kappa(K) <= N_0(K) (the last gap may be cut by K).
    if not (k0.size - 1 <= k.size <= k0.size):
        raise RuntimeError(f"membrane root count {k.size} inconsistent with sealed count {k0.size}")
    n = np.arange(k.size)
    tol = 1e-10 * max(1.0, k_max)
    if np.any(k < k0[: k.size] - tol) or np.any(k > n * np.pi / L + tol):
        raise RuntimeError("membrane roots violate interlacing k_n(0) <= k_n <= n pi / L")
    if np.any(np.diff(k) <= 0):
        raise RuntimeError("membrane eigenvalues must be simple for kappa > 0")


@dataclass(frozen=True)
class MembraneModes:
    """Normalised eigenfunctions phi_n = A_n cos(k_n x) (x < a), B_n cos(k_n (L - x)) (x > a).

    Attributes: ``k`` (n,) 1/um, ``A``, ``B`` (n,) 1/sqrt(um), ``L``, ``a`` in um,
    ``u`` (n,) = integral_0^L phi_n dx in sqrt(um) (evaluated with the accurate
    trig of the root finder, so it vanishes to roundoff for non-constant modes).
    """

    k: np.ndarray
    A: np.ndarray
    B: np.ndarray
    L: float
    a: float
    u: np.ndarray

    def __len__(self) -> int:
        return self.k.size

    def __call__(self, x_um) -> np.ndarray:
        """Evaluate all modes at x (npts,); returns (n, npts).  At x == a the left value is used."""
        x = np.asarray(x_um, dtype=float)[None, :]
        k = self.k[:, None]
        left = self.A[:, None] * np.cos(k * x)
        right = self.B[:, None] * np.cos(k * (self.L - x))
        return np.where(x <= self.a, left, right)

    def integrals(self) -> np.ndarray:
        """u_n = integral_0^L phi_n dx, shape (n,), sqrt(um)."""
        return self.u

    def moment_matrix(self) -> np.ndarray:
        """Closed-form W_mn = integral_0^L x phi_m phi_n dx, shape (n, n), um."""
        a, L = self.a, self.L
        b = L - a
        km, kn = self.k[:, None], self.k[None, :]
        dk, sk = km - kn, km + kn
        left = 0.5 * (_J(dk, a) + _J(sk, a))
        # Right piece in y = L - x: integral_0^b (L - y) cos(k_m y) cos(k_n y) dy.
        right = 0.5 * (L * (_C(dk, b) + _C(sk, b)) - (_J(dk, b) + _J(sk, b)))
        return np.outer(self.A, self.A) * left + np.outer(self.B, self.B) * right


def _coefficients(spec, L, a, kappa, D):
    """Normalised (A, B) and integrals u_n = integral phi_n for each mode of ``_spectrum``."""
    b = L - a
    k, sa, ca, sb, cb, side = (spec[c] for c in ("k", "sa", "ca", "sb", "cb", "side"))
    A = np.empty(k.size)
    B = np.empty(k.size)
    for i in range(k.size):
        if kappa == 0.0:
            A[i], B[i] = (1.0, 0.0) if side[i] == 0 else (0.0, 1.0)
        elif k[i] == 0.0:
            A[i], B[i] = 1.0, 1.0
        elif np.isinf(kappa):
            # cos(kx) = cos(kL - k(L-x)) = (-1)^n cos(k(L-x)) for k = n pi / L.
            n = int(round(k[i] * L / np.pi))
            A[i], B[i] = 1.0, (-1.0) ** n
        else:
            r1 = np.array([sa[i], sb[i]])
            r2 = np.array([D * k[i] * sa[i] - kappa * ca[i], kappa * cb[i]]) / (D * k[i] + kappa)
            # Null vector of the larger row; at a double pole row 1 vanishes.
            r = r1 if np.hypot(*r1) >= np.hypot(*r2) else r2
            A[i], B[i] = r[1], -r[0]
    kpos = np.where(k > 0, k, 1.0)
    # sin(2kc)/(2kc) = sin(kc) cos(kc)/(kc)
    sinc2a = np.where(k > 0, sa * ca / (kpos * a), 1.0)
    sinc2b = np.where(k > 0, sb * cb / (kpos * b), 1.0)
    s = 1.0 / np.sqrt(A**2 * a * (1.0 + sinc2a) / 2 + B**2 * b * (1.0 + sinc2b) / 2)
    # Sign convention: left amplitude >= 0 (right one for right-only modes).
    s = s * np.where(A != 0, np.sign(A), np.sign(B))
    A, B = A * s, B * s
    u = np.where(k > 0, (A * sa + B * sb) / kpos, A * a + B * b)
    return A, B, u


def membrane_eigenpairs(L, a, kappa, D, lam_max):
    """Eigenpairs of -D d^2/dx^2 on [0, L] with the membrane at a, for lambda <= lam_max.

    Parameters: L, a in um; kappa in um/ms (0 and np.inf allowed); D in um^2/ms;
    lam_max in 1/ms.

    Returns
    -------
    lam : (n,) eigenvalues D k^2 in 1/ms, ascending (with multiplicity).
    funcs : ``MembraneModes``; ``funcs(x)`` gives (n, npts) values in 1/sqrt(um),
        orthonormal in L^2(0, L); also ``.integrals()`` and ``.moment_matrix()``.
    """
    spec = _spectrum(L, a, kappa, D, np.sqrt(lam_max / D))
    A, B, u = _coefficients(spec, L, a, kappa, D)
    k = spec["k"]
    return D * k**2, MembraneModes(k=k, A=A, B=B, L=float(L), a=float(a), u=u)


@functools.lru_cache(maxsize=256)
def _membrane_signal_fixed(L, a, kappa, D, segments, q, n_modes):
    # n_modes sets k_max = n_modes * pi / L, i.e. about n_modes modes.
    k_max = n_modes * np.pi / L * (1 + 1e-12)
    lam, modes = membrane_eigenpairs(L, a, kappa, D, D * k_max**2)
    return propagate_signal(lam, modes.moment_matrix(), modes.integrals(), segments, q) / L


def membrane_waveform_signal(L, a, kappa, D, segments, q, tol=SIGNAL_TOL, n_modes=None,
                             return_n_modes=False):
    """S/S0 for a piecewise-constant waveform ``[(dt_ms, amplitude)]`` in the membrane domain.

    q in 1/(um ms); x measured from the left wall.  ``n_modes=None`` doubles the
    mode count (k_max = N pi / L) from 16 until the estimated truncation error
    |S(2N) - S(N)| / 31 is below tol (see ``slab.SIGNAL_TOL``).
    """
    segs = tuple((float(dt), float(amp)) for dt, amp in segments)
    args = (float(L), float(a), float(kappa), float(D), segs, float(q))
    if n_modes is not None:
        s, N = _membrane_signal_fixed(*args, int(n_modes)), int(n_modes)
    else:
        s, N = converge_modes(lambda n: _membrane_signal_fixed(*args, n), tol, _N_START, _N_MAX)
    return (s, N) if return_n_modes else s


def membrane_pgse_signal(L, a, kappa, D, delta, Delta, q, tol=SIGNAL_TOL, n_modes=None,
                         return_n_modes=False):
    """PGSE S/S0 in [0, L] (um) with a membrane at a (um) of permeability kappa (um/ms).

    D in um^2/ms, delta/Delta in ms, q = gamma G in 1/(um ms).  ``tol`` is the
    mode-doubling stop (see ``slab.SIGNAL_TOL`` for the roundoff floor).
    """
    return membrane_waveform_signal(
        L, a, kappa, D, pgse_segments(delta, Delta), q, tol=tol, n_modes=n_modes,
        return_n_modes=return_n_modes,
    )


def plane_membrane_box_signal(
    lengths_um: Sequence[float],
    membrane_axis: int,
    position_um: float,
    kappa: float,
    D: float,
    delta: float,
    Delta: float,
    q: float,
    direction: Sequence[float],
) -> complex:
    """PGSE S/S0 of the box prod_i [0, L_i] cut by the plane x_axis = position_um.

    The membrane spans the whole cross-section, so the problem separates:
    the 1-D membrane signal along ``membrane_axis`` (with q g_axis) times slab
    signals along the other axes (q g_i).  lengths_um (3,), direction (3,) any
    non-zero length, kappa in um/ms, q in 1/(um ms).
    """
    Ls = np.asarray(lengths_um, dtype=float).reshape(-1)
    g = np.asarray(direction, dtype=float).reshape(-1)
    if Ls.shape != g.shape:
        raise ValueError("lengths_um and direction must have the same shape")
    g = g / np.linalg.norm(g)
    s = 1.0 + 0.0j
    for i, (Li, gi) in enumerate(zip(Ls, g)):
        if gi == 0.0:
            continue  # no gradient along this axis: that factor is exactly 1
        if i == membrane_axis:
            s *= membrane_pgse_signal(Li, position_um, kappa, D, delta, Delta, q * gi)
        else:
            s *= slab_pgse_signal(Li, D, delta, Delta, q * gi)
    return complex(s)
