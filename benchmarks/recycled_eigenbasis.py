r"""Recycled (warm-started) eigen-solves along an inversion-like sequence of permeabilities.

Every inversion iteration solves L(kappa) phi = lambda M phi for K modes from scratch
(`solve_eigenbasis`). Between two iterations kappa changes little, so the previous iterate's
eigenbasis should make the next solve cheaper. This script measures, along a seeded sequence

    x_0 = log10(start) + s0 z_0   on the active faces (the paper start, 1 um/ms, perturbed),
    x_{i+1} = clip(x_i + delta z_i)                 (kappa_{i+1} = kappa_i 10^(delta z_i)),

(the paper's torus on the bcc grid with n cubes per side, `examples/paper_torus.toml`;
delta = 0.02 is a typical Adam step in log10 kappa), at every step i -> i + 1:

- scratch: `solve_eigenbasis(L, M, lam_max, num_modes=K)` with the default method (the
  reference for accuracy, and for time: every time is reported as a ratio to it, measured at
  the same step of the same run, since the machine is shared);
- warm strategies, each started from the exact basis at kappa_i (K + margin vectors, as
  `solve_eigenbasis` returns them), each ending exactly as `solve_eigenbasis` does: sort,
  Sylvester inertia count at the midpoint of (lambda_K, lambda_{K+1}) (a deficit is reported,
  not repaired), M-orthonormalisation (see STRATEGIES for what each one does);
- frozen: no solve at all, the old basis as it is (old eigenvalues), and its Rayleigh-Ritz
  approximation in the new L (the paper refreshes its basis every 10 iterations), both from
  the previous iterate and from kappa_0 (the basis frozen for i + 1 steps).

Per strategy and step: wall time / scratch wall time, operator applications (right-hand
sides of (L - sigma M)^{-1} where counted, iterations, PETSc MatSolve/MatMatSolve calls), max
relative eigenvalue error vs scratch over the K kept modes, the largest M-principal-angle sine
between the K-dimensional subspaces (tests/test_eigenbasis.py `m_sin_angle`), the max relative
residual ||L phi - lam M phi||_2 / lam, the max transformed residual ||(L - sigma M)^{-1}
(L phi - lam M phi)||_M (= ||T phi - theta phi||_M / theta, the quantity Krylov-Schur's
relative test bounds by tol), and the inertia check.

The slow strategies (SLOW_STRATEGIES, >= 3x scratch) are measured in the first --slow-steps
steps only (default 2).

Measured (one rank, machine loaded by another job; K = 120, 5 steps, median time ratio to
the default Krylov-Schur from scratch; the JSON files hold every step):
- n = 8 (21 504 dofs), delta = 0.02: block p = 8 from scratch 0.41 (600 solves vs 594
  single-vector solves of Krylov-Schur), warm 0.39 (584 solves); block p = 16 0.58 (864),
  warm 0.51 (768); Krylov-Schur warm 0.79 (495 solves on 3 steps, 598-608 on 2); LOBPCG 3.4;
  block Krylov-Schur with the old basis as first block 3.0; SLEPc subspace 4.6; own subspace
  iteration 7.7 (94 iterations); GD 19. delta = 0.1: block p = 8 0.46, warm 0.43.
- every strategy met the scratch accuracy (eigenvalues within 1.3e-14, subspaces within
  sin 8.5e-10) and passed the inertia check.
- frozen basis, n = 8, delta = 0.02: one step away sin 0.040 and eigenvalue error 1.7e-3
  (RR 1.1e-3), residual 0.33; five steps away sin 0.078. So the old basis saves only the first
  one or two of the ten orders of magnitude the 1e-10 tolerance asks for.

Run (serial first; one process, OMP_NUM_THREADS=1, under timeout):

    OMP_NUM_THREADS=1 timeout 1800 python benchmarks/recycled_eigenbasis.py --n 4 \
        --slow-steps 5
    OMP_NUM_THREADS=1 timeout 7200 python benchmarks/recycled_eigenbasis.py --n 8
    OMP_NUM_THREADS=1 timeout 3600 mpiexec -n 2 python benchmarks/recycled_eigenbasis.py \
        --n 4 --out /tmp/recycled_n4_2ranks.json

Writes benchmarks/results/recycled_eigenbasis_n{n}.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import dolfinx_solver  # noqa: F401  (loads libmpi before petsc4py)
import numpy as np
from mpi4py import MPI

HERE = Path(__file__).resolve().parent

#: name -> one-line description (the JSON carries it)
STRATEGIES = {
    "ks_init": "existing API: solve_eigenbasis(method='krylovschur', initial_space=old basis) "
               "(SLEPc Krylov-Schur starts from ONE random combination of the old basis)",
    "block": "block Krylov-Schur from scratch (solve_eigenbasis(method='block'), no start "
             "space): the reference for what blocking alone gives",
    "block_init": "existing API: solve_eigenbasis(method='block', initial_space=old basis) "
                  "(first block = 16 random combinations of the old basis)",
    "block_init_top": "solve_eigenbasis(method='block', initial_space=upper half of the old "
                      "basis: modes K/2.. next to the cut, which Krylov converges last)",
    "block_p32": "block method from scratch with -spinverse_bks_block 32",
    "block_init_p32": "block method, initial_space = old basis, -spinverse_bks_block 32",
    "block_p8": "block method from scratch with -spinverse_bks_block 8",
    "block_init_p8": "block method, initial_space = old basis, -spinverse_bks_block 8",
    "bks_oldblock": "block Krylov-Schur (block_krylov.block_krylov_schur) whose first block "
                    "IS the old basis plus guard random vectors (block width nev + guard)",
    "subspace": "block shift-and-invert subspace iteration + Rayleigh-Ritz from the old basis "
                "plus guard vectors (ShiftInvert, one MatMatSolve of nev + guard columns per "
                "iteration; stop on the transformed residual < tol)",
    "lobpcg": "SLEPc LOBPCG, block size >= (nev)/0.9 (all wanted pairs in one block), ST "
              "PRECOND with KSP preonly + MUMPS Cholesky of L - sigma M "
              "(setPreconditionerMat), setInitialSpace(old basis)",
    "gd": "SLEPc Generalized Davidson, ST PRECOND with KSP preonly + MUMPS Cholesky of "
          "L - sigma M, setInitialSpace(old basis), initial size = old basis width",
    "slepc_subspace": "SLEPc subspace iteration (EPSSUBSPACE) with shift-and-invert (MUMPS), "
                      "setInitialSpace(old basis)",
}
DEFAULT_STRATEGIES = ["ks_init", "block", "block_init", "block_init_top", "block_p8",
                      "block_init_p8", "block_p32", "block_init_p32", "bks_oldblock", "subspace",
                      "lobpcg", "gd", "slepc_subspace"]
#: strategies measured (>= 4x the scratch time) only in the first --slow-steps steps
SLOW_STRATEGIES = ["gd", "subspace", "bks_oldblock", "slepc_subspace"]
EVENTS = ["MatSolve", "MatMatSolve", "MatCholFctrSym", "MatCholFctrNum", "KSPSolve",
          "KSPMatSolve", "EPSSolve", "BVOrthogonalizeV", "DSSolve"]


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def build_case(comm, n: int):
    """The paper torus config on the bcc grid with n cubes per side, as a Case."""
    from spinverse_fem.config import load_config
    from spinverse_fem.inverse.case import Case

    cfg = load_config(HERE.parent / "examples" / "paper_torus.toml")
    cfg = dataclasses.replace(cfg, grid=dataclasses.replace(cfg.grid, cubes=n,
                                                            cube_um=80.0 / 3.0 / n))
    return cfg, Case(comm, cfg)


def kappa_sequence(case, steps: int, delta: float, start_spread: float, seed: int):
    """[kappa_0, ..., kappa_steps]: x_0 = start + start_spread z_0, x_{i+1} = x_i + delta z_i
    (log10 um/ms on the active faces, clipped to the inversion bounds), the same on every
    rank (numpy's generator with a fixed seed). kappa_0 depends on seed only (not on delta)."""

    p = case.params
    x = np.clip(case.start_x() + start_spread * np.random.default_rng(seed).standard_normal(
        p.size), p.lower, p.upper)
    rng = np.random.default_rng([seed, int(round(delta * 1e6))])
    out = [p.to_kappa(x)]
    for _ in range(steps):
        x = np.clip(x + delta * rng.standard_normal(p.size), p.lower, p.upper)
        out.append(p.to_kappa(x))
    return out


# --------------------------------------------------------------------------------------------
# dense helpers (collective; decisions on rank 0, broadcast)
# --------------------------------------------------------------------------------------------
def _eigh_gen(A, B, comm):
    """Generalised symmetric eigenproblem A y = mu B y (B SPD), on rank 0, broadcast."""
    import scipy.linalg as sla

    out = None
    if comm.rank == 0:
        out = sla.eigh(0.5 * (A + A.T), 0.5 * (B + B.T))
    out = comm.bcast(out, root=0)
    return np.asarray(out[0]), np.asarray(out[1])


def _vecs(X, L):
    """PETSc Vecs (for SLEPc initial spaces) of this rank's rows X (n_owned, k)."""
    out = []
    for j in range(X.shape[1]):
        v = L.createVecRight()
        v.setArray(X[:, j])
        out.append(v)
    return out


def _shifted(L, M, sigma):
    """L - sigma M, symmetric positive definite for sigma below the spectrum."""
    from petsc4py import PETSc

    P = L.copy()
    P.axpy(-sigma, M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
    P.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    P.setOption(PETSc.Mat.Option.SPD, True)
    return P


def _precond_st(eps, P):
    """ST PRECOND whose KSP is preonly + MUMPS Cholesky of P (an exact solve with P)."""
    from slepc4py import SLEPc

    st = eps.getST()
    st.setType(SLEPc.ST.Type.PRECOND)
    st.setPreconditionerMat(P)
    ksp = st.getKSP()
    ksp.setType("preonly")
    pc = ksp.getPC()
    pc.setType("cholesky")
    pc.setFactorSolverType("mumps")


def _sinvert_st(eps, sigma):
    from spinverse_fem.forward.eigenbasis import shift_invert_mumps

    shift_invert_mumps(eps, sigma)


def _precond_solve(eps, P, L, old, tol, max_it):
    """Solve a preconditioned EPS (ST PRECOND with an exact solve with P) from the old basis;
    destroys eps and P. Returns (lam, vecs, iterations, converged reason)."""
    from slepc4py import SLEPc

    _precond_st(eps, P)
    eps.setTolerances(tol, max_it)
    eps.setConvergenceTest(SLEPc.EPS.Conv.REL)
    init = _vecs(old, L)
    eps.setInitialSpace(init)
    eps.setFromOptions()
    eps.solve()
    its = int(eps.getIterationNumber())
    reason = int(eps.getConvergedReason())
    lam, vecs = _eps_pairs(eps, L)
    eps.destroy()
    P.destroy()
    for v in init:
        v.destroy()
    return lam, vecs, its, reason


def _eps_pairs(eps, L):
    from spinverse_fem.forward.eigenbasis import _columns, converged_pairs

    lam, vecs = converged_pairs(eps, L)
    return lam, _columns(vecs, L)


# --------------------------------------------------------------------------------------------
# strategies: (L, M, K, tol, old, opts) -> (lam (>= nev,), vecs (n_owned, .), info)
# old: (n_owned, q) the previous exact basis (K kept + margin), M-orthonormal
# --------------------------------------------------------------------------------------------
def _nev(K, n_glob):
    return K + min(8, n_glob - K)   # as solve_eigenbasis


def _sigma(lam_max):
    return -1e-3 * lam_max   # as solve_eigenbasis


def strat_existing(method, init=None, block=None):
    """solve_eigenbasis itself. init: None (scratch), "all" (the old basis, K + extra
    columns), "top" (its upper half: the modes next to the cut, which shift-and-invert
    Krylov converges last); block: -spinverse_bks_block for this call."""
    def run(L, M, K, tol, old, opts, lam_max):
        from petsc4py import PETSc

        from spinverse_fem.forward.block_krylov import SI_PREFIX
        from spinverse_fem.forward.eigenbasis import solve_eigenbasis

        start = None if init is None else (old if init == "all" else old[:, K // 2:])
        po = PETSc.Options(SI_PREFIX)
        if block:
            po["block"] = int(block)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                b = solve_eigenbasis(L, M, lam_max=lam_max, num_modes=K, tol=tol,
                                     method=method, initial_space=start)
        finally:
            if block:
                po.delValue("block")
        info = {k: b.info[k] for k in ("solves", "restarts", "repaired", "inertia_counts")
                if k in b.info}
        lam = np.concatenate([b.lam, b.extra_lam])
        vecs = np.hstack([b.phi, b.extra_phi])
        return lam, vecs, dict(info, finished=True)
    return run


def strat_bks_oldblock(L, M, K, tol, old, opts, lam_max):
    """Block Krylov-Schur whose first block is the old basis plus guard random vectors."""
    from spinverse_fem.forward.block_krylov import ShiftInvert, block_krylov_schur

    comm = L.getComm().tompi4py()
    nev = _nev(K, L.getSize()[0])
    t0 = time.perf_counter()
    op = ShiftInvert(L, M, _sigma(lam_max), definite=True)
    t_fact = time.perf_counter() - t0
    p = old.shape[1] + int(opts.guard)
    rng = np.random.default_rng(1 + 7919 * comm.rank)
    X0 = np.hstack([old, rng.standard_normal((old.shape[0], p - old.shape[1]))])
    ncv = int(opts.bks_blocks) * p
    res = block_krylov_schur(op, nev, block=p, ncv=ncv, tol=tol, initial=X0)
    op.destroy()
    return res.lam, res.vecs, dict(solves=int(res.solves), restarts=int(res.restarts),
                                   block=p, ncv=ncv, factorisation_s=round(t_fact, 4),
                                   phases={k: round(float(v), 4)
                                           for k, v in res.seconds.items()})


def strat_subspace(L, M, K, tol, old, opts, lam_max):
    """Block shift-and-invert subspace iteration with Rayleigh-Ritz from the old basis.

    X: current Ritz vectors (M-orthonormal, Ritz values lam); Y = T X = (L - sigma M)^{-1} M X
    gives both the transformed residuals ||Y_j - theta_j X_j||_M / theta_j (theta = 1/(lam -
    sigma), the Krylov-Schur test) and the next subspace; Rayleigh-Ritz of (L, M) on span(Y).
    """
    from spinverse_fem.forward.block_krylov import ShiftInvert, apply_block

    comm = L.getComm().tompi4py()
    nev = _nev(K, L.getSize()[0])
    sigma = _sigma(lam_max)
    t0 = time.perf_counter()
    op = ShiftInvert(L, M, sigma, definite=True)
    t_fact = time.perf_counter() - t0
    rng = np.random.default_rng(2 + 7919 * comm.rank)
    g = int(opts.guard)
    Y = np.hstack([old, rng.standard_normal((old.shape[0], g))])
    X = lam = None
    it = 0
    rel = np.array([np.inf])
    while True:
        # Rayleigh-Ritz of (L, M) on span(Y)
        LY, MY = apply_block(L, Y), apply_block(M, Y)
        A = comm.allreduce(Y.T @ LY, op=MPI.SUM)
        B = comm.allreduce(Y.T @ MY, op=MPI.SUM)
        lam, C = _eigh_gen(A, B, comm)
        X = Y @ C
        if it >= opts.max_iter:
            break
        Y = op(X)                      # T X: one block solve of nev + g columns
        it += 1
        theta = 1.0 / (lam[:nev] - sigma)
        R = Y[:, :nev] - X[:, :nev] * theta
        MR = apply_block(M, R)
        rel = np.sqrt(np.maximum(comm.allreduce(np.einsum("ij,ij->j", R, MR), op=MPI.SUM),
                                 0.0)) / np.abs(theta)
        if np.all(rel < tol):
            break
    op.destroy()
    return lam, X, dict(iterations=it, solves=int(op.solves), block=int(Y.shape[1]),
                        factorisation_s=round(t_fact, 4),
                        max_transformed_residual_at_stop=float(rel.max()))


def strat_lobpcg(L, M, K, tol, old, opts, lam_max):
    from slepc4py import SLEPc

    comm = L.getComm()
    nev = _nev(K, L.getSize()[0])
    # SLEPc's LOBPCG keeps round((1 - restart) bs) guard vectors (restart 0.9) and locks a
    # block of bs - guard pairs at a time; bs - guard >= nev: all wanted pairs in one block
    bs = int(opts.lobpcg_bs) if opts.lobpcg_bs else int(np.ceil(nev / 0.9)) + 2
    P = _shifted(L, M, _sigma(lam_max))
    eps = SLEPc.EPS().create(comm)
    eps.setOptionsPrefix("recycle_lobpcg_")
    eps.setOperators(L, M)
    eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    eps.setType(SLEPc.EPS.Type.LOBPCG)
    eps.setLOBPCGBlockSize(bs)
    eps.setDimensions(nev=nev)
    eps.setWhichEigenpairs(SLEPc.EPS.Which.SMALLEST_REAL)
    lam, vecs, its, reason = _precond_solve(eps, P, L, old, opts.precond_tol or tol,
                                            opts.max_iter)
    return lam, vecs, dict(iterations=its, block=bs, converged=int(lam.size), reason=reason)


def strat_gd(L, M, K, tol, old, opts, lam_max):
    from slepc4py import SLEPc

    comm = L.getComm()
    nev = _nev(K, L.getSize()[0])
    P = _shifted(L, M, _sigma(lam_max))
    eps = SLEPc.EPS().create(comm)
    eps.setOptionsPrefix("recycle_gd_")
    eps.setOperators(L, M)
    eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    eps.setType(SLEPc.EPS.Type.GD)
    q = old.shape[1]
    bs = int(opts.gd_bs)
    mpd = q + int(opts.gd_mpd_extra)
    eps.setDimensions(nev=nev, ncv=nev + mpd, mpd=mpd)
    eps.setGDBlockSize(bs)
    eps.setGDInitialSize(q)
    eps.setGDKrylovStart(False)
    eps.setWhichEigenpairs(SLEPc.EPS.Which.SMALLEST_REAL)
    lam, vecs, its, reason = _precond_solve(eps, P, L, old, opts.precond_tol or tol, 100000)
    return lam, vecs, dict(iterations=its, block=bs, mpd=mpd, converged=int(lam.size),
                           reason=reason)


def strat_slepc_subspace(L, M, K, tol, old, opts, lam_max):
    from slepc4py import SLEPc

    comm = L.getComm()
    nev = _nev(K, L.getSize()[0])
    eps = SLEPc.EPS().create(comm)
    eps.setOptionsPrefix("recycle_subspace_")
    eps.setOperators(L, M)
    eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    eps.setType(SLEPc.EPS.Type.SUBSPACE)
    ncv = nev + int(opts.guard)
    eps.setDimensions(nev=nev, ncv=ncv)
    _sinvert_st(eps, _sigma(lam_max))
    # EPSSUBSPACE supports only largest magnitude or target magnitude
    eps.setWhichEigenpairs(SLEPc.EPS.Which.TARGET_MAGNITUDE)
    eps.setTolerances(tol, opts.max_iter)
    eps.setConvergenceTest(SLEPc.EPS.Conv.REL)
    init = _vecs(old, L)
    eps.setInitialSpace(init)
    eps.setFromOptions()
    eps.solve()
    its = eps.getIterationNumber()
    reason = int(eps.getConvergedReason())
    lam, vecs = _eps_pairs(eps, L)
    eps.destroy()
    for v in init:
        v.destroy()
    return lam, vecs, dict(iterations=int(its), ncv=ncv, converged=int(lam.size),
                           reason=reason)


RUNNERS = {
    "ks_init": strat_existing("krylovschur", "all"),
    "block": strat_existing("block"),
    "block_init": strat_existing("block", "all"),
    "block_init_top": strat_existing("block", "top"),
    "block_p32": strat_existing("block", None, 32),
    "block_init_p32": strat_existing("block", "all", 32),
    "block_p8": strat_existing("block", None, 8),
    "block_init_p8": strat_existing("block", "all", 8),
    "bks_oldblock": strat_bks_oldblock,
    "subspace": strat_subspace,
    "lobpcg": strat_lobpcg,
    "gd": strat_gd,
    "slepc_subspace": strat_slepc_subspace,
}


def finish(L, M, K, lam, vecs):
    """As solve_eigenbasis ends with num_modes = K: sort, one inertia count at the midpoint
    of (lambda_K, lambda_{K+1}), M-orthonormalisation. Returns (lam, phi, check)."""
    from spinverse_fem.forward.eigenbasis import _m_orthonormalise, inertia_count

    comm = L.getComm().tompi4py()
    order = np.argsort(lam, kind="stable")
    lam, vecs = lam[order], vecs[:, order]
    if lam.size < K:
        return lam, vecs, dict(inertia_ok=False, found=int(lam.size), why="too few pairs")
    upper = lam[K] if lam.size > K else lam[-1] * (1 + 1e-6) + 1e-12
    tau = 0.5 * (lam[K - 1] + upper)
    if upper - lam[K - 1] <= 1e-8 * max(abs(upper), 1.0):
        tau = lam[K - 1] + 1e-7 * max(abs(lam[K - 1]), 1.0)
    found = int(np.sum(lam < tau))
    true = inertia_count(L, M, tau)
    phi = _m_orthonormalise(vecs, M, comm)
    return lam, phi, dict(inertia_ok=bool(true == found), inertia_true=int(true),
                          inertia_found=found, tau=float(tau))


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------
class Checker:
    """Accuracy of (lam, phi) against the reference basis at the same kappa (collective)."""

    def __init__(self, L, M, ref, K, sigma):
        from spinverse_fem.forward.block_krylov import ShiftInvert

        self.L, self.M, self.K = L, M, K
        self.comm = L.getComm().tompi4py()
        self.ref = ref
        self.op = ShiftInvert(L, M, sigma, definite=True)

    def residuals(self, lam, phi):
        from spinverse_fem.forward.block_krylov import apply_block

        R = apply_block(self.L, phi) - apply_block(self.M, phi) * lam
        r2 = np.sqrt(self.comm.allreduce(np.einsum("ij,ij->j", R, R), op=MPI.SUM))
        Z = self.op.solve(R)
        rt = np.sqrt(np.maximum(self.comm.allreduce(
            np.einsum("ij,ij->j", Z, apply_block(self.M, Z)), op=MPI.SUM), 0.0))
        scale = np.maximum(np.abs(lam), np.finfo(float).tiny)
        return float(np.max(r2 / scale)), float(np.max(rt))

    def compare(self, lam, phi):
        from spinverse_fem.forward.eigenbasis import gram

        K = self.K
        ref = self.ref
        k = min(K, lam.size)
        lr = ref.lam[:k]
        out = dict(max_rel_eig_err=float(np.max(np.abs(lam[:k] - lr) /
                                                np.maximum(np.abs(lr), 1e-300))))
        if k == K:
            out["max_sin_angle"] = m_sin_angle(ref.phi[:, :K], phi[:, :K], self.M, self.comm)
        r2, rt = self.residuals(lam[:k], phi[:, :k])
        out.update(max_rel_residual=r2, max_transformed_residual=rt)
        G = gram(phi[:, :k], self.M, phi[:, :k], self.comm)
        out["orthonormality"] = float(np.abs(G - np.eye(k)).max())
        return out

    def destroy(self):
        self.op.destroy()


def m_sin_angle(phi_ref, phi, M, comm):
    """sin of the largest M-principal angle between span(phi_ref) and span(phi) (both
    M-orthonormal, same width), as tests/test_eigenbasis.py."""
    from spinverse_fem.forward.eigenbasis import gram

    C = gram(phi_ref, M, phi, comm)
    R = phi - phi_ref @ C
    G = gram(R, M, R, comm)
    return float(np.sqrt(max(np.linalg.eigvalsh(0.5 * (G + G.T)).max(), 0.0)))


def frozen(L, M, K, old_lam, old_phi, checker):
    """The old basis without any solve: (a) as it is, with the old eigenvalues; (b) its
    Rayleigh-Ritz approximation in the new L (K old vectors; one sparse product); (c) how
    much of the new K-space lies outside the span of all old vectors (K + margin), for all K
    new modes and for the lower half (away from the cut)."""
    from spinverse_fem.forward.eigenbasis import gram

    comm = L.getComm().tompi4py()
    a = checker.compare(old_lam[:K], old_phi[:, :K])
    A = gram(old_phi[:, :K], L, old_phi[:, :K], comm)
    B = gram(old_phi[:, :K], M, old_phi[:, :K], comm)
    lam, C = _eigh_gen(A, B, comm)
    b = checker.compare(lam, old_phi[:, :K] @ C)
    ref = checker.ref.phi
    c = dict(old_width=int(old_phi.shape[1]),
             max_sin_new_K_outside_old=m_sin_angle(old_phi, ref[:, :K], checker.M, comm),
             max_sin_new_lower_half_outside_old=m_sin_angle(old_phi, ref[:, :K // 2], checker.M,
                                                            comm))
    return dict(as_is=a, rayleigh_ritz=b, containment=c)



# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def event_counts():
    """(count, seconds) of the PETSc/SLEPc log events in EVENTS (this rank)."""
    from petsc4py import PETSc

    out = {}
    for e in EVENTS:
        info = PETSc.Log.Event(e).getPerfInfo()
        out[e] = (int(info["count"]), float(info["time"]))
    return out


def run(a) -> dict:
    from petsc4py import PETSc

    PETSc.Log.begin()
    from spinverse_fem.forward.eigenbasis import solve_eigenbasis

    comm = MPI.COMM_WORLD
    say = (lambda *x, **k: print(*x, **k, flush=True)) if comm.rank == 0 else (
        lambda *x, **k: None)
    cfg, case = build_case(comm, a.n)
    model = case.forward
    L, M = model.ops.L, model.ops.M
    K, tol = int(a.modes), float(cfg.eigen.tolerance)
    lam_max = float(model.lam_max)
    sigma = _sigma(lam_max)
    dofs = int(model.space.num_dofs_global)
    say(f"n = {a.n}: {case.phantom.grid.num_tets} tets, {dofs} dofs, {case.params.size} "
        f"active faces, K = {K}, tol = {tol:g}, {comm.size} rank(s), strategies "
        f"{', '.join(a.strategies)}")

    def timed(fn):
        comm.Barrier()
        e0 = event_counts()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        cpu = comm.allreduce(time.process_time() - c0, op=MPI.MAX)
        comm.Barrier()
        wall = time.perf_counter() - t0
        e1 = event_counts()
        ev = {e: [e1[e][0] - e0[e][0], round(comm.allreduce(e1[e][1] - e0[e][1], op=MPI.MAX),
                                             4)]
              for e in EVENTS if e1[e][0] - e0[e][0]}
        return out, wall, cpu, ev

    def scratch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return solve_eigenbasis(L, M, lam_max=lam_max, num_modes=K, tol=tol)

    sequences = []
    for delta in a.deltas:
        kappas = kappa_sequence(case, a.steps, delta, a.start_spread, a.seed)
        model.ops.set_kappa(kappas[0])
        b0, w0, _, _ = timed(scratch)
        say(f"\ndelta = {delta:g}: kappa_0 solved from scratch in {w0:.2f} s, "
            f"lambda_1..K = {b0.lam[0]:.4g}..{b0.lam[-1]:.4g} 1/ms, "
            f"gap g_K = {b0.rel_gap:.3g}")
        prev, first = b0, b0
        steps = []
        for i in range(a.steps):
            model.ops.set_kappa(kappas[i + 1])
            dlog = np.abs(np.log10(kappas[i + 1][case.params.active]) -
                          np.log10(kappas[i][case.params.active]))
            ref, wall_s, cpu_s, ev_s = timed(scratch)
            checker = Checker(L, M, ref, K, sigma)
            row = dict(step=i + 1, max_dlog10_kappa=float(dlog.max()),
                       rms_dlog10_kappa=float(np.sqrt(np.mean(dlog**2))),
                       gap=float(ref.rel_gap), lam_K=float(ref.lam[-1]),
                       load_1min=round(os.getloadavg()[0], 2))
            sc = dict(seconds=round(wall_s, 4), cpu_seconds=round(cpu_s, 4), events=ev_s,
                      solves=ev_s.get("MatSolve", [0])[0],
                      inertia_counts=int(ref.info.get("inertia_counts", 0)),
                      repaired=bool(ref.info.get("repaired", False)))
            sc.update(checker.compare(ref.lam, ref.phi))
            row["scratch"] = sc
            old = np.hstack([prev.phi, prev.extra_phi])
            oldlam = np.concatenate([prev.lam, prev.extra_lam])
            row["frozen_prev"] = frozen(L, M, K, oldlam, old, checker)
            row["frozen_since_kappa0"] = frozen(L, M, K, first.lam, first.phi, checker)
            say(f"  step {i + 1}: max |dlog10 kappa| {dlog.max():.3f}, scratch {wall_s:.2f} s"
                f" (events {ev_s}), g_K {ref.rel_gap:.3g}; frozen (RR): dlam "
                f"{row['frozen_prev']['rayleigh_ritz']['max_rel_eig_err']:.2e} sin "
                f"{row['frozen_prev']['rayleigh_ritz']['max_sin_angle']:.2e}, new K-space "
                f"outside old span sin "
                f"{row['frozen_prev']['containment']['max_sin_new_K_outside_old']:.2e}")
            row["strategies"] = {}
            for name in a.strategies:
                if name in a.slow and i >= a.slow_steps:
                    continue
                fn = RUNNERS[name]

                def go():
                    lam, vecs, info = fn(L, M, K, tol, old, a, lam_max)
                    if info.pop("finished", False):
                        order = np.argsort(lam, kind="stable")
                        chk = dict(inertia_ok=True, note="solve_eigenbasis' own check")
                        return lam[order], vecs[:, order], info, chk
                    lam, phi, chk = finish(L, M, K, lam, vecs)
                    return lam, phi, info, chk
                try:
                    (lam, phi, info, chk), wall, cpu, ev = timed(go)
                except Exception as exc:   # noqa: BLE001 (a failing strategy is a result)
                    why = str(exc.__cause__ or exc).strip().splitlines()
                    why = " | ".join(why[-3:])[-400:]
                    row["strategies"][name] = dict(failed=f"{type(exc).__name__}: {why}")
                    say(f"    {name:<15} FAILED {type(exc).__name__}: {why}")
                    continue
                if "solves" not in info and "MatMatSolve" not in ev and "MatSolve" in ev:
                    info["solves"] = ev["MatSolve"][0]   # single-vector solves (Krylov-Schur)
                r = dict(seconds=round(wall, 4), cpu_seconds=round(cpu, 4),
                         time_ratio=round(wall / wall_s, 4),
                         cpu_ratio=round(cpu / cpu_s, 4) if cpu_s > 0 else None,
                         events=ev, **info, **chk)
                r.update(checker.compare(lam, phi))
                row["strategies"][name] = r
                say(f"    {name:<15} x{r['time_ratio']:.2f} of scratch, dlam "
                    f"{r['max_rel_eig_err']:.1e}, sin {r.get('max_sin_angle', np.nan):.1e}, "
                    f"res {r['max_rel_residual']:.1e} / T-res "
                    f"{r['max_transformed_residual']:.1e}, inertia "
                    f"{'ok' if r['inertia_ok'] else 'FAIL'}, "
                    + ", ".join(f"{k} {info[k]}" for k in ("iterations", "solves", "restarts")
                                if k in info) + f", events {ev}")
            checker.destroy()
            steps.append(row)
            prev = ref
        sequences.append(dict(delta=delta, kappa0_scratch_seconds=round(w0, 4), steps=steps))
    return dict(n=a.n, ranks=comm.size, tets=int(case.phantom.grid.num_tets), dofs=dofs,
                active_faces=int(case.params.size), modes=K, tol=tol, lam_max=lam_max,
                sigma=sigma, steps=a.steps, start_spread=a.start_spread, seed=a.seed,
                options=dict(guard=a.guard, bks_blocks=a.bks_blocks, lobpcg_bs=a.lobpcg_bs,
                             gd_bs=a.gd_bs, gd_mpd_extra=a.gd_mpd_extra,
                             precond_tol=a.precond_tol, max_iter=a.max_iter, slow=a.slow,
                             slow_steps=a.slow_steps),
                strategies={s: STRATEGIES[s] for s in a.strategies}, sequences=sequences)


def summarise(res: dict) -> dict:
    """Per delta and strategy: median/max time ratio over the steps, worst accuracy."""

    out = {}
    for seq in res["sequences"]:
        d = {}
        names = list(res["strategies"])
        for name in names:
            rows = [s["strategies"][name] for s in seq["steps"] if name in s["strategies"]]
            ok = [r for r in rows if "failed" not in r and r]
            if not ok:
                d[name] = dict(failed=len(rows))
                continue
            tr = [r["time_ratio"] for r in ok]
            d[name] = dict(
                time_ratio_median=float(np.median(tr)), time_ratio_max=float(np.max(tr)),
                cpu_ratio_median=float(np.median([r["cpu_ratio"] for r in ok
                                                  if r.get("cpu_ratio") is not None])),
                max_rel_eig_err=float(max(r["max_rel_eig_err"] for r in ok)),
                max_sin_angle=float(max(r.get("max_sin_angle", np.inf) for r in ok)),
                max_rel_residual=float(max(r["max_rel_residual"] for r in ok)),
                max_transformed_residual=float(max(r["max_transformed_residual"]
                                                   for r in ok)),
                inertia_ok_all=bool(all(r["inertia_ok"] for r in ok)),
                failed=len(rows) - len(ok), steps_measured=len(rows))
            for key in ("iterations", "solves"):
                vals = [r[key] for r in ok if key in r]
                if vals:
                    d[name][f"{key}_median"] = float(np.median(vals))
        sc = [s["scratch"] for s in seq["steps"]]
        d["scratch"] = dict(seconds_median=float(np.median([s["seconds"] for s in sc])),
                            solves_median=float(np.median([s["solves"] for s in sc])),
                            max_rel_residual=float(max(s["max_rel_residual"] for s in sc)),
                            max_transformed_residual=float(max(s["max_transformed_residual"]
                                                               for s in sc)))
        for key in ("frozen_prev", "frozen_since_kappa0"):
            for kind in ("as_is", "rayleigh_ritz"):
                rows = [s[key][kind] for s in seq["steps"]]
                d[f"{key}_{kind}"] = dict(
                    max_rel_eig_err=float(max(r["max_rel_eig_err"] for r in rows)),
                    max_sin_angle=float(max(r["max_sin_angle"] for r in rows)),
                    max_rel_residual=float(max(r["max_rel_residual"] for r in rows)),
                    last_step=dict(max_rel_eig_err=rows[-1]["max_rel_eig_err"],
                                   max_sin_angle=rows[-1]["max_sin_angle"]))
            rows = [s[key]["containment"] for s in seq["steps"]]
            d[f"{key}_containment"] = {k: float(max(r[k] for r in rows)) for k in rows[0]
                                       if k.startswith("max_")}
        out[f"delta={seq['delta']:g}"] = d
    return out


def print_table(res: dict, summary: dict) -> None:
    print(f"\nn = {res['n']} ({res['tets']} tets, {res['dofs']} dofs), K = {res['modes']}, "
          f"{res['ranks']} rank(s), {res['steps']} steps; time = median (max) ratio to scratch"
          " at the same step")
    hdr = (f"  {'strategy':<30} {'time x':>14} {'cpu x':>6} {'its':>6} {'solves':>7} "
           f"{'dlam':>8} {'sin':>8} {'res':>8} {'T-res':>8} inertia")
    for key, d in summary.items():
        sc = d["scratch"]
        print(f" {key}: scratch median {sc['seconds_median']:.3f} s, {sc['solves_median']:.0f} "
              "solves, residuals "
              f"{sc['max_rel_residual']:.1e} / T {sc['max_transformed_residual']:.1e}")
        print(hdr)
        for name, r in d.items():
            if name == "scratch":
                continue
            if name.endswith("containment"):
                print(f"  {name:<30} new K-space outside old span: sin "
                      f"{r['max_sin_new_K_outside_old']:.1e} (lower half "
                      f"{r['max_sin_new_lower_half_outside_old']:.1e})")
                continue
            if name.startswith("frozen"):
                print(f"  {name:<30} {'-':>14} {'-':>6} {'-':>6} {'-':>7} "
                      f"{r['max_rel_eig_err']:>8.1e} {r['max_sin_angle']:>8.1e} "
                      f"{r['max_rel_residual']:>8.1e} {'':>8}")
                continue
            if "time_ratio_median" not in r:
                print(f"  {name:<30} FAILED")
                continue
            tm = f"{r['time_ratio_median']:.2f} ({r['time_ratio_max']:.2f})"
            print(f"  {name:<30} {tm:>14} {r['cpu_ratio_median']:>6.2f} "
                  f"{r.get('iterations_median', float('nan')):>6.0f} "
                  f"{r.get('solves_median', float('nan')):>7.0f} "
                  f"{r['max_rel_eig_err']:>8.1e} {r['max_sin_angle']:>8.1e} "
                  f"{r['max_rel_residual']:>8.1e} {r['max_transformed_residual']:>8.1e} "
                  f"{'ok' if r['inertia_ok_all'] else 'FAIL'}"
                  + (f" ({r['failed']} failed)" if r["failed"] else "")
                  + (f" [{r['steps_measured']} steps]" if r["steps_measured"] != res["steps"]
                     else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4, help="bcc cubes per side (4: the paper grid)")
    p.add_argument("--modes", type=int, default=120, help="K (num_modes)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--deltas", type=float, nargs="+", default=[0.02, 0.1],
                   help="per-step std of the log10 kappa change")
    p.add_argument("--start-spread", type=float, default=0.1,
                   help="std of the log10 perturbation of the paper start (1 um/ms)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES,
                   choices=list(RUNNERS))
    p.add_argument("--guard", type=int, default=32,
                   help="extra random columns beside the old basis (subspace, bks_oldblock, "
                        "slepc_subspace ncv = nev + guard)")
    p.add_argument("--bks-blocks", type=int, default=4,
                   help="bks_oldblock: ncv = this many blocks")
    p.add_argument("--lobpcg-bs", type=int, default=0, help="0: ceil(nev / 0.9) + 2")
    p.add_argument("--gd-bs", type=int, default=16, help="GD block size")
    p.add_argument("--gd-mpd-extra", type=int, default=64,
                   help="GD mpd = old basis width + this")
    p.add_argument("--precond-tol", type=float, default=0.0,
                   help="tolerance of LOBPCG/GD (SLEPc REL test ||r||_2/|lam|); 0: as scratch")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--slow", nargs="*", default=SLOW_STRATEGIES,
                   help="strategies measured only in the first --slow-steps steps")
    p.add_argument("--slow-steps", type=int, default=2)
    p.add_argument("--out", help="JSON (default benchmarks/results/recycled_eigenbasis_n{n}"
                                 ".json; with more than one rank _{r}ranks is appended)")
    a = p.parse_args()
    res = run(a)
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        summary = summarise(res)
        print_table(res, summary)
        suffix = "" if res["ranks"] == 1 else f"_{res['ranks']}ranks"
        out = (Path(a.out) if a.out else
               HERE / "results" / f"recycled_eigenbasis_n{a.n}{suffix}.json")
        report = dict(description=__doc__.split("\n\n")[0],
                      machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                                   omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                                   loadavg_end=list(os.getloadavg())),
                      argv=sys.argv[1:], summary=summary, **res)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
