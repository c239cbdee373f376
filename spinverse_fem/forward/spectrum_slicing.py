r"""Spectrum slicing: every eigenvalue of (L, M) in an interval, by SLEPc Krylov-Schur.

SLEPc's Krylov-Schur with `EPSSetInterval` and shift-and-invert walks through [a, b) with a
sequence of shifts; at each shift an LDL^T factorisation (MUMPS) both applies the inverse and
counts the eigenvalues below the shift (Sylvester), so the slices between shifts are known to
be complete. With `EPSKrylovSchurSetPartitions(P)` the interval is cut into P sub-intervals,
each solved by its own sub-communicator with its own copy of the matrices; the sub-interval
ends are placed here so that each holds about the same number of eigenvalues (Weyl's law in 3D,
N(lambda) ~ lambda^{3/2}, scaled by the count at b).

The eigenbasis needs the K smallest eigenpairs, i.e. an interval end b with at least K
eigenvalues below it: `interval_end` finds one with a few inertia counts (Weyl's law predicts
where the count reaches K; each guess is checked by an LDL^T factorisation).

Options (prefix "spinverse_"): the solver reads -spinverse_eps_krylovschur_partitions,
-spinverse_eps_krylovschur_nev / _ncv / _mpd (the dimensions of each sub-solve) and the
ST/KSP/PC options of the sub-solves, e.g. -spinverse_st_mat_mumps_icntl_14.
"""

from __future__ import annotations

import dolfinx_solver  # noqa: F401
import numpy as np
from petsc4py import PETSc
from slepc4py import SLEPc

from spinverse_fem.errors import SolverError
from spinverse_fem.forward.eigenbasis import converged_pairs

PREFIX = "spinverse_"
#: eigenvalues per shift of the sub-solves (SLEPc's default is 40); measured at n = 8, 508
#: eigenpairs: 40 -> 13 shifts, 60 -> ..., see benchmarks/eigensolve.py
DEFAULT_NEV_PER_SHIFT = 60


def interval_end(count, k: int, guess: float, *, known: tuple[float, int] | None = None,
                 max_tries: int = 16, slack: float = 1.15) -> tuple[float, int]:
    """(b, count(b)) with count(b) >= k, and count(b) <= slack * k + 16 when a few tries allow.

    count: tau -> number of eigenvalues below tau (an inertia count, collective); guess: a
    first b > 0; known: an already counted point (tau, count) that seeds the estimate."""
    pts = []
    if known is not None and known[1] >= 0:
        pts.append((float(known[0]), int(known[1])))
    if pts and pts[0][1] > 0:
        tau, c = pts[0]
        b = tau * (1.02 * k / c) ** (2.0 / 3.0)
    else:
        b = float(guess)
    best = None
    short = tries_since_valid = 0
    for _ in range(max_tries):
        c = int(count(b))
        pts.append((b, c))
        if c >= k and (best is None or c < best[1]):
            best = (b, c)
        if best is not None and best[1] <= slack * k + 16:
            return best
        tries_since_valid = tries_since_valid + 1 if best is not None else 0
        if tries_since_valid > 3:
            return best   # a cluster straddles the target count: more eigenpairs, not more counts
        if c < k:
            short += 1
            # Weyl's estimate, doubling once it has fallen short twice (a gap in the spectrum)
            grow = (1.04 * k / c) ** (2.0 / 3.0) if c > 0 else 4.0
            b *= max(grow, 2.0) if short > 1 else grow
        else:
            # too many: back towards the last point that was short
            lo = max((p for p in pts if p[1] < k), key=lambda p: p[0], default=None)
            shrink = b * ((1.04 * k + 4) / c) ** (2.0 / 3.0)
            b = max(shrink, 0.5 * (b + lo[0])) if lo is not None else shrink
    if best is None:
        raise SolverError(f"no interval end with {k} eigenvalues below it found (last: "
                          f"{pts[-1][1]} below {pts[-1][0]:.6g})")
    return best


def subintervals(a: float, b: float, parts: int) -> list[float]:
    """P + 1 points from a to b with about equal eigenvalue counts (Weyl: N ~ lambda^{3/2})."""
    lo = max(a, 0.0)
    pts = [a] + [(lo ** 1.5 + (b ** 1.5 - lo ** 1.5) * i / parts) ** (2.0 / 3.0)
                 for i in range(1, parts)] + [b]
    return pts


def solve_interval(L: PETSc.Mat, M: PETSc.Mat, a: float, b: float, *, tol: float = 1e-10,
                   partitions: int | None = None, nev_per_shift: int | None = None,
                   deflation=None) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """All eigenpairs of (L, M) with a <= lambda < b (a below the spectrum, b not an
    eigenvalue). Returns (lam ascending, this rank's rows of each eigenvector, info) with info:
    shifts and inertias used, partitions, iterations."""
    if deflation:
        raise SolverError("spectrum slicing does not take a deflation space (SLEPc)")
    comm = L.getComm()
    size = comm.getSize()
    eps = SLEPc.EPS().create(comm)
    eps.setOptionsPrefix(PREFIX)
    eps.setOperators(L, M)
    eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    eps.setType(SLEPc.EPS.Type.KRYLOVSCHUR)
    eps.setWhichEigenpairs(SLEPc.EPS.Which.ALL)
    eps.setInterval(a, b)
    st = eps.getST()
    st.setType(SLEPc.ST.Type.SINVERT)
    parts = size if partitions is None else max(1, min(int(partitions), size))
    while size % parts:
        parts -= 1
    opts = PETSc.Options(PREFIX)
    if opts.hasName("eps_krylovschur_partitions"):
        parts = opts.getInt("eps_krylovschur_partitions")
    if parts > 1:
        eps.setKrylovSchurPartitions(parts)
        eps.setKrylovSchurSubintervals(subintervals(a, b, parts))
    nps = DEFAULT_NEV_PER_SHIFT if nev_per_shift is None else int(nev_per_shift)
    eps.setKrylovSchurDimensions(nev=nps, ncv=PETSc.DECIDE, mpd=PETSc.DECIDE)
    eps.setKrylovSchurDetectZeros(True)
    eps.setTolerances(tol, PETSc.DEFAULT)
    eps.setConvergenceTest(SLEPc.EPS.Conv.REL)
    eps.setFromOptions()
    # the sub-solves' factorisation: LDL^T by MUMPS with the inertia available
    ksp = eps.getKrylovSchurKSP()
    ksp.setType("preonly")
    pc = ksp.getPC()
    pc.setType("cholesky")
    pc.setFactorSolverType("mumps")
    pc.setFactorSetUpSolverType()
    F = pc.getFactorMatrix()
    F.setMumpsIcntl(13, 1)   # the inertia needs the whole factor on one process
    F.setMumpsIcntl(24, 1)   # detect null pivots (a shift on an eigenvalue)
    F.setMumpsCntl(3, 1e-12)
    ksp.setFromOptions()
    try:
        eps.solve()
    except Exception:
        eps.destroy()
        raise
    lams, vecs = converged_pairs(eps, L)
    shifts, inertias = eps.getKrylovSchurInertias()
    info = dict(shifts=[float(s) for s in shifts], inertias=[int(i) for i in inertias],
                partitions=int(eps.getKrylovSchurPartitions()),
                iterations=int(eps.getIterationNumber()))
    eps.destroy()
    lam = lams
    order = np.argsort(lam, kind="stable")
    return lam[order], [vecs[i] for i in order], info
