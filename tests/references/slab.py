"""Exact (spectral) Bloch-Torrey signals for the impermeable slab and box.

Independent reference for the finite-element code: numpy/scipy only, nothing
from ``spinverse_fem``.

Model (1-D, slab occupying ``[x0, x0 + L]``, Neumann walls, no T2)::

    dm/dt = D m'' - i q f(t) x m,    m(x, 0) = 1,
    S = integral of m(x, TE) dx,     S0 = L   (the q = 0 signal).

Units: x, L in um; t in ms; D in um^2/ms; q = gamma G in 1/(um ms); the
waveform f(t) is dimensionless; b = q^2 delta^2 (Delta - delta/3) in ms/um^2
(multiply s/mm^2 by 1e-3 to get ms/um^2).

Matrix formalism (Laplace eigenbasis of the slab ``[0, L]``)::

    phi_0 = 1/sqrt(L),  phi_n = sqrt(2/L) cos(n pi x / L),
    lambda_n = D (n pi / L)^2,
    W_mn = integral_0^L x phi_m phi_n dx   (closed forms below),

m = sum_n c_n phi_n gives dc/dt = -(Lambda + i q f(t) (W + x0 I)) c with
c(0) = sqrt(L) e_0, so S/S0 = e_0^T P e_0 where P is the ordered product of
exact matrix exponentials of the piecewise-constant segments.

Closed forms of W (m, n >= 1, m != n)::

    W_00 = L/2,   W_nn = L/2,
    W_0n = sqrt(2) L ((-1)^n - 1) / (n pi)^2,
    W_mn = L ((-1)^(m+n) - 1) / pi^2 * (1/(m-n)^2 + 1/(m+n)^2).

Origin: moving the slab to ``[x0, x0 + L]`` adds ``x0 I`` to W, which commutes
with everything and multiplies S by exp(-i q x0 F(TE)), F(t) = integral_0^t f.
For PGSE F(TE) = 0 (the pulses refocus), so the PGSE signal does not depend on
the origin; a waveform with non-zero net area picks up that phase.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import scipy.linalg

#: Default target of the automatic mode count: the estimated truncation error
#: |S(2N) - S(N)| / 31 of S/S0.  The truncation error of the cosine (and
#: membrane) matrix formalism decays like N^-5 (measured: successive
#: differences shrink by 30-35 per doubling), hence the 2^5 - 1.  A 1e-14 stop
#: is not usable in double precision: scaling-and-squaring in ``expm`` adds
#: roundoff of about 2^s eps with 2^s ~ lambda_N dt / 5, i.e. ~5e-13 at
#: N = 128 and a few 1e-12 at N = 512 (checked against a long-double
#: evaluation).  With 1e-11 the stop is at N = 128 for L = 10 um,
#: b <= 2000 s/mm^2 (total error ~1e-11, ~0.1 s with one BLAS thread);
#: 1e-12 needs N = 256 (error ~1e-12, about 8x the cost).
SIGNAL_TOL = 1e-11
_RATE_FACTOR = 31.0
_N_START = 16
_N_MAX = 4096


def b_to_ms_per_um2(b_s_per_mm2: float) -> float:
    """Convert a b-value from s/mm^2 to ms/um^2 (factor 1e-3)."""
    return 1e-3 * float(b_s_per_mm2)


def pgse_b_value(q_per_um_ms: float, delta_ms: float, Delta_ms: float) -> float:
    """PGSE b-value q^2 delta^2 (Delta - delta/3) in ms/um^2."""
    return q_per_um_ms**2 * delta_ms**2 * (Delta_ms - delta_ms / 3.0)


def pgse_q_from_b(b_s_per_mm2: float, delta_ms: float, Delta_ms: float) -> float:
    """Gradient wave number q = gamma G in 1/(um ms) for a PGSE b-value in s/mm^2."""
    return float(np.sqrt(b_to_ms_per_um2(b_s_per_mm2)
                         / (delta_ms**2 * (Delta_ms - delta_ms / 3.0))))


def pgse_segments(delta_ms: float, Delta_ms: float) -> list[tuple[float, float]]:
    """PGSE waveform as ``[(dt_ms, amplitude)]``: +1 on [0, delta], 0, -1 on
    [Delta, Delta+delta]."""
    if not (0.0 < delta_ms <= Delta_ms):
        raise ValueError("PGSE needs 0 < delta <= Delta")
    segs = [(delta_ms, 1.0)]
    if Delta_ms > delta_ms:
        segs.append((Delta_ms - delta_ms, 0.0))
    segs.append((delta_ms, -1.0))
    return segs


def slab_eigenvalues(length_um: float, D: float, n_modes: int) -> np.ndarray:
    """Neumann Laplace eigenvalues D (n pi / L)^2, n = 0..n_modes-1, shape (n_modes,), 1/ms."""
    n = np.arange(n_modes, dtype=float)
    return D * (n * np.pi / length_um) ** 2


def slab_modes(length_um: float, n_modes: int, x_um: np.ndarray) -> np.ndarray:
    """Normalised eigenfunctions on [0, L] at ``x_um`` (npts,); returns (n_modes, npts) in
    1/sqrt(um)."""
    x = np.asarray(x_um, dtype=float)
    n = np.arange(n_modes, dtype=float)[:, None]
    phi = np.sqrt(2.0 / length_um) * np.cos(n * np.pi * x[None, :] / length_um)
    phi[0] = 1.0 / np.sqrt(length_um)
    return phi


def slab_moment_matrix(length_um: float, n_modes: int) -> np.ndarray:
    """Closed-form W_mn = integral_0^L x phi_m phi_n dx, shape (n_modes, n_modes), um."""
    L = float(length_um)
    m = np.arange(n_modes)[:, None]
    n = np.arange(n_modes)[None, :]
    odd = ((m + n) % 2 == 1).astype(float)  # (-1)^(m+n) - 1 = -2 * odd
    with np.errstate(divide="ignore", invalid="ignore"):
        W = -2.0 * odd * L / np.pi**2 * (1.0 / (m - n) ** 2 + 1.0 / (m + n) ** 2)
    W[np.diag_indices(n_modes)] = L / 2.0
    # The general formula assumes two sqrt(2/L) factors (at m = 0 it gives
    # -4L/(n pi)^2 for odd n); phi_0 = 1/sqrt(L) needs one factor 1/sqrt(2).
    W[0, :] /= np.sqrt(2.0)
    W[:, 0] /= np.sqrt(2.0)
    W[0, 0] = L / 2.0
    return W


def propagate_signal(lam, W, u, segments, q: float) -> complex:
    """u^T P u, P = ordered product of exp(-dt (diag(lam) + i q amp W)) over the segments.

    lam (n,) in 1/ms, W (n, n) real symmetric in um, u (n,) real,
    segments ``[(dt_ms, amp)]``, q in 1/(um ms).  With u = the projection of
    m = 1 (u_n = integral phi_n, so u^T u = length) this is S; divide by the
    length for S/S0.  With u = e_0 (slab: phi_0 is the constant) it is S/S0.
    """
    c = np.asarray(u, dtype=complex)
    cache: dict[tuple[float, float], np.ndarray] = {}
    for dt, amp in segments:
        dt, amp = float(dt), float(amp)
        if dt < 0:
            raise ValueError("segment durations must be >= 0")
        if dt == 0:
            continue
        if amp == 0.0 or q == 0.0:
            c = np.exp(-lam * dt) * c
            continue
        if (dt, amp) not in cache:
            if (dt, -amp) in cache:
                # lam and W are real, so flipping the gradient conjugates the exponential.
                cache[(dt, amp)] = cache[(dt, -amp)].conj()
            else:
                cache[(dt, amp)] = scipy.linalg.expm(-dt * (np.diag(lam) + 1j * q * amp * W))
        c = cache[(dt, amp)] @ c
    return complex(np.asarray(u, dtype=complex) @ c)


@functools.lru_cache(maxsize=256)
def _slab_signal_fixed(length_um, D, segments, q, n_modes, left_um):
    lam = slab_eigenvalues(length_um, D, n_modes)
    W = slab_moment_matrix(length_um, n_modes) + left_um * np.eye(n_modes)
    # c(0) = sqrt(L) e_0 and S = sqrt(L) c_0(TE), so S/S0 = (P)_00 with u = e_0.
    e0 = np.zeros(n_modes)
    e0[0] = 1.0
    return propagate_signal(lam, W, e0, segments, q)


def converge_modes(signal_of_n, tol: float, n_start: int = _N_START, n_max: int = _N_MAX):
    """Double N from ``n_start`` until |S(2N) - S(N)| / 31 < tol; returns ``(S(2N), 2N)``.

    ``signal_of_n``: callable N -> complex S/S0.  |S(2N) - S(N)| / 31 estimates
    the truncation error of S(2N) for an N^-5 convergence.  Raises
    RuntimeError beyond ``n_max``.
    """
    N = int(n_start)
    prev = signal_of_n(N)
    while True:
        N *= 2
        if N > n_max:
            raise RuntimeError(f"signal did not converge to {tol:g} within {n_max} modes")
        cur = signal_of_n(N)
        if abs(cur - prev) / _RATE_FACTOR < tol:
            return cur, N
        prev = cur


def slab_waveform_signal(
    length_um: float,
    D: float,
    segments: Sequence[tuple[float, float]],
    q_per_um_ms: float,
    n_modes: int | None = None,
    left_um: float = 0.0,
    return_n_modes: bool = False,
    tol: float = SIGNAL_TOL,
):
    """S/S0 for a piecewise-constant gradient waveform in the slab [left_um, left_um + L].

    Parameters
    ----------
    length_um : slab length L (um).
    D : diffusivity (um^2/ms).
    segments : sequence of ``(dt_ms, amplitude)``; f(t) = amplitude on each
        consecutive interval of length dt_ms; TE = sum of the dt_ms.
    q_per_um_ms : q = gamma G_max (1/(um ms)); the gradient is q * amplitude.
    n_modes : number of cosine modes; ``None`` doubles N from 16 until the
        estimated truncation error |S(2N) - S(N)| / 31 is below ``tol``.
    left_um : position x0 of the left wall (um); see the module docstring.
    return_n_modes : also return the number of modes used.
    tol : convergence target for ``n_modes=None`` (see ``SIGNAL_TOL``).

    Returns
    -------
    complex S/S0, or ``(S/S0, n_modes)`` when ``return_n_modes``.
    """
    segs = tuple((float(dt), float(a)) for dt, a in segments)
    args = (float(length_um), float(D), segs, float(q_per_um_ms))
    if n_modes is not None:
        s, N = _slab_signal_fixed(*args, int(n_modes), float(left_um)), int(n_modes)
    else:
        s, N = converge_modes(lambda n: _slab_signal_fixed(*args, n, float(left_um)), tol)
    return (s, N) if return_n_modes else s


def slab_pgse_signal(
    length_um: float,
    D: float,
    delta_ms: float,
    Delta_ms: float,
    q_per_um_ms: float,
    n_modes: int | None = None,
    left_um: float = 0.0,
    return_n_modes: bool = False,
    tol: float = SIGNAL_TOL,
):
    """PGSE S/S0 of the impermeable slab of length L (um); see ``slab_waveform_signal``.

    The result is independent of ``left_um`` because the PGSE pulses refocus
    (F(TE) = 0); mathematically it is also real and positive.
    """
    return slab_waveform_signal(
        length_um, D, pgse_segments(delta_ms, Delta_ms), q_per_um_ms,
            n_modes=n_modes, left_um=left_um, return_n_modes=return_n_modes, tol=tol,
    )


def box_pgse_signal(
    lengths_um: Sequence[float],
    D: float,
    delta_ms: float,
    Delta_ms: float,
    q_per_um_ms: float,
    direction: Sequence[float],
) -> complex:
    """PGSE S/S0 of the Neumann box prod_i [0, L_i] for gradient q * g, g = direction/|direction|.

    The Neumann box Laplacian and the potential q (g . x) both separate, so
    S/S0 = prod_i slab_pgse_signal(L_i, D, delta, Delta, q g_i).
    lengths_um: shape (3,) in um; direction: shape (3,), any non-zero length.
    """
    L = np.asarray(lengths_um, dtype=float).reshape(-1)
    g = np.asarray(direction, dtype=float).reshape(-1)
    if L.shape != g.shape:
        raise ValueError("lengths_um and direction must have the same shape")
    g = g / np.linalg.norm(g)
    s = 1.0 + 0.0j
    for Li, gi in zip(L, g):
        if gi != 0.0:
            s *= slab_pgse_signal(Li, D, delta_ms, Delta_ms, q_per_um_ms * gi)
    return complex(s)
