r"""Block preconditioned CG for the eigenvector adjoint equations on the M-orthogonal complement.

For every kept mode k (lambda_k, phi_k), find a_k with Phi^T M a_k = 0 and

    (L - lambda_k M) a_k = P^T g_k,     P = I - Phi Phi^T M   (P^T = I - M Phi Phi^T).

On the complement of the kept basis all eigenvalues exceed lambda_K >= lambda_k (the inertia
check guarantees none is missing), so the projected operator is symmetric positive definite and
CG applies. Preconditioner: P (L - sigma M)^{-1} P^T with one MUMPS Cholesky factorisation
(sigma < 0, the shift-and-invert shift), applied to all K right-hand sides at once (MatMatSolve).

Known eigenpairs beyond the basis (the margin of the eigen-solve, j = K+1..K+m) are deflated
exactly: their components are (phi_j . g_k) / (lambda_j - lambda_k), and CG runs on the
remaining complement, whose smallest eigenvalue is further from lambda_k (better conditioned).
"""

from __future__ import annotations

import dolfinx_solver  # noqa: F401
import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from spinverse_fem.errors import SolverError
from spinverse_fem.forward.eigenbasis import apply, mumps_cholesky

PREFIX = "spinverse_adj_"


class ComplementSolver:
    """Solves the K projected systems for one (L, M, basis) state.

    L, M: PETSc matrices; lam (K,), phi (n_owned, K): the kept basis; extra_lam (m,),
    extra_phi (n_owned, m): known eigenpairs beyond it (deflated); sigma: preconditioner shift.
    """

    def __init__(self, L: PETSc.Mat, M: PETSc.Mat, lam, phi, extra_lam=None, extra_phi=None,
                 sigma: float = -1e-3, rtol: float = 1e-11, max_it: int = 2000):
        self.L, self.M = L, M
        self.comm = L.getComm().tompi4py()
        self.lam = np.asarray(lam)
        self.phi = phi
        if extra_lam is not None and len(extra_lam):
            self.xlam, self.xphi = np.asarray(extra_lam), extra_phi
        else:
            self.xlam, self.xphi = np.zeros(0), np.zeros((phi.shape[0], 0))
        # everything projected out of the CG space: the basis and the deflated extras
        self.Z = np.hstack([phi, self.xphi])
        self.MZ = apply(M, self.Z) if self.Z.shape[1] else self.Z
        self.rtol, self.max_it = rtol, max_it
        self.iterations = 0
        self.solves = 0
        A = L.copy()
        A.axpy(-sigma, M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        A.setOption(PETSc.Mat.Option.SPD, True)
        self._A = A
        self._ksp = mumps_cholesky(A, PREFIX)

    def destroy(self):
        self._ksp.destroy()
        self._A.destroy()

    # -- distributed dense helpers ---------------------------------------------------------
    def _sum(self, a: np.ndarray) -> np.ndarray:
        """Sum over ranks (buffer Allreduce; nothing to do on one rank)."""
        a = np.ascontiguousarray(a)
        if self.comm.size == 1:
            return a
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.SUM)
        return out

    def _colsum(self, X):
        return self._sum(np.sum(X, axis=0))

    def _project_out(self, X):
        """P X = X - Z (Z^T M X): remove basis and extra components (M-orthogonal projection)."""
        if not self.Z.shape[1]:
            return X
        C = self._sum(self.MZ.T @ X)
        return X - self.Z @ C

    def _project_out_T(self, R):
        """P^T R = R - M Z (Z^T R)."""
        if not self.Z.shape[1]:
            return R
        C = self._sum(self.Z.T @ R)
        return R - self.MZ @ C

    def _precondition(self, R):
        n_loc, k = R.shape
        n_glob = self.L.getSize()[0]
        B = PETSc.Mat().createDense(((n_loc, n_glob), (PETSc.DECIDE, k)),
                                    array=np.asfortranarray(R), comm=self.L.getComm())
        X = PETSc.Mat().createDense(((n_loc, n_glob), (PETSc.DECIDE, k)), comm=self.L.getComm())
        X.setUp()
        self._ksp.matSolve(B, X)
        out = X.getDenseArray().copy()
        B.destroy()
        X.destroy()
        self.solves += k
        return self._project_out(out)

    def _operator(self, X, shifts):
        return apply(self.L, X) - apply(self.M, X) * shifts[None, :]

    # -- the solve ---------------------------------------------------------------------------
    def solve(self, G: np.ndarray) -> np.ndarray:
        """a_k for right-hand sides g_k = G[:, k] (n_owned, K); returns (n_owned, K)."""
        K = self.lam.size
        if G.shape != (self.phi.shape[0], K):
            raise ValueError(f"G has shape {G.shape}, expected {(self.phi.shape[0], K)}")
        shifts = self.lam
        # exact part along the known extra eigenvectors: (phi_j . g_k) / (lambda_j - lambda_k)
        A_extra = np.zeros_like(G)
        if self.xlam.size:
            C = self._sum(self.xphi.T @ G)
            A_extra = self.xphi @ (C / (self.xlam[:, None] - shifts[None, :]))
        b = self._project_out_T(G)
        bnorm = np.sqrt(self._colsum(b * b))
        gnorm = np.sqrt(self._colsum(G * G))
        X = np.zeros_like(G)
        # a right-hand side that lies (to round-off) in the deflated span needs no CG
        idx = np.flatnonzero(bnorm > 1e-13 * np.maximum(gnorm, np.finfo(float).tiny))
        if idx.size == 0:
            return A_extra
        # CG on the unconverged columns only: each column follows its own iterates, so
        # dropping converged ones changes nothing but the cost
        R = b[:, idx].copy()
        Pd = self._precondition(R)
        rz = self._colsum(R * Pd)
        for it in range(1, self.max_it + 1):
            Q = self._project_out_T(self._operator(Pd, shifts[idx]))
            pq = self._colsum(Pd * Q)
            if np.any(pq <= 0):
                raise SolverError("eigenvector adjoint: the projected operator is not positive "
                                  "definite (an eigenvalue is missing from the basis?)")
            alpha = rz / pq
            X[:, idx] += Pd * alpha
            R -= Q * alpha
            rnorm = np.sqrt(self._colsum(R * R))
            keep = rnorm > self.rtol * bnorm[idx]
            if not np.any(keep):
                self.iterations += it
                return X + A_extra
            idx, R, Pd, rz = idx[keep], R[:, keep], Pd[:, keep], rz[keep]
            Zr = self._precondition(R)
            rz_new = self._colsum(R * Zr)
            Pd = Zr + Pd * (rz_new / np.where(rz != 0, rz, 1.0))
            rz = rz_new
        rnorm = rnorm[keep]
        bnorm = bnorm[idx]
        worst = float(np.max(rnorm / np.where(bnorm > 0, bnorm, 1.0)))
        raise SolverError(f"eigenvector adjoint CG did not converge in {self.max_it} iterations "
                          f"(worst relative residual {worst:.2e}); choose the mode count at a "
                          "wider spectral gap")
