r"""Reduced Laplace eigenbasis (matrix formalism) with a Sylvester-inertia completeness check.

Smallest eigenpairs of the symmetric pencil

    L(kappa) phi_k = lambda_k M phi_k,     Phi^T M Phi = I,   0 <= lambda_1 <= ... <= lambda_K,

by SLEPc Krylov-Schur with shift-and-invert (MUMPS). Krylov-Schur can silently drop members of
a large degenerate cluster (e.g. one zero eigenvalue per sealed compartment), so every solve is
followed by an inertia count: the number of negative pivots of an LDL^T factorisation of
L - tau M equals the number of eigenvalues below tau (Sylvester's law of inertia). A deficit
is repaired by deflating the vectors already found and solving again; a deficit that survives
is an error, never silent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import dolfinx_solver  # noqa: F401
import numpy as np
from mpi4py import MPI
from petsc4py import PETSc
from slepc4py import SLEPc

from spinverse_fem.errors import SolverError
from spinverse_fem.forward.mode_selection import gap_at, select_mode_count

EPS_PREFIX = "spinverse_"
INERTIA_PREFIX = "spinverse_inertia_"


@dataclass(frozen=True)
class Eigenbasis:
    """lam: (K,) eigenvalues in 1/ms ascending; phi: (n_owned, K) this rank's rows of Phi
    (M-orthonormal, um^{-3/2}); cutoff_count: eigenvalues below the length-scale cutoff;
    capped: True when max_modes cut the spectrum below the cutoff; extra_lam, extra_phi: the
    converged eigenpairs just above the kept ones (the solve's margin; used by the adjoint);
    sigma: the shift of the shift-and-invert transform (1/ms)."""

    lam: np.ndarray
    phi: np.ndarray
    cutoff_count: int
    capped: bool
    extra_lam: np.ndarray = field(default_factory=lambda: np.zeros(0))
    extra_phi: np.ndarray | None = None
    sigma: float = -1e-3

    @property
    def num_modes(self) -> int:
        return int(self.lam.shape[0])

    @property
    def next_lam(self) -> float | None:
        """lambda_{K+1} (1/ms): the first eigenvalue above the cut, if it was computed."""
        return float(self.extra_lam[0]) if self.extra_lam.size else None

    @property
    def rel_gap(self) -> float:
        """g_K = (lambda_{K+1} - lambda_K) / lambda_{K+1} at the cut (`mode_selection`)."""
        return gap_at(float(self.lam[-1]), self.next_lam)


def cutoff_eigenvalue(diffusivity_um2_per_ms: float, length_scale_um: float) -> float:
    """lambda_max = D pi^2 / l^2 (1/ms): modes varying on scales shorter than l are dropped."""
    return float(diffusivity_um2_per_ms) * np.pi**2 / float(length_scale_um) ** 2


def mumps_cholesky(A: PETSc.Mat, prefix: str, icntl: dict | None = None) -> PETSc.KSP:
    """A set-up direct solver: MUMPS LDL^T of the symmetric A, options under `prefix`."""
    ksp = PETSc.KSP().create(A.getComm())
    ksp.setOptionsPrefix(prefix)
    ksp.setOperators(A)
    ksp.setType("preonly")
    pc = ksp.getPC()
    pc.setType("cholesky")
    pc.setFactorSolverType("mumps")
    if icntl:
        pc.setFactorSetUpSolverType()
        F = pc.getFactorMatrix()
        for key, value in icntl.items():
            F.setMumpsIcntl(key, value)
    ksp.setFromOptions()
    ksp.setUp()
    return ksp


def inertia_count(L: PETSc.Mat, M: PETSc.Mat, tau: float) -> int:
    """Number of eigenvalues of (L, M) strictly below tau (collective)."""
    A = L.copy()
    A.axpy(-tau, M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
    A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    # ICNTL(13) = 1 keeps the root on one process (inertia needs the whole factor);
    # ICNTL(24) = 1 detects null pivots instead of failing
    ksp = mumps_cholesky(A, INERTIA_PREFIX, {13: 1, 24: 1})
    nneg, _, _ = ksp.getPC().getFactorMatrix().getInertia()
    ksp.destroy()
    A.destroy()
    return int(nneg)


def _solve_eps(L, M, nev, sigma, tol, deflation=None):
    comm = L.getComm()
    eps = SLEPc.EPS().create(comm)
    eps.setOptionsPrefix(EPS_PREFIX)
    eps.setOperators(L, M)
    eps.setProblemType(SLEPc.EPS.ProblemType.GHEP)
    # bounding the projected dimension keeps the Rayleigh-Ritz cost down for many modes
    # (measured: 500 modes on 21k dofs, 48 s with mpd = ncv, 37 s with mpd = 250)
    mpd = min(max(nev, 32), 256)
    ncv = min(nev + mpd, L.getSize()[0])
    eps.setDimensions(nev=nev, ncv=ncv, mpd=min(mpd, ncv))
    eps.setTarget(sigma)
    eps.setWhichEigenpairs(SLEPc.EPS.Which.TARGET_REAL)
    st = eps.getST()
    st.setType(SLEPc.ST.Type.SINVERT)
    ksp = st.getKSP()
    ksp.setType("preonly")
    pc = ksp.getPC()
    pc.setType("cholesky")
    pc.setFactorSolverType("mumps")
    eps.setTolerances(tol, 500)
    eps.setConvergenceTest(SLEPc.EPS.Conv.REL)
    if deflation:
        eps.setDeflationSpace(deflation)
    eps.setFromOptions()
    eps.solve()
    nconv = eps.getConverged()
    vr = L.createVecRight()
    lams, vecs = [], []
    for i in range(nconv):
        lam = eps.getEigenpair(i, vr)
        lams.append(float(np.real(lam)))
        vecs.append(vr.getArray().copy())
    eps.destroy()
    return np.array(lams), vecs


def solve_eigenbasis(L: PETSc.Mat, M: PETSc.Mat, *, lam_max: float | None = None,
                     num_modes: int | None = None, max_modes: int = 500,
                     tol: float = 1e-10, max_repairs: int = 3) -> Eigenbasis:
    """All eigenpairs below lam_max (capped at max_modes), or exactly num_modes of them.

    With the cutoff rule the count is moved down to a real spectral gap
    (`mode_selection.select_mode_count`): the signal depends only on whole eigenspaces, and
    the reduced objective is smooth only where the cut is open. A fixed count stays fixed (an
    optimisation stage relies on it); its gap is reported by `Eigenbasis.rel_gap`.
    """
    comm = L.getComm().tompi4py()
    n_global = L.getSize()[0]
    scale = lam_max if lam_max else 1.0
    sigma = -1e-3 * scale  # strictly below the (non-negative) spectrum: L - sigma M is SPD
    if num_modes is not None:
        k_want, cutoff_count, capped = min(int(num_modes), n_global), -1, False
    else:
        if lam_max is None:
            raise ValueError("give lam_max or num_modes")
        cutoff_count = inertia_count(L, M, lam_max)
        k_want = min(cutoff_count, max_modes)
        capped = cutoff_count > max_modes
    k_want = max(k_want, 1)
    margin = min(8, n_global - k_want)
    lam, vecs = _solve_eps(L, M, k_want + margin, sigma, tol)
    order = np.argsort(lam)
    lam, vecs = lam[order], [vecs[i] for i in order]
    for _ in range(max_repairs + 1):
        if lam.size < k_want:
            raise SolverError(f"SLEPc converged only {lam.size} of {k_want} eigenpairs")
        upper = lam[k_want] if lam.size > k_want else lam[-1] * (1 + 1e-6) + 1e-12
        tau = 0.5 * (lam[k_want - 1] + upper)
        if upper - lam[k_want - 1] <= 1e-8 * max(abs(upper), 1.0):
            tau = lam[k_want - 1] + 1e-7 * max(abs(lam[k_want - 1]), 1.0)
        found = int(np.sum(lam < tau))
        true = inertia_count(L, M, tau)
        if true == found:
            break
        if true < found:
            raise SolverError(f"inertia count {true} below tau={tau:.6g} is smaller than the "
                              f"{found} eigenvalues returned: inaccurate eigenpairs")
        # Krylov-Schur missed members of a cluster: deflate what we have and look again
        missing = true - found
        defl = []
        for v in vecs:
            pv = L.createVecRight()
            pv.setArray(v)
            defl.append(pv)
        lam2, vecs2 = _solve_eps(L, M, missing + margin, sigma, tol, deflation=defl)
        lam = np.concatenate([lam, lam2])
        vecs = vecs + vecs2
        order = np.argsort(lam)
        lam, vecs = lam[order], [vecs[i] for i in order]
    else:
        raise SolverError(f"eigenbasis incomplete after {max_repairs} repairs: inertia count "
                          f"{true} eigenvalues below {tau:.6g}, found {found}")
    k = k_want if num_modes is not None else select_mode_count(lam, k_want)
    if capped and comm.rank == 0:
        warnings.warn(f"{cutoff_count} eigenvalues lie below the cutoff; keeping {k} "
                      f"(max_modes = {max_modes})", stacklevel=2)
    n_all = lam.size
    allphi = np.column_stack(vecs) if vecs[0].size else np.zeros((0, n_all))
    allphi = _m_orthonormalise(allphi, M, comm)
    return Eigenbasis(lam=lam[:k].copy(), phi=allphi[:, :k].copy(), cutoff_count=cutoff_count,
                      capped=capped, extra_lam=lam[k:].copy(), extra_phi=allphi[:, k:].copy(),
                      sigma=sigma)


def _m_orthonormalise(phi: np.ndarray, M: PETSc.Mat, comm: MPI.Comm) -> np.ndarray:
    """Re-orthonormalise in the M inner product (deflated solves and clusters lose a little)."""
    G = gram(phi, M, phi, comm)
    R = np.linalg.cholesky(0.5 * (G + G.T))
    phi = np.linalg.solve(R, phi.T).T if phi.size else phi
    return phi


def apply(A: PETSc.Mat, X: np.ndarray) -> np.ndarray:
    """A @ X for a distributed sparse A and local rows X (n_owned, K) of a tall dense matrix."""
    comm = A.getComm()
    n_loc, k = X.shape
    n_glob = A.getSize()[1]
    Xd = PETSc.Mat().createDense(((n_loc, n_glob), (PETSc.DECIDE, k)),
                                 array=np.asfortranarray(X), comm=comm)
    Y = A.matMult(Xd)
    out = Y.getDenseArray().copy()
    Xd.destroy()
    Y.destroy()
    return out


def gram(X: np.ndarray, A: PETSc.Mat, Y: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    """X^T A Y (K1 x K2), replicated on every rank."""
    local = X.T @ apply(A, Y)
    return comm.allreduce(local, op=MPI.SUM)
