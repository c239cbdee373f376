r"""Dense matrix-formalism signals for one sequence, with an exact hand-written reverse mode.

Model (K modes, n measurements sharing one piecewise-constant waveform f(t))::

    d nu_c / dt = -(Lambda + i q_c f(t) G_c) nu_c,   nu_c(0) = nu0,   S_c = nu0^T nu_c(TE),
    Lambda = diag(lam),   G_c = sum_i g_ci W_i,

lam (K,) in 1/ms, W (3, K, K) real symmetric in um, nu0 (K,) in um^{3/2}, q_c in 1/(um ms),
g_c (3,) unit directions; S_c in um^3 (plain transpose, complex).

Forward. Columns are propagated together in complex blocks. A segment of amplitude 0 is the
diagonal factor exp(-dt lam). A segment (h, f) with f != 0 applies exp(h H_c),
H_c = -Lambda - i q_c f G_c, by scaling and squaring of a truncated Taylor series (Al-Mohy &
Higham, SIAM J. Sci. Comput. 33 (2011) 488, "AH" below):

    exp(h H_c) = exp(h mu_c) exp(A_c),   h mu_c = tr(h H_c) / K,   A_c = h H_c - h mu_c I,
    x <- eta_c T_m(A_c / s) x   (s times),   eta_c = exp(h mu_c / s),   T_m = sum_{k<=m} z^k/k!,

with (m, s) minimising m*s under ||A_c||_1 / s <= theta_m (max over the block; theta_m is
computed from AH's backward-error series, `taylor_theta`) and AH's early termination of each
Taylor sum. The trace shift removes both the mean decay and the mean position (the origin of
W): only the spread of lam and of g.W enters the norm. Cost ~ 5.5 terms per unit of
h (max(lam) - min(lam))/2 + h q |f| ||g.W||_1 (off-diagonal part).

Columns are grouped: (i) q_c g_c = 0: closed form sum nu0^2 exp(-lam TE); (ii) columns that
share a direction (up to sign): G~ = g.W - tr/K is formed once per group and a Taylor term
costs one real GEMM G~ @ [Re X, Im X] (groups with equal size and scaling are stacked into
one batch); (iii) the remaining columns, in chunks sorted by norm: three GEMMs W~_i @ X and a
column scaling. No K x K exponential is ever formed.

Time reversal. If the waveform is antisymmetric in time (f(TE - t) = -f(t) segment by
segment, e.g. PGSE), the segment propagators satisfy E_{N+1-j} = conj(E_j) and every E_j is
complex symmetric, so S_c = conj(v_c)^T E_mid v_c with v_c = E_h ... E_1 nu0: only the first
half of the waveform is propagated and S is real.

Reverse mode. `SequencePropagator.vjp` returns the exact derivative of the computed discrete
map (the Taylor polynomials with the same m, s and early-termination counts, the shifts,
eta factors and the time-reversal formula), recomputing the Taylor terms of each sub-step
from a checkpoint of its input (equal to the forward ones up to rounding). (m, s) and the
term counts are piecewise constant in the inputs and are treated as fixed. Cost: about three
forward passes (recomputation, adjoint recursion, and the W_bar update, a rank-(terms x
columns) GEMM per sub-step). Cotangent convention for a real objective J: for a complex
quantity z, z_bar = dJ/dRe(z) + i dJ/dIm(z), so that dJ = Re(sum conj(z_bar) dz); for a real
input x, x_bar = dJ/dx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import gammaln

__all__ = [
    "UNIT_ROUNDOFF",
    "taylor_theta",
    "choose_taylor_parameters",
    "SequencePropagator",
    "propagate",
    "signal_vjp",
    "exp_divided_differences",
]

#: Unit roundoff of IEEE double, the default Taylor tolerance.
UNIT_ROUNDOFF = 2.0**-53
_M_MAX = 55
#: Columns per chunk of mixed-direction measurements (GEMM width vs. shared (m, s)).
_MIXED_CHUNK = 64
#: OpenBLAS (SkylakeX kernels, the scipy-openblas wheels) runs a GEMM with M*N*K <= 2^20
#: through unpacked small-matrix kernels; a narrow G @ X above that re-packs G on every call
#: and runs at half speed, so narrow products are split into calls below this size.
_GEMM_SMALL_MNK = 2**20
#: Cache budget for the stacked G~ of a shared batch (bytes): larger stacks stream from memory.
_G_STACK_BYTES = 8 * 2**20


# --------------------------------------------------------------------------------------------
# Taylor degree and scaling (Al-Mohy & Higham 2011, section 3)
# --------------------------------------------------------------------------------------------


@cache
def _u_coefficients(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, log|u_n|, sign u_n) for n = m+1 .. m+300 of u(x) in `_log_backward_error_ratio`."""
    n = np.arange(m + 1, m + 301, dtype=float)
    log_mag = gammaln(n) - gammaln(n + 1.0) - gammaln(n - m) - gammaln(m + 1.0)
    sign = np.where((np.arange(m + 1, m + 301) + m + 1) % 2 == 0, 1.0, -1.0)
    return n, log_mag, sign


def _log_backward_error_ratio(m: int, theta: float) -> float:
    """log(h~_{m+1}(theta) / theta) of AH eq. (3.7)-(3.8), evaluated in the scaled variable.

    h_{m+1}(x) = log(e^{-x} T_m(x)) = log(1 - u(x)) with, by the partial alternating binomial
    sum sum_{k<=m} (-1)^k C(n,k) = (-1)^m C(n-1,m),
        u(x) = sum_{n>m} (-1)^{n+m+1} C(n-1, m) / n! x^n,
    and h~ takes absolute values of the coefficients of h. The powers in
    log(1 - u) = -u - u^2/2 - u^3/3 - ... start at degree 2(m+1) and only matter when
    sum |u_n| theta^n is not tiny; three terms are then far more than enough for the theta
    of interest. 300 terms leave a tail below 1e-100 for theta <= 30.
    """
    n, log_mag, sign = _u_coefficients(m)
    log_terms = log_mag + n * math.log(theta)
    top = float(np.max(log_terms))
    log_sum = top + math.log(float(np.sum(np.exp(log_terms - top))))
    if log_sum > math.log(1e-20):
        n_terms = m + 301
        full = np.zeros(n_terms)
        full[m + 1 :] = sign * np.exp(log_terms)
        u2 = np.convolve(full, full)[:n_terms]
        u3 = np.convolve(u2, full)[:n_terms]
        log_sum = math.log(float(np.sum(np.abs(full + u2 / 2.0 + u3 / 3.0))))
    return log_sum - math.log(theta)


@cache
def taylor_theta(m: int, tol: float = UNIT_ROUNDOFF) -> float:
    """theta_m(tol): the largest ||A||_1 (dimensionless) for which T_m(A) = exp(A + dA) with
    ||dA||_1 <= tol ||A||_1 (AH eq. (3.8)), found by bisection in log(theta).

    For tol = 2^-53 this reproduces AH Table 3.1 / Higham "Functions of Matrices" Table A.3.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    log_tol = math.log(tol)
    lo, hi = math.log(1e-300), math.log(30.0)
    if _log_backward_error_ratio(m, math.exp(hi)) <= log_tol:
        return math.exp(hi)
    root = brentq(lambda z: _log_backward_error_ratio(m, math.exp(z)) - log_tol, lo, hi, xtol=1e-13)
    return math.exp(root)


def choose_taylor_parameters(
    norm: float, tol: float = UNIT_ROUNDOFF, m_max: int = _M_MAX
) -> tuple[int, int]:
    """(m, s) minimising the number of matrix-vector products m*s subject to
    ||A||_1 / s <= theta_m(tol) (AH eq. (3.11) with alpha_1 = ||A||_1).

    norm: ||A||_1 of the (shifted, time-scaled, dimensionless) generator, >= 0.
    Returns (0, 1) for norm == 0. Ties go to the smaller m (as in scipy's expm_multiply).
    """
    norm = float(norm)
    if not np.isfinite(norm) or norm < 0:
        raise ValueError(f"norm must be finite and >= 0, got {norm}")
    if norm == 0.0:
        return 0, 1
    best = None
    for m in range(1, m_max + 1):
        s = max(1, math.ceil(norm / taylor_theta(m, tol)))
        if best is None or m * s < best[0] * best[1]:
            best = (m, s)
    return best

# --------------------------------------------------------------------------------------------
# Column batches
# --------------------------------------------------------------------------------------------
#
# A batch holds a block X of shape (nb, K, n_g): nb column groups of n_g columns. Shared
# batches: group b has one direction g_b and G~_b = g_b.W - t_b I, t_b = tr(g_b.W)/K, so a
# Taylor term costs one (stacked) real GEMM. Mixed batches (nb = 1): every column has its own
# direction, and the term costs three GEMMs with W~_i = W_i - tr(W_i)/K I. In both cases
#
#     A_c / s = diag(dvec) + a_s,c G~_c,   dvec = -h (lam - mean lam) / s,   a_s,c = -i h q_c f / s,
#
# and the trace shift leaves the scalar eta_c = exp((-h mean(lam) + a_c t_c) / s).


@dataclass
class _Plan:
    """One Taylor segment of one batch: A_c/s = diag(dvec) + coef (G~ or W~_i terms) with
    dvec (K,) real, coef (nb, n_g) = a_s for shared or (3, n_g) = a_s,c g_ci for mixed
    batches; coef2 = [coef, coef] for a block of twice the width."""

    h: float
    m: int
    s: int
    a: np.ndarray  # (nb, n_g) a_c = -i h q_c f
    eta: np.ndarray  # (nb, n_g)
    dvec: np.ndarray
    coef: np.ndarray
    coef2: np.ndarray


class _Batch:
    cols: np.ndarray  # (nb, n_g) measurement indices
    qe: np.ndarray  # (nb, n_g) effective q (sign-canonicalised with the direction)
    dirs: np.ndarray  # (nb, n_g, 3)
    t: np.ndarray  # (nb, n_g) tr(G_c)/K
    d: np.ndarray  # (nb, K, 1 or n_g) diag(G~_c)
    o: np.ndarray  # (nb, K, 1 or n_g) off-diagonal absolute column sums of G_c (or a bound)

    def norms(self, h: float, f: float, lam_c: np.ndarray) -> np.ndarray:
        """||A_c||_1 per column (exact for shared, an upper bound for mixed), (nb, n_g)."""
        a = (-1j * h * f) * self.qe[:, None, :]
        diag = np.abs(-h * lam_c[None, :, None] + a * self.d)
        return np.max(diag + np.abs(a) * self.o, axis=1)


class _SharedBatch(_Batch):
    def __init__(self, groups, W):
        """groups: [(cols (n_g,), qe (n_g,), g (3,), t, diag(G~) (K,), offdiag abs sums (K,))]."""
        self.cols = np.stack([g[0] for g in groups])
        self.qe = np.stack([g[1] for g in groups])
        self.g = np.stack([g[2] for g in groups])  # (nb, 3)
        n_g = self.cols.shape[1]
        self.dirs = np.repeat(self.g[:, None, :], n_g, axis=1)
        self.W = W
        self.t = np.repeat(np.array([g[3] for g in groups])[:, None], n_g, axis=1)
        self.d = np.stack([g[4] for g in groups])[:, :, None]
        self.o = np.stack([g[5] for g in groups])[:, :, None]
        self.P = None

    @staticmethod
    def group(cols, qe, g, W, trW):
        """The tuple describing one shared-direction group (see __init__)."""
        G = np.tensordot(g, W, axes=1)
        dg = np.diag(G).copy()
        t = float(g @ trW)
        # G is symmetric: row sums (contiguous) equal column sums
        return cols, qe, g, t, dg - t, np.abs(G).sum(axis=1) - np.abs(dg)

    def gstack(self) -> np.ndarray:
        """(nb, K, K) G~_b; rebuilt on demand (3 K^2 flops each) rather than kept."""
        K = self.W.shape[1]
        Gt = np.tensordot(self.g, self.W, axes=1)
        idx = np.arange(K)
        Gt[:, idx, idx] -= (np.trace(Gt, axis1=1, axis2=2) / K)[:, None]
        return Gt

    def begin(self):
        self._Gt = self.gstack()

    def end(self):
        self._Gt = None

    def apply(self, B, out, dcoef, acoef):
        """out = diag(dcoef) B + acoef * (G~ B) for B, out (nb, K, n_g) complex."""
        K, n_g = B.shape[1:]
        cw = (_GEMM_SMALL_MNK // (K * K)) // 2  # complex columns per small-kernel call
        if cw < 1 or cw >= n_g:
            Y = np.matmul(self._Gt, B.view(np.float64)).view(np.complex128)
        else:
            Y = np.empty_like(B)
            for c0 in range(0, n_g, cw):
                sl = slice(c0, min(c0 + cw, n_g))
                np.matmul(self._Gt, B[:, :, sl].view(np.float64), out=Y[:, :, sl].view(np.float64))
        # real diagonal on the interleaved real view: no complex promotion
        np.multiply(B.view(np.float64), dcoef[None, :, None], out=out.view(np.float64))
        Y *= acoef[:, None, :]
        out += Y
        return out

    def accumulate_w(self, Rs, Bs, plan, acc):
        """P_b += Re(conj(R) (a B)^T) = Re(conj(conj(a) R) B^T): with interleaved real views one
        GEMM per group; with acc["L"] also Re(conj(R) B^T) (the full-L cotangent) by stacking
        R under conj(a) R in the same GEMM."""
        nb, K = Bs.shape[:2]
        full = "L" in acc
        Z = np.empty((nb, 2 if full else 1) + Rs.shape[1:], dtype=np.complex128)
        np.multiply(Rs, np.conj(plan.coef)[:, None, None, :], out=Z[:, 0])
        if full:
            Z[:, 1] = Rs
        Zf = Z.view(np.float64).reshape(nb, Z.shape[1] * K, -1)
        Bf = Bs.view(np.float64).reshape(nb, K, -1)
        inc = np.matmul(Zf, Bf.transpose(0, 2, 1))
        if full:
            acc["L"] += -(plan.h / plan.s) * inc[:, K:].sum(axis=0)
            inc = inc[:, :K]
        if self.P is None:
            self.P = inc
        else:
            self.P += inc

    def finish_w(self, acc):
        if self.P is None:
            return
        # dJ = <P_b, dG~_b>, G~_b = sum_i g_bi (W_i - tr(W_i)/K I)
        acc["W"] += np.tensordot(self.g.T, self.P, axes=1)
        acc["trW"] -= self.g.T @ np.trace(self.P, axis1=1, axis2=2)
        self.P = None


class _MixedBatch(_Batch):
    def __init__(self, cols, qe, dirs, Wt_stack, Wt_diag, W_offsum, trW):
        K = Wt_stack.shape[1]
        self.cols, self.qe, self.dirs = cols[None, :], qe[None, :], dirs[None, :, :]
        self.Wt_stack = Wt_stack  # (3K, K) rows of W~_0, W~_1, W~_2
        self.t = (dirs @ trW)[None, :]  # trW (3,) = tr(W_i)/K
        self.d = (Wt_diag.T @ dirs.T)[None, :, :]
        # triangle-inequality bound on the off-diagonal column sums of g.W
        self.o = (W_offsum.T @ np.abs(dirs.T))[None, :, :]
        self.K = K

    def begin(self):
        pass

    def end(self):
        pass

    def apply(self, B, out, dcoef, acoef):
        """out = diag(dcoef) B + sum_i acoef[i] * (W~_i B); B, out (1, K, n_g) complex."""
        K, n_g = B.shape[1:]
        Y = (self.Wt_stack @ B[0].view(np.float64)).view(np.complex128).reshape(3, K, n_g)
        # real diagonal on the interleaved real view: no complex promotion
        np.multiply(B.view(np.float64), dcoef[None, :, None], out=out.view(np.float64))
        Y *= acoef[:, None, :]
        out[0] += Y.sum(axis=0)
        return out

    def accumulate_w(self, Rs, Bs, plan, acc):
        """W_bar_i += Re(conj(R) (a g_i B)^T); with acc["L"] also Re(conj(R) B^T) as a fourth
        block of rows of the same GEMM."""
        K = Bs.shape[1]
        full = "L" in acc
        Z = np.empty((4 if full else 3,) + Rs.shape[1:], dtype=np.complex128)
        np.multiply(Rs[0][None], np.conj(plan.coef)[:, None, None, :], out=Z[:3])
        if full:
            Z[3] = Rs[0]
        Zf = Z.view(np.float64).reshape(Z.shape[0] * K, -1)
        inc = (Zf @ Bs[0].view(np.float64).reshape(K, -1).T).reshape(Z.shape[0], K, K)
        if full:
            acc["L"] += -(plan.h / plan.s) * inc[3]
            inc = inc[:3]
        acc["W"] += inc
        acc["trW"] -= np.trace(inc, axis1=1, axis2=2)

    def finish_w(self, acc):
        pass


# --------------------------------------------------------------------------------------------
# Propagator
# --------------------------------------------------------------------------------------------


def _as_segments(segments) -> tuple[tuple[float, float], ...]:
    out = []
    for item in segments:
        h, f = (float(v) for v in item)
        if not (np.isfinite(h) and np.isfinite(f)) or h < 0:
            raise ValueError(f"segment durations must be finite and >= 0, got {(h, f)}")
        if h > 0:
            out.append((h, f))
    return tuple(out)


def _time_antisymmetric(segs) -> bool:
    n = len(segs)
    return n > 0 and all(
        segs[j][0] == segs[n - 1 - j][0] and segs[j][1] == -segs[n - 1 - j][1] for j in range(n)
    )


def _colnorm(B: np.ndarray) -> np.ndarray:
    """Euclidean norm of every column, (nb, K, n_g) complex -> (nb, n_g).

    AH use the infinity norm in their termination test; any norm serves that heuristic, and
    this one is a single contraction (a max-reduction over the middle axis costs ~4x more).
    """
    nb, _, n_g = B.shape
    Bf = B.view(np.float64)
    return np.sqrt(np.einsum("bjl,bjl->bl", Bf, Bf).reshape(nb, n_g, 2).sum(axis=2))


def exp_divided_differences(lam: np.ndarray, t: float) -> np.ndarray:
    """D (K, K): D_jk = (e^{-t lam_j} - e^{-t lam_k}) / (lam_j - lam_k), D_jj = -t e^{-t lam_j}.

    The Frechet derivative of exp(-t L) at L = diag(lam): d exp(-t L)[E] = D * E (entrywise).
    With lo = min, hi = max of the pair, D = e^{-t lo} expm1(-t (hi - lo)) / (hi - lo): no
    cancellation, and no overflow for any t (hi - lo) since expm1 of a negative argument is
    bounded. lam in 1/ms, t in ms; D in ms.
    """
    lo = np.minimum(lam[:, None], lam[None, :])
    gap = np.abs(lam[:, None] - lam[None, :])
    x = t * gap
    small = x < 1e-8
    ratio = np.where(small, -t * (1.0 - 0.5 * x), np.expm1(-x) / np.where(small, 1.0, gap))
    return np.exp(-t * lo) * ratio


def _re_outer(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Re(sum over batch and columns of conj(a) b^T) for A, B (nb, K, n_g) complex -> (K, K)."""
    K = A.shape[1]
    Af = np.ascontiguousarray(A.transpose(1, 0, 2)).view(np.float64).reshape(K, -1)
    Bf = np.ascontiguousarray(B.transpose(1, 0, 2)).view(np.float64).reshape(K, -1)
    return Af @ Bf.T


class SequencePropagator:
    """Signals of one sequence and their exact reverse-mode derivative.

    Parameters
    ----------
    lam : (K,) real eigenvalues (1/ms); T2 decay may be folded in by the caller.
    W : (3, K, K) real moment matrices (um); symmetrised internally (must be symmetric to
        1e-10 relative).
    nu0 : (K,) real initial coefficients (um^{3/2}).
    readout : optional (K,) real read-out coefficients a (um^{3/2}): S_c = a^T nu_c(TE). None:
        a = nu0 (a uniform spin density). With a != nu0 a time-antisymmetric waveform gives
        S_c = conj(E_h..E_1 a)^T E_mid (E_h..E_1 nu0): two propagated columns per measurement.
    segments : ((dt_ms, f), ...) piecewise-constant normalised waveform, dt >= 0 (zero-length
        segments are dropped).
    q : (n,) gradient strengths (1/(um ms)).
    directions : (n, 3) directions (unit; rows with q*g = 0 are allowed).
    tol : Taylor tolerance (theta_m(tol) and early termination), in [2^-53, 1).
    use_time_reversal : use S = conj(v)^T E_mid v for antisymmetric waveforms (half the work).
    vjp_memory_mb : cap on the Taylor-term stacks held at once by `vjp` (sets the batch size).

    `signals()` returns S (n,) complex (um^3); `vjp(S_bar)` returns (lam_bar (K,),
    W_bar (3, K, K) symmetric, nu0_bar (K,)), and readout_bar (K,) as a fourth entry when a
    read-out vector was given. Inputs are copied.
    """

    def __init__(
        self,
        lam,
        W,
        nu0,
        segments,
        q,
        directions,
        *,
        readout=None,
        tol: float = UNIT_ROUNDOFF,
        use_time_reversal: bool = True,
        mixed_chunk: int = _MIXED_CHUNK,
        vjp_memory_mb: float = 32.0,
    ):
        lam = np.array(lam, dtype=float)
        W = np.array(W, dtype=float)
        nu0 = np.array(nu0, dtype=float)
        q = np.atleast_1d(np.array(q, dtype=float))
        directions = np.atleast_2d(np.array(directions, dtype=float))
        if lam.ndim != 1 or lam.size == 0:
            raise ValueError(f"lam must have shape (K,) with K >= 1, got {lam.shape}")
        K = lam.size
        if W.shape != (3, K, K):
            raise ValueError(f"W must have shape (3, {K}, {K}), got {W.shape}")
        if nu0.shape != (K,):
            raise ValueError(f"nu0 must have shape ({K},), got {nu0.shape}")
        if q.ndim != 1 or directions.shape != (q.size, 3):
            raise ValueError(
                f"q must be (n,) and directions (n, 3), got {q.shape}, {directions.shape}"
            )
        if readout is not None:
            readout = np.array(readout, dtype=float)
            if readout.shape != (K,):
                raise ValueError(f"readout must have shape ({K},), got {readout.shape}")
        named = (("lam", lam), ("W", W), ("nu0", nu0), ("q", q), ("directions", directions),
                 ("readout", np.zeros(0) if readout is None else readout))
        for name, arr in named:
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} has non-finite entries")
        asym = np.max(np.abs(W - W.transpose(0, 2, 1)))
        if asym > 1e-10 * max(np.max(np.abs(W)), 1e-300):
            raise ValueError(f"W is not symmetric (max |W - W^T| = {asym:.3g})")
        if not (UNIT_ROUNDOFF <= tol < 1):
            raise ValueError(f"tol must be in [2^-53, 1), got {tol}")
        # the adjoint uses A^H = conj(A), which needs exactly symmetric W
        W = 0.5 * (W + W.transpose(0, 2, 1))

        self.K, self.n = K, q.size
        self.lam, self.W, self.nu0 = lam, W, nu0
        self.readout = readout
        self.tol = float(tol)
        self.segments = _as_segments(segments)
        self.TE = float(sum(h for h, _ in self.segments))
        self.time_reversal = bool(use_time_reversal) and _time_antisymmetric(self.segments)
        if self.time_reversal:
            half = len(self.segments) // 2
            self._prop_segments = self.segments[:half]
            self._mid = self.segments[half][0] if len(self.segments) % 2 else 0.0
        else:
            self._prop_segments = self.segments
            self._mid = 0.0
        self._lbar = float(lam.mean())
        self._vjp_bytes = float(vjp_memory_mb) * 2.0**20

        self._zero_cols, self.batches = self._make_batches(q, directions, max(1, int(mixed_chunk)))
        self._plans = [self._make_plans(b) for b in self.batches]
        self._S = None
        self._checkpoints = None

    # -- set-up -------------------------------------------------------------------------------

    def _segment_params(self, norms_fn):
        """[(m, s) or None] per propagated segment for column norms norms_fn(h, f)."""
        out = []
        for h, f in self._prop_segments:
            if f == 0.0:
                out.append(None)
            else:
                norm = float(np.max(norms_fn(h, f)))
                out.append(choose_taylor_parameters(norm, self.tol))
        return out

    def _make_batches(self, q, directions, chunk):
        K = self.K
        lam_c = self.lam - self._lbar
        qg_zero = (q == 0.0) | np.all(directions == 0.0, axis=1)
        nz = np.flatnonzero(~qg_zero)
        if nz.size == 0 or not any(f != 0.0 for _, f in self._prop_segments):
            # no gradient acts during the propagated part: every column is diagonal
            return np.arange(q.size), []
        zero_cols = np.flatnonzero(qg_zero)
        # canonical sign (first non-zero component positive), so g and -g share G
        d = directions[nz].copy()
        qe = q[nz].copy()
        first = np.argmax(d != 0.0, axis=1)
        flip = d[np.arange(nz.size), first] < 0
        d[flip] *= -1.0
        qe[flip] *= -1.0
        uniq, inv, counts = np.unique(d, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        batches: list[_Batch] = []
        trW = np.trace(self.W, axis1=1, axis2=2) / K

        # shared directions: batch groups of equal size and equal s per segment
        keyed: dict = {}
        for u in np.flatnonzero(counts >= 2):
            members = np.flatnonzero(inv == u)
            grp = _SharedBatch.group(nz[members], qe[members], uniq[u], self.W, trW)
            probe = _SharedBatch([grp], self.W)
            ms = self._segment_params(lambda h, f: probe.norms(h, f, lam_c))
            key = (members.size, tuple(None if p is None else p[1] for p in ms))
            m_max = max([p[0] for p in ms if p is not None], default=1)
            keyed.setdefault(key, []).append((grp, m_max))
        for (n_g, _), items in keyed.items():
            per_group = 3 * K * (max(m for _, m in items) + 1) * n_g * 16.0
            nb_max = max(1, min(int(self._vjp_bytes // per_group), _G_STACK_BYTES // (8 * K * K)))
            for start in range(0, len(items), nb_max):
                batches.append(_SharedBatch([g for g, _ in items[start : start + nb_max]], self.W))

        # the rest: mixed batches, chunked after sorting by norm so a chunk shares (m, s) well
        single = np.flatnonzero(counts[inv] < 2)
        if single.size:
            Wt = self.W.copy()
            idx = np.arange(K)
            Wt[:, idx, idx] -= trW[:, None]
            Wt_stack = Wt.reshape(3 * K, K)
            Wt_diag = np.stack([np.diag(w) for w in Wt])  # (3, K)
            W_off = np.abs(self.W).sum(axis=1) - np.abs(np.stack([np.diag(w) for w in self.W]))
            hmax, fmax = max(
                (s for s in self._prop_segments if s[1] != 0.0), key=lambda s: s[0] * abs(s[1])
            )
            probe = _MixedBatch(nz[single], qe[single], d[single], Wt_stack, Wt_diag, W_off, trW)
            order = np.argsort(probe.norms(hmax, fmax, lam_c)[0], kind="stable")
            for start in range(0, order.size, chunk):
                sel = single[order[start : start + chunk]]
                batches.append(_MixedBatch(nz[sel], qe[sel], d[sel], Wt_stack, Wt_diag, W_off, trW))
        return zero_cols, batches

    def _make_plans(self, b: _Batch):
        plans = []
        lam_c = self.lam - self._lbar
        for h, f in self._prop_segments:
            if f == 0.0:
                plans.append(("diag", h))
                continue
            m, s = choose_taylor_parameters(float(np.max(b.norms(h, f, lam_c))), self.tol)
            a = (-1j * h * f) * b.qe
            a_s = a / s
            dvec = -h * lam_c / s
            coef = a_s if isinstance(b, _SharedBatch) else a_s[0][None, :] * b.dirs[0].T  # (3, n_g)
            eta = np.exp((-h * self._lbar + a * b.t) / s)
            coef2 = np.concatenate([coef, coef], axis=1)
            plans.append(("taylor", _Plan(h, m, s, a, eta, dvec, coef, coef2)))
        return plans

    @property
    def stats(self) -> dict:
        """Cost summary: zero columns, per batch its kind, shape (nb, n_g) and [(m, s)] per
        Taylor segment; after a forward run, Taylor terms evaluated per batch."""
        out = {
            "n_zero": int(self._zero_cols.size),
            "time_reversal": self.time_reversal,
            "batches": [],
        }
        for b, plans in zip(self.batches, self._plans):
            out["batches"].append(
                {
                    "kind": "shared" if isinstance(b, _SharedBatch) else "mixed",
                    "shape": tuple(int(v) for v in b.cols.shape),
                    "m_s": [(p.m, p.s) for kind, p in plans if kind == "taylor"],
                }
            )
        if self._checkpoints is not None:
            out["terms"] = [
                sum(ck[3] for ck in cks if ck[0] == "taylor") for cks in self._checkpoints
            ]
        return out

    # -- forward ------------------------------------------------------------------------------

    def _substep(self, b: _Batch, plan: _Plan, X: np.ndarray):
        """One scaled Taylor step eta * T_m(A/s) X with AH early termination (all columns of
        the batch converged); returns (eta F, number of terms used)."""
        tol = self.tol
        F = X.copy()
        bufs = (np.empty_like(X), np.empty_like(X))
        B = X
        c1 = _colnorm(B)
        csum = c1.copy()
        used = 0
        for k in range(1, plan.m + 1):
            Bn = bufs[k % 2]
            b.apply(B, Bn, plan.dvec, plan.coef)
            Bn *= 1.0 / k
            F += Bn
            used = k
            B = Bn
            c2 = _colnorm(B)
            csum += c2
            # ||F|| <= csum, so the exact norm is only needed once the bound can pass
            if np.all(c1 + c2 <= tol * csum) and np.all(c1 + c2 <= tol * _colnorm(F)):
                break
            c1 = c2
        F *= plan.eta[:, None, :]
        return F, used

    def _forward_batch(self, bi: int, start: np.ndarray):
        b, plans = self.batches[bi], self._plans[bi]
        nb, n_g = b.cols.shape
        X = np.empty((nb, self.K, n_g), dtype=np.complex128)
        X[...] = start[None, :, None]
        cks = []  # (kind, plan index, input block, terms used)
        b.begin()
        for pi, (kind, plan) in enumerate(plans):
            if kind == "diag":
                cks.append(("diag", pi, X, 0))
                X = X * np.exp(-plan * self.lam)[None, :, None]
                continue
            for _ in range(plan.s):
                Xin = X
                X, used = self._substep(b, plan, X)
                cks.append(("taylor", pi, Xin, used))
        b.end()
        return X, cks

    def signals(self) -> np.ndarray:
        """S (n,) complex in um^3 (computed once, then cached)."""
        if self._S is not None:
            return self._S.copy()
        S = np.empty(self.n, dtype=np.complex128)
        read = self.nu0 if self.readout is None else self.readout
        if self._zero_cols.size:
            S[self._zero_cols] = np.sum(read * self.nu0 * np.exp(-self.TE * self.lam))
        # the read-out columns, propagated too when they differ from nu0 (time reversal)
        pair = self.time_reversal and self.readout is not None
        self._checkpoints, self._finals, self._read = [], [], []
        for bi, b in enumerate(self.batches):
            X, cks = self._forward_batch(bi, self.nu0)
            self._checkpoints.append(cks)
            self._finals.append(X)
            if pair:
                self._read.append(self._forward_batch(bi, self.readout))
            if pair:
                w = np.exp(-self._mid * self.lam)
                S[b.cols] = np.einsum("k,bkc->bc", w, np.conj(self._read[bi][0]) * X)
            elif self.time_reversal:
                w = np.exp(-self._mid * self.lam)
                S[b.cols] = np.einsum("k,bkc->bc", w, X.real**2 + X.imag**2)
            else:
                S[b.cols] = np.einsum("k,bkc->bc", read, X)
        self._S = S
        return S.copy()

    # -- reverse ------------------------------------------------------------------------------

    def _substep_vjp(self, b: _Batch, plan: _Plan, Xin, Xbar, used, acc):
        """Pull Xbar back through eta * T_used(A/s) Xin; accumulates parameter cotangents.

        The Taylor terms B_k = (A/s) B_{k-1} / k are recomputed from the checkpoint Xin while
        the adjoint runs r_used = Fbar, r_{k-1} = Fbar + (A/s)^H r_k / k. The two recursions
        are independent, so each step applies A/s once to the block [B_{k-1}, conj(r_j / j)]
        of twice the width, using (A/s)^H r = conj((A/s) conj(r)) (A is complex symmetric).
        The gradient pairs r_k / k with B_{k-1}.
        """
        nb, K, n_g = Xin.shape
        eta = plan.eta[:, None, :]
        Fbar = Xbar * np.conj(eta)
        F = Xin.copy()
        r = Fbar
        if used:
            Bs = np.empty((nb, K, used, n_g), dtype=np.complex128)
            Rs = np.empty_like(Bs)
            Bs[:, :, 0, :] = Xin
            C = np.empty((nb, K, 2 * n_g), dtype=np.complex128)
            D = np.empty_like(C)
            C[:, :, :n_g] = Xin
            for k in range(1, used + 1):
                j = used + 1 - k
                slot = Rs[:, :, j - 1, :]
                np.multiply(r, 1.0 / j, out=slot)
                np.conjugate(slot, out=C[:, :, n_g:])
                b.apply(C, D, plan.dvec, plan.coef2)
                Bk = Bs[:, :, k, :] if k < used else np.empty_like(Xin)
                np.multiply(D[:, :, :n_g], 1.0 / k, out=Bk)
                F += Bk
                C[:, :, :n_g] = Bk
                r = np.conjugate(D[:, :, n_g:])
                r += Fbar
        eta_bar = np.einsum("bjc,bjc->bc", np.conj(F), Xbar)
        if used:
            # diagonal of A: -h (L - tr(L)/K) / s
            hs = plan.h / plan.s
            Q = np.einsum("bjkl,bjkl->j", Rs.view(np.float64), Bs.view(np.float64))
            if "L" not in acc:
                acc["lam"] += -hs * Q
            acc["lbar"] += hs * Q.sum()
            b.accumulate_w(Rs, Bs, plan, acc)
        # eta_c = exp((-h mean(lam) + a_c t_c)/s), t_c = g_c . tr(W)/K
        omega = np.conj(eta_bar) * plan.eta / plan.s
        acc["lbar"] += -plan.h * np.sum(omega.real)
        tbar = np.real(omega * plan.a)
        acc["trW"] += np.einsum("bci,bc->i", b.dirs, tbar)
        return r

    def vjp(self, S_bar, full_lam: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reverse mode for a real J with S_bar_c = dJ/dRe(S_c) + i dJ/dIm(S_c), i.e.
        dJ = Re(sum_c conj(S_bar_c) dS_c).

        S_bar: (n,) complex or real. Returns (lam_bar, W_bar (3, K, K), nu0_bar (K,)), the
        exact gradient of J through the computed map (units of J times ms, 1/um, um^{-3/2});
        W_bar is symmetric, so dJ = sum_i <W_bar_i, dW_i> for symmetric dW.

        lam_bar is (K,) = dJ/dlam, or with full_lam the symmetric (K, K) cotangent Lbar of a
        full symmetric generator L in place of diag(lam) (the reduced Phi^T L Phi when the
        basis is held fixed): dJ = <Lbar, dL> for symmetric dL, and diag(Lbar) = dJ/dlam. It
        differentiates the same algorithm with L general (A = -h (L - tr(L)/K) + a G~ in the
        Taylor terms, exp(-t L) by its Frechet derivative `exp_divided_differences`) and costs
        about one more forward-equivalent GEMM.
        """
        S_bar = np.asarray(S_bar)
        if S_bar.shape != (self.n,):
            raise ValueError(f"S_bar must have shape ({self.n},), got {S_bar.shape}")
        S_bar = S_bar.astype(np.complex128)
        if self._checkpoints is None:
            self.signals()
        K, lam, nu0 = self.K, self.lam, self.nu0
        separate = self.readout is not None
        read = self.readout if separate else nu0
        acc = {"lam": np.zeros(K), "lbar": 0.0, "W": np.zeros((3, K, K)), "trW": np.zeros(3)}
        if full_lam:
            acc["L"] = np.zeros((K, K))
        nu0_bar = np.zeros(K)
        read_bar = np.zeros(K)   # with a separate read-out; else it is part of nu0_bar
        if self._zero_cols.size:
            e = np.exp(-self.TE * lam)
            sr = np.sum(S_bar[self._zero_cols].real)
            if full_lam:
                acc["L"] += sr * exp_divided_differences(lam, self.TE) * np.outer(read, nu0)
            else:
                acc["lam"] += -self.TE * sr * read * nu0 * e
            nu0_bar += sr * read * e
            if separate:
                read_bar += sr * nu0 * e
            else:
                nu0_bar += sr * nu0 * e
        for bi, b in enumerate(self.batches):
            X = self._finals[bi]
            Sb = S_bar[b.cols]  # (nb, n_g)
            if self.time_reversal and separate:
                # S = conj(Xa)^T exp(-mid L) X: Xbar = w Xa S_bar, Xa_bar = w X conj(S_bar)
                Xa, cka = self._read[bi]
                w = np.exp(-self._mid * lam)
                if full_lam:
                    M = _re_outer(Xa, X * np.conj(Sb)[:, None, :])
                    acc["L"] += exp_divided_differences(lam, self._mid) * M
                else:
                    P = np.conj(Xa) * X
                    Q = (np.einsum("bjc,bc->j", P.real, Sb.real)
                         + np.einsum("bjc,bc->j", P.imag, Sb.imag))
                    acc["lam"] += -self._mid * w * Q
                Xbar = w[None, :, None] * Xa * Sb[:, None, :]
                Xa_bar = w[None, :, None] * X * np.conj(Sb)[:, None, :]
                b.begin()
                read_bar += self._pull_back(bi, cka, Xa_bar, acc, full_lam).real.sum(axis=(0, 2))
                b.end()
            elif self.time_reversal:
                # S = conj(X)^T exp(-mid L) X is real: only Re(S_bar) matters
                w = np.exp(-self._mid * lam)
                if full_lam:
                    M = _re_outer(X, X * Sb.real[:, None, :])
                    acc["L"] += exp_divided_differences(lam, self._mid) * M
                else:
                    X2 = X.real**2 + X.imag**2
                    acc["lam"] += -self._mid * w * np.einsum("bjc,bc->j", X2, Sb.real)
                Xbar = (2.0 * w)[None, :, None] * X * Sb.real[:, None, :]
            else:
                rb = np.einsum("bjc,bc->j", X, np.conj(Sb)).real
                if separate:
                    read_bar += rb
                else:
                    nu0_bar += rb
                Xbar = read[None, :, None] * Sb[:, None, :]
            b.begin()
            nu0_bar += self._pull_back(bi, self._checkpoints[bi], Xbar, acc,
                                       full_lam).real.sum(axis=(0, 2))
            b.end()
            b.finish_w(acc)
        idx = np.arange(K)
        if full_lam:
            lam_bar = acc["L"]
            lam_bar[idx, idx] += acc["lbar"] / K
            lam_bar = 0.5 * (lam_bar + lam_bar.T)
        else:
            lam_bar = acc["lam"] + acc["lbar"] / K
        W_bar = acc["W"]
        # t = tr(W_i)/K enters eta and the shifted matrices W~_i / G~
        W_bar[:, idx, idx] += (acc["trW"] / K)[:, None]
        W_bar = 0.5 * (W_bar + W_bar.transpose(0, 2, 1))
        if separate:
            return lam_bar, W_bar, nu0_bar, read_bar
        return lam_bar, W_bar, nu0_bar

    def _pull_back(self, bi: int, checkpoints, Xbar, acc, full_lam: bool) -> np.ndarray:
        """Xbar at the final state of batch bi's propagation -> its cotangent at the start
        (the parameter cotangents accumulate in acc); between b.begin() and b.end()."""
        b, plans, lam = self.batches[bi], self._plans[bi], self.lam
        for kind, pi, Xin, used in reversed(checkpoints):
            plan = plans[pi][1]
            if kind == "diag":
                e = np.exp(-plan * lam)
                if full_lam:
                    acc["L"] += exp_divided_differences(lam, plan) * _re_outer(Xbar, Xin)
                else:
                    M = np.einsum("bjc,bjc->j", np.conj(Xbar), Xin).real
                    acc["lam"] += -plan * e * M
                Xbar = Xbar * e[None, :, None]
            else:
                Xbar = self._substep_vjp(b, plan, Xin, Xbar, used, acc)
        return Xbar


def propagate(lam, W, nu0, segments, q, directions, **kwargs) -> np.ndarray:
    """Signals S (n,) complex (um^3) of one sequence; arguments as for `SequencePropagator`."""
    return SequencePropagator(lam, W, nu0, segments, q, directions, **kwargs).signals()


def signal_vjp(lam, W, nu0, segments, q, directions, S_bar, *, full_lam=False, **kwargs):
    """(S (n,), (lam_bar, W_bar (3, K, K), nu0_bar (K,))) for cotangents S_bar (n,),
    S_bar_c = dJ/dRe(S_c) + i dJ/dIm(S_c); see `SequencePropagator.vjp`."""
    prop = SequencePropagator(lam, W, nu0, segments, q, directions, **kwargs)
    S = prop.signals()
    return S, prop.vjp(S_bar, full_lam=full_lam)
