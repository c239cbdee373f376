r"""Spectrum slicing with the block Krylov-Schur solver: every eigenpair of (L, M) in
[sigma, b) as s slices [t_i, t_{i+1}), the slices divided over the MPI ranks.

Why: the block method spends most of its time on dense Gram-Schmidt against the whole basis
and on thick restarts, both ~n ncv^2 for a basis of ncv ~ 2 nev vectors (benchmarks/
eigensolve.py at n = 12, 430 modes: 52 % of 46 s, the shift-and-invert solves 21 %). s slices
of nev / s pairs each cost ~1/s of that, for s - 1 extra inertia counts and s factorisations;
and whole slices go to different ranks, which then never communicate inside a solve.

The slice [t_i, t_{i+1}) holds c_i = N(t_{i+1}) - N(t_i) eigenvalues, N the Sylvester inertia
count. With the shift at its midpoint m_i, the c_i eigenvalues nearest m_i are exactly the
slice's (every eigenvalue inside is closer to m_i than half the width, every one outside is
not), so the block solver asks for c_i + margin nearest pairs (the margin only speeds up the
convergence of the pairs at the slice's edges) and keeps those in the slice; a slice that does
not yield exactly c_i pairs is an error (`SolverError`; the caller falls back to the unsliced
block method). Boundaries: Weyl's law N(lambda) ~ lambda^{3/2} for equal counts,
t_i = sigma + (b - sigma) (i / s)^{2/3}.

Parallel: on P > 1 ranks every rank gathers the whole L and M (sequential copies), solves its
slices with sequential MUMPS, and the eigenvectors' rows go to their owners by one all-to-all.
A slice is solved by the same sequential arithmetic on any number of ranks (the start block
is seeded by the slice index), so the eigenpairs do not depend on the rank count. Memory: each
rank holds whole copies of L, M, one factor and the basis vectors of its slices.
"""

from __future__ import annotations

import math
import time

import dolfinx_solver  # noqa: F401
import numpy as np
from petsc4py import PETSc

from spinverse_fem.errors import SolverError

#: eigenpairs per slice aimed at when the number of slices is not given
PAIRS_PER_SLICE = 128
#: extra pairs asked for per slice: count // MARGIN_DIV (they speed up the edge pairs)
MARGIN_DIV = 8


def slice_count(nev: int, ranks: int) -> int:
    """s: about PAIRS_PER_SLICE pairs per slice, at least one slice per rank, a multiple of
    the number of ranks (equal work per rank)."""
    s = max(ranks, math.ceil(nev / PAIRS_PER_SLICE))
    return ranks * math.ceil(s / ranks)


def weyl_bounds(sigma: float, b: float, s: int) -> np.ndarray:
    """s + 1 boundaries from sigma to b splitting Weyl's count N ~ lambda^{3/2} evenly."""
    return sigma + (b - sigma) * (np.arange(s + 1) / s) ** (2.0 / 3.0)


def assign(counts: list[int], ranks: int) -> list[int]:
    """Owner rank of every slice: largest slices first to the least loaded rank (the same
    decision on every rank)."""
    load = [0] * ranks
    owner = [0] * len(counts)
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += counts[i]
    return owner


def balance(count, t: list, n_at: list, sigma: float, target: int,
            max_counts: int) -> tuple[list, list]:
    """Boundaries t (ascending) and counts n_at = N(t) adjusted towards `target` eigenvalues
    per slice: a slice with more than 1.5 target is split where Weyl's law halves its count
    (one more inertia count; at most max_counts of them, since an exact cluster cannot be
    split), then neighbours are merged while together they hold at most `target`.
    Spectra are far from Weyl's law at the bottom (a sealed compartment adds a cluster near
    zero; open tissue leaves a wide gap above the membrane-bound modes)."""
    t, n_at = list(t), list(n_at)
    for _ in range(max_counts):
        sizes = [n_at[i + 1] - n_at[i] for i in range(len(t) - 1)]
        i = int(np.argmax(sizes))
        if sizes[i] <= 1.5 * target:
            break
        lo, hi = t[i] - sigma, t[i + 1] - sigma
        mid = sigma + (0.5 * (lo ** 1.5 + hi ** 1.5)) ** (2.0 / 3.0)
        if not t[i] < mid < t[i + 1]:
            break
        t.insert(i + 1, mid)
        n_at.insert(i + 1, int(count(mid)))
    i = 0
    while i < len(t) - 2:
        if n_at[i + 2] - n_at[i] <= target:
            del t[i + 1], n_at[i + 1]
        else:
            i += 1
    return t, n_at


def _whole(A: PETSc.Mat) -> PETSc.Mat:
    """A sequential copy of the whole distributed matrix on this rank."""
    n = A.getSize()[0]
    full = PETSc.IS().createStride(n, 0, 1, comm=PETSc.COMM_SELF)
    (Aseq,) = A.createSubMatrices(full)
    full.destroy()
    return Aseq


def solve_slices(L: PETSc.Mat, M: PETSc.Mat, count, sigma: float, b: float, c_b: int, *,
                 tol: float = 1e-10, slices: int | None = None, block: int = 16,
                 margin: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(lam ascending (c_b,), this rank's rows of the M-normalised eigenvectors (n_owned,
    c_b), info) for every eigenpair in [sigma, b); count(tau): the inertia count (collective),
    c_b = count(b) already known, sigma below the spectrum."""
    from spinverse_fem.forward.block_krylov import ShiftInvert, block_krylov_schur

    comm = L.getComm().tompi4py()
    size, rank = comm.size, comm.rank
    s = slices or slice_count(c_b, size)
    t = weyl_bounds(sigma, b, s)
    seconds = dict(counts=0.0, gather=0.0, solve=0.0, redistribute=0.0)
    t0 = time.perf_counter()
    t, n_at = balance(count, list(map(float, t)),
                      [0] + [int(count(float(x))) for x in t[1:-1]] + [int(c_b)], sigma,
                      max(1, math.ceil(c_b / s)), max_counts=4 * s)
    seconds["counts"] = time.perf_counter() - t0
    work = [(i, t[i], t[i + 1], n_at[i + 1] - n_at[i]) for i in range(len(t) - 1)
            if n_at[i + 1] > n_at[i]]
    owner = assign([w[3] for w in work], size)
    t0 = time.perf_counter()
    if size > 1:
        Ls, Ms = _whole(L), _whole(M)
    else:
        Ls, Ms = L, M
    seconds["gather"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lam_own, vec_own, stats = [], [], []
    for (i, lo, hi, c), r in zip(work, owner, strict=True):
        if r != rank:
            continue
        extra = margin if margin is not None else max(8, c // MARGIN_DIV)
        op = ShiftInvert(Ls, Ms, 0.5 * (lo + hi), definite=False, redundant=False)
        try:
            res = block_krylov_schur(op, c + extra, tol=tol, block=block, seed=1000 + i)
        finally:
            op.destroy()
        inside = (res.lam >= lo) & (res.lam < hi)
        if int(inside.sum()) != c:
            # reported on every rank below (a collective decision)
            stats.append(dict(slice=i, interval=(lo, hi), count=c, found=int(inside.sum())))
            continue
        lam_own.append(res.lam[inside])
        vec_own.append(res.vecs[:, inside])
        stats.append(dict(slice=i, interval=(lo, hi), count=c, found=c, solves=res.solves,
                          restarts=res.restarts))
    seconds["solve"] = time.perf_counter() - t0
    all_stats = [x for part in comm.allgather(stats) for x in part]
    bad = [x for x in all_stats if x["found"] != x["count"]]
    if size > 1:
        Ls.destroy()
        Ms.destroy()
    if bad:
        x = bad[0]
        raise SolverError(f"block slicing: slice {x['slice']} [{x['interval'][0]:.6g}, "
                          f"{x['interval'][1]:.6g}) holds {x['count']} eigenvalues by inertia, "
                          f"the solver found {x['found']}")
    t0 = time.perf_counter()
    n_glob = L.getSize()[0]
    lam_mine = np.concatenate(lam_own) if lam_own else np.zeros(0)
    V = np.hstack(vec_own) if vec_own else np.zeros((n_glob if size > 1 else
                                                     L.getLocalSize()[0], 0))
    if size > 1:
        ranges = L.getOwnershipRanges()
        parts = comm.alltoall([np.ascontiguousarray(V[ranges[q]:ranges[q + 1]])
                               for q in range(size)])
        vecs = np.hstack(parts)
        lam = np.concatenate(comm.allgather(lam_mine))
    else:
        vecs, lam = V, lam_mine
    order = np.argsort(lam, kind="stable")
    seconds["redistribute"] = time.perf_counter() - t0
    info = dict(slices=len(work), boundaries=[float(x) for x in t], per_slice=all_stats,
                phases=seconds)
    return lam[order], np.asfortranarray(vecs[:, order]), info
