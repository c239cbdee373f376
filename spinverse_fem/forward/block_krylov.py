r"""Block Krylov-Schur with shift-and-invert for many eigenpairs of the pencil (L, M).

The smallest eigenvalues lambda of L phi = lambda M phi are the largest theta = 1/(lambda - sigma)
of the operator T = (L - sigma M)^{-1} M, which is symmetric in the M inner product. This is
the thick-restart Krylov-Schur iteration on T, with blocks of p vectors instead of one:

    T V_m = V_m H_m + Q B E_m^T,      V_m^T M V_m = I,  Q^T M V_m = 0,   H_m = H_m^T,

expanded p columns at a time (T applied to the newest block; the block Lanczos recurrence,
i.e. Gram-Schmidt against the previous and the current block, then one block classical
Gram-Schmidt pass against the whole basis in the M inner product, a second one only when a
column lost half its norm; then a rank-revealing orthonormalisation of the block), restarted by
keeping the leading Ritz vectors U = V_m Y_k:
T U = U Theta_k + Q (B E_m^T Y_k). The residual of the Ritz pair (theta_i, V_m y_i) is
||B E_m^T y_i||_2 (M-norm); a pair is converged when that is below tol * theta_i (SLEPc's
relative test on the transformed problem, as in the single-vector solver). Converged pairs are
locked at a restart (as SLEPc does by default): they stay in the basis unchanged and leave the
Rayleigh-Ritz problem, so the restart and the final Ritz vectors only recombine the active
columns (measured at n = 12, 508 pairs, one rank: restart 6.9 -> 4.9 s, Ritz vectors 3.5 ->
1.9 s, the same pairs to 4e-15).

Why blocks: on the refined grids the single-vector Krylov-Schur spends its time in two
memory-bound kernels, one triangular solve per vector (the factor of L - sigma M read once per
vector) and Gram-Schmidt one vector at a time (the basis read twice per vector). With blocks
both become matrix-matrix work: MUMPS solves p right-hand sides per read of the factor
(MatMatSolve) and the orthogonalisation is dense GEMM, which also divides over MPI ranks.

Measured (benchmarks/eigensolve.py, n = 8, 21 504 dofs, 508 pairs, one rank, machine loaded):
block sizes 8, 16, 32 within 10 % of each other (fewer solves with small blocks, fewer passes
over the basis with large ones); ncv = 2 nev best of 1.5, 2, 2.5, 3 nev; the full pass is
~40 % of the time, the solves ~20 %, the restarts ~15 %. The Lanczos recurrence before the
full pass halved the Gram-Schmidt time (a second full pass was needed for every block when
the full pass came first: shift-and-invert blocks are dominated by their projection on the
newest vectors).

Every dense decision (eigen-decompositions of the projected matrix, rank decisions in the
orthonormalisation) is taken on rank 0 and broadcast, so all ranks keep the same basis.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import dolfinx_solver  # noqa: F401
import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from spinverse_fem.errors import SolverError

SI_PREFIX = "spinverse_bks_"


def _dense(X: np.ndarray, n_glob: int, comm) -> PETSc.Mat:
    n_loc, k = X.shape
    return PETSc.Mat().createDense(((n_loc, n_glob), (PETSc.DECIDE, k)),
                                   array=np.asfortranarray(X), comm=comm)


def apply_block(A: PETSc.Mat, X: np.ndarray) -> np.ndarray:
    """A @ X for a distributed sparse A and this rank's rows X (n_owned, k)."""
    if X.shape[1] == 0:
        return np.zeros_like(X)
    Xd = _dense(X, A.getSize()[1], A.getComm())
    Y = A.matMult(Xd)
    out = Y.getDenseArray().copy()
    Xd.destroy()
    Y.destroy()
    return out


class BlockProduct:
    """X -> A X for this rank's rows X (n_owned, k). When no rank's rows of A reach another
    rank's columns (the DG mass matrix is cell-local), the product is one SciPy CSR product of
    this rank's block, without PETSc's dense-matrix wrappers or communication; otherwise
    `apply_block`. Measured at n = 12 (one rank): the mass products of the block method took
    1.6 s through `apply_block`; per product of a 76k x 16 block 8.7 ms against 17.9 ms."""

    def __init__(self, A: PETSc.Mat):
        import scipy.sparse as sp

        self.A = A
        r0, r1 = A.getOwnershipRange()
        ai, aj, av = A.getValuesCSR()
        local = bool(aj.size == 0 or (aj.min() >= r0 and aj.max() < r1))
        self.csr = None
        if A.getComm().tompi4py().allreduce(local, op=MPI.LAND):
            self.csr = sp.csr_matrix((av, aj - r0, ai), shape=(r1 - r0, r1 - r0))

    def __call__(self, X: np.ndarray, fortran: bool = False) -> np.ndarray:
        """A X; fortran: in column-major order (as MUMPS wants its right-hand sides).
        Otherwise in whatever order is cheapest (a transposing copy of a 76k x 16 block costs
        as much as the product itself)."""
        if self.csr is None:
            return apply_block(self.A, X)
        out = self.csr @ X
        return np.asfortranarray(out) if fortran else out


class ShiftInvert:
    """T = (L - sigma M)^{-1} M on blocks, with one MUMPS factorisation of L - sigma M.

    definite: sigma lies below the spectrum (L - sigma M SPD: Cholesky without pivoting);
    otherwise LDL^T with the inertia available (`negative`: the number of eigenvalues below
    sigma, Sylvester). Counts: `solves` (right-hand sides), `blocks` (solve calls).

    redundant (default: on more than one rank, definite only): every rank factorises its own
    copy of the whole matrix (sequential MUMPS) and a block of right-hand sides is split by
    columns, each rank solving its share without communication inside the solve; the rows
    move by two all-to-alls. Measured at n = 8 (21 504 dofs, 16 right-hand sides per block,
    machine loaded): MUMPS' distributed MatMatSolve took 2.3x longer on two ranks than on one,
    so the distributed solve does not scale here, while the column split divides the solve
    time by the number of ranks. The price: each rank holds a whole factor and the
    factorisation does not speed up with ranks (it is a few percent of the eigen-solve)."""

    def __init__(self, L: PETSc.Mat, M: PETSc.Mat, sigma: float, *, definite: bool = False,
                 prefix: str = SI_PREFIX, redundant: bool | None = None):
        from spinverse_fem.forward.eigenbasis import mumps_cholesky

        self.L, self.M, self.sigma = L, M, float(sigma)
        self.mprod = BlockProduct(M)
        self.comm = L.getComm()
        self.n_glob = L.getSize()[0]
        size = self.comm.getSize()
        if redundant is None:
            opts = PETSc.Options(prefix)
            redundant = opts.getBool("redundant", True) if opts.hasName("redundant") else True
        self.redundant = bool(redundant and definite and size > 1)
        A = L.copy()
        A.axpy(-self.sigma, M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        if definite:
            A.setOption(PETSc.Mat.Option.SPD, True)
        self.definite = definite
        if self.redundant:
            full = PETSc.IS().createStride(self.n_glob, 0, 1, comm=PETSc.COMM_SELF)
            (Aseq,) = A.createSubMatrices(full)
            full.destroy()
            A.destroy()
            Aseq.setOption(PETSc.Mat.Option.SYMMETRIC, True)
            Aseq.setOption(PETSc.Mat.Option.SPD, True)
            A = Aseq
            self._ranges = np.asarray(L.getOwnershipRanges())
        self._A = A
        # ICNTL(13) = 1: the root stays on one process (the inertia needs the whole factor);
        # ICNTL(24) = 1: null pivots are detected instead of failing
        self._ksp = mumps_cholesky(A, prefix, None if definite else {13: 1, 24: 1})
        self.solves = 0
        self.blocks = 0

    @property
    def negative(self) -> int:
        """Number of eigenvalues below sigma (0 for a definite factorisation)."""
        if self.definite:
            return 0
        nneg, _, _ = self._ksp.getPC().getFactorMatrix().getInertia()
        return int(nneg)

    def _matsolve(self, B: np.ndarray, comm) -> np.ndarray:
        n_loc, k = B.shape
        n_glob = self._A.getSize()[0]
        Bd = PETSc.Mat().createDense(((n_loc, n_glob), (PETSc.DECIDE, k)),
                                     array=np.asfortranarray(B), comm=comm)
        Xd = PETSc.Mat().createDense(((n_loc, n_glob), (PETSc.DECIDE, k)), comm=comm)
        Xd.setUp()
        self._ksp.matSolve(Bd, Xd)
        out = Xd.getDenseArray().copy()
        Bd.destroy()
        Xd.destroy()
        return out

    def _solve_redundant(self, B: np.ndarray) -> np.ndarray:
        """Columns split over the ranks, each solved with this rank's whole factor."""
        comm = self.comm.tompi4py()
        size, rank = comm.size, comm.rank
        k = B.shape[1]
        rows = np.diff(self._ranges)
        cols = np.array_split(np.arange(k), size)
        kc = np.array([c.size for c in cols])
        # rows of my columns from every rank -> my whole columns
        send = np.concatenate([np.ascontiguousarray(B[:, c]).ravel() for c in cols])
        scounts = B.shape[0] * kc
        rcounts = rows * kc[rank]
        recv = np.empty(int(rcounts.sum()))
        comm.Alltoallv([send, scounts], [recv, rcounts])
        mine = recv.reshape(-1, kc[rank]) if kc[rank] else np.zeros((self.n_glob, 0))
        X = self._matsolve(mine, PETSc.COMM_SELF) if kc[rank] else mine
        # my columns' rows back to their owners
        send = np.concatenate([np.ascontiguousarray(X[self._ranges[q]:self._ranges[q + 1]])
                               .ravel() for q in range(size)]) if kc[rank] else np.zeros(0)
        scounts = rows * kc[rank]
        rcounts = B.shape[0] * kc
        recv = np.empty(int(rcounts.sum()))
        comm.Alltoallv([send, scounts], [recv, rcounts])
        out = np.empty_like(B, order="F")
        off = 0
        for q in range(size):
            n = int(rcounts[q])
            if n:
                out[:, cols[q]] = recv[off:off + n].reshape(B.shape[0], kc[q])
            off += n
        return out

    def solve(self, B: np.ndarray) -> np.ndarray:
        """(L - sigma M)^{-1} B for this rank's rows B (n_owned, k)."""
        if B.shape[1] == 0:
            return np.zeros_like(B)
        out = self._solve_redundant(B) if self.redundant else self._matsolve(B, self.comm)
        self.solves += B.shape[1]
        self.blocks += 1
        return out

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return self.solve(self.mprod(X, fortran=True))

    def destroy(self) -> None:
        self._ksp.destroy()
        self._A.destroy()


@dataclass
class BlockKSResult:
    """lam: (k,) ascending; vecs: (n_owned, k) M-orthonormal; restarts, solves: work done;
    residuals: (k,) relative residuals of the transformed problem; locked: pairs locked at
    restarts."""

    lam: np.ndarray
    vecs: np.ndarray
    restarts: int
    solves: int
    residuals: np.ndarray
    seconds: dict = field(default_factory=dict)
    locked: int = 0


class _Timer:
    def __init__(self):
        self.seconds = defaultdict(float)

    def __call__(self, key):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[key] += time.perf_counter() - self.t
        return _T()


class _Orthogonaliser:
    """Block classical Gram-Schmidt in the M inner product, a second pass only when a column
    lost more than half its norm (the DGKS test, as SLEPc's "ifneeded" refinement), then a
    rank-revealing orthonormalisation of the block (eigen-decomposition of its Gram matrix,
    decided on rank 0, then Cholesky QR once more). Directions lost to rank deficiency are
    replaced by random ones (zero coefficients), so a block keeps its width and the Krylov
    relation stays exact."""

    def __init__(self, M: PETSc.Mat, comm: MPI.Comm, seed: int = 0, timer=None,
                 mprod: BlockProduct | None = None):
        self.M, self.comm = M, comm
        self.mprod = mprod or BlockProduct(M)
        self.rng = np.random.default_rng(seed + 7919 * comm.rank)
        self.timer = timer or _Timer()
        self.passes = 0
        self.skipped = 0

    def _sum(self, local: np.ndarray) -> np.ndarray:
        return self.comm.allreduce(local, op=MPI.SUM)

    def _mnorm2(self, W: np.ndarray, MW: np.ndarray) -> np.ndarray:
        return self._sum(np.einsum("ij,ij->j", W, MW))

    def project_out(self, W: np.ndarray, bases: list[np.ndarray], passes: int = 2,
                    refine: bool = True, MW: np.ndarray | None = None, sketch=None):
        """W minus its M-projection on the columns of every basis (each M-orthonormal), in
        up to `passes` classical Gram-Schmidt passes (the later ones only when needed if
        refine); MW: M W if known. sketch: a `_Sketch` of bases[0] (the others empty): the
        passes are skipped when it shows every coefficient below its tolerance. Returns (W,
        coefficients per basis, M W, squared M-norms of the result)."""
        coeffs = [np.zeros((V.shape[1], W.shape[1])) for V in bases]
        live = [(i, V) for i, V in enumerate(bases) if V.shape[1]]
        if MW is None:
            with self.timer("orth_matmult"):
                MW = self.mprod(W)
        nrm = self._mnorm2(W, MW)
        if live and sketch is not None and len(live) == 1 and live[0][0] == 0:
            with self.timer("orth_sketch"):
                if sketch.negligible(MW, nrm):
                    self.skipped += 1
                    return W, coeffs, MW, nrm
        for it in range(passes if live else 0):
            with self.timer("orth_gemm"):
                Cs = self._sum(np.vstack([V.T @ MW for _, V in live]))
                row = 0
                for i, V in live:
                    C = Cs[row:row + V.shape[1]]
                    row += V.shape[1]
                    W -= V @ C
                    coeffs[i] += C
            self.passes += 1
            with self.timer("orth_matmult"):
                MW = self.mprod(W)
            before, nrm = nrm, self._mnorm2(W, MW)
            if refine and np.all(nrm > 0.5 * before):   # |w_new| > |w_old| / sqrt(2)
                break
        return W, coeffs, MW, nrm

    def orthonormalise(self, W: np.ndarray, bases: list[np.ndarray], width: int | None = None,
                       local: tuple[int, int] | None = None, sketch=None):
        """Q (n_owned, width), coefficients C per basis and B (width, k) with
        W = sum_i bases[i] C_i + Q B; Q is M-orthonormal and M-orthogonal to every basis.
        width (>= k, default k) columns are returned; if W has lower numerical rank the rest
        are random directions (rows of B zero). Fewer columns only when the space runs out.
        local = (lo, hi): first one pass against the columns lo:hi of bases[0] alone (the
        Lanczos recurrence), then the passes against everything (skipped when `sketch`, a
        `_Sketch` of bases[0], shows them negligible)."""
        k = W.shape[1]
        width = k if width is None else max(int(width), k)
        W = np.array(W, dtype=float, order="F", copy=True)
        with self.timer("orth_matmult"):
            MW = self.mprod(W)
        norm0 = self._mnorm2(W, MW)
        Cl = None
        if local is not None and local[1] > local[0]:
            with self.timer("orth_gemm"):
                Vl = bases[0][:, local[0]:local[1]]
                Cl = self._sum(Vl.T @ MW)
                W -= Vl @ Cl
            MW = None
        W, coeffs, MW, _ = self.project_out(W, bases, MW=MW, sketch=sketch)
        if Cl is not None:
            coeffs[0][local[0]:local[1]] += Cl
        with self.timer("orth_block"):
            G = self._sum(W.T @ MW)
            d, U = self._eigh_root(0.5 * (G + G.T))
            scale = max(float(np.max(norm0)) if norm0.size else 0.0, np.finfo(float).tiny)
            good = d > (1e-12) ** 2 * scale
            # W U_g d_g^{-1/2} is M-orthonormal; W = Q (d_g^{1/2} U_g^T) up to the dropped part
            S = U[:, good] / np.sqrt(d[good])
            Q = W @ S
            MQ = MW @ S
            B = np.sqrt(d[good])[:, None] * U[:, good].T
            deficient = bool(d.size and d.min() < 1e-8 * scale)
        if deficient:
            # cancellation in the block: orthogonality to the bases once more
            Q, c2, MQ, _ = self.project_out(Q, bases, passes=1, refine=False)
            coeffs = [C + c @ B for C, c in zip(coeffs, c2)]
        with self.timer("orth_block"):
            if Q.shape[1]:
                # Cholesky QR once more: orthonormal to working precision
                G = self._sum(Q.T @ MQ)
                R = np.linalg.cholesky(0.5 * (G + G.T)).T
                Q = Q @ np.linalg.inv(R)
                B = R @ B
        missing = width - Q.shape[1]
        if missing > 0:
            n_glob = self.M.getSize()[0]
            room = n_glob - sum(V.shape[1] for V in bases) - Q.shape[1]
            missing = min(missing, max(room, 0))
            if missing > 0:
                X = self.rng.standard_normal((W.shape[0], missing))
                Z, _, _ = self.orthonormalise(X, bases + [Q])
                Q = np.hstack([Q, Z])
                B = np.vstack([B, np.zeros((Z.shape[1], k))])
        return np.asfortranarray(Q), coeffs, B

    def _eigh_root(self, S: np.ndarray):
        """Eigen-decomposition computed on rank 0 and broadcast (same decisions everywhere)."""
        out = np.linalg.eigh(S) if self.comm.rank == 0 else None
        return self.comm.bcast(out, root=0)


class _Sketch:
    """A random sketch S = V Omega (n_owned, r) of the basis V, Omega (columns of V, r) with
    N(0, 1/r) entries (the same on every rank), kept up to date as V grows and rebuilt at a
    restart. For a block W, S^T M W = Omega^T (V^T M W): r random combinations of the
    Gram-Schmidt coefficients C = V^T M W at the cost of r basis columns instead of all of
    them. ||Omega^T c||^2 / ||c||^2 is chi-square with r degrees of freedom over r, so an
    estimate below tol / 10 means ||c|| < tol except with probability ~1e-20 for r = 32
    (chi2_32 < 0.32). `negligible` is true when every column's estimate is below
    tol / 10 times its M-norm: the full pass would change W by less than tol relative."""

    def __init__(self, n_loc: int, cap: int, r: int, comm, tol: float, seed: int):
        self.comm, self.tol = comm, float(tol)
        self.omega = np.random.default_rng(seed).standard_normal((cap, r)) / np.sqrt(r)
        self.S = np.zeros((n_loc, r))

    def rebuild(self, V: np.ndarray, end: int) -> None:
        self.S = V[:, :end] @ self.omega[:end]

    def add(self, Q: np.ndarray, start: int) -> None:
        self.S += Q @ self.omega[start:start + Q.shape[1]]

    def negligible(self, MW: np.ndarray, mnorm2: np.ndarray) -> bool:
        est = self.comm.allreduce(self.S.T @ MW, op=MPI.SUM)
        return bool(np.all(np.linalg.norm(est, axis=0)
                           < 0.1 * self.tol * np.sqrt(np.maximum(mnorm2, 0.0))))


def block_krylov_schur(op: ShiftInvert, nev: int, *, block: int = 16, ncv: int | None = None,
                       tol: float = 1e-10, max_restarts: int = 200, keep: float = 0.5,
                       deflation: np.ndarray | None = None, initial: np.ndarray | None = None,
                       seed: int = 0, sketch: int = 0, sketch_tol: float = 1e-12,
                       lock: bool = True) -> BlockKSResult:
    """The nev eigenpairs of (L, M) nearest the shift (the largest |theta| of T = op; the nev
    smallest when the shift lies below the spectrum).

    op: the shift-and-invert operator; block: p, columns per expansion (one MatMatSolve);
    ncv: largest basis before a restart (default max(2 nev, nev + 4 p)); deflation
    (n_owned, d): M-orthonormal vectors whose span is excluded (known eigenvectors);
    initial (n_owned, q): start vectors (the first block: q <= p of them plus random ones,
    or p random combinations of q > p of them); sketch: r > 0 skips a block's full
    Gram-Schmidt pass when an r-column random sketch of the basis (`_Sketch`) shows its
    coefficients below sketch_tol relative (after the Lanczos recurrence they are often at
    round-off: the full pass then only re-confirms orthogonality); 0: always the full pass.
    lock: at a restart, converged Ritz pairs are locked (SLEPc's default): they stay at the
    front of the basis, unchanged, and leave the Rayleigh-Ritz problem; their couplings (below
    tol * theta by the convergence test) are set to zero. The restart and the final Ritz
    vectors then combine only the active columns; later blocks are still orthogonalised
    against the locked vectors. Returns the converged pairs, ascending in lambda."""
    comm = op.comm.tompi4py()
    M = op.M
    n_glob = op.n_glob
    timer = _Timer()
    D = np.zeros((M.getLocalSize()[0], 0)) if deflation is None else deflation
    room = n_glob - D.shape[1]
    if room <= 0:
        raise SolverError("block Krylov-Schur: no room left beside the deflation space")
    nev = min(int(nev), room)
    p = max(1, min(int(block), room))
    if ncv is None:
        ncv = max(2 * nev, nev + 4 * p)
    ncv = int(min(max(ncv, nev + p), room))
    cap = min(ncv + p, room)
    ortho = _Orthogonaliser(M, comm, seed, timer, mprod=op.mprod)
    n_loc = M.getLocalSize()[0]
    V = np.zeros((n_loc, cap), order="F")
    H = np.zeros((cap, cap))
    if initial is not None and initial.shape[1] > p:
        # a wide start space (e.g. the previous basis): p random combinations of it (the
        # same combinations on every rank)
        G = np.random.default_rng(seed).standard_normal((initial.shape[1], p))
        X0 = np.asarray(initial, dtype=float) @ G
    elif initial is not None and initial.shape[1]:
        X0 = np.array(initial, dtype=float)
    else:
        X0 = ortho.rng.standard_normal((n_loc, p))
    # the first block: the start vectors plus random ones up to p columns
    Q, _, _ = ortho.orthonormalise(X0, [D], width=p)
    j, end = 0, Q.shape[1]
    V[:, :end] = Q
    sk = (_Sketch(n_loc, cap, int(sketch), comm, sketch_tol, seed + 1)
          if sketch and D.shape[1] == 0 else None)
    if sk is not None:
        sk.rebuild(V, end)
    local = 0   # first column the next block couples to in exact arithmetic
    restarts = 0
    solves0 = op.solves
    nlock = 0                        # locked (converged, frozen) columns at the front of V
    theta_lock = np.zeros(0)
    rel_lock = np.zeros(0)
    while True:
        # expand: T applied to the newest block V[:, j:end]
        # (when the basis may span the whole space, expand to the end: the last block then
        # has nothing left outside the basis and every Ritz pair is exact)
        while end > j and (end + (end - j) <= cap or cap == room):
            with timer("solve"):
                W = op(V[:, j:end])
            # the Lanczos recurrence first: in exact arithmetic T V_j couples only to the
            # previous and the current block (to everything right after a restart); then one
            # full pass (a second one only when needed) keeps the basis orthogonal
            Q, (C, _), Bk = ortho.orthonormalise(W, [V[:, :end], D], local=(local, end),
                                                 sketch=sk)
            local = j
            C[:nlock] = 0.0   # locked pairs: coupling below tol * theta, dropped
            H[:end, j:end] = C
            H[j:end, :end] = C.T
            b = Q.shape[1]
            H[end:end + b, j:end] = Bk
            H[j:end, end:end + b] = Bk.T
            V[:, end:end + b] = Q
            if sk is not None:
                with timer("orth_sketch"):
                    sk.add(Q, end)
            j, end = end, end + b
        # Rayleigh-Ritz in the active columns V[:, nlock:j]; V[:, j:end] is the residual block
        m = j
        with timer("rayleigh_ritz"):
            Hm = 0.5 * (H[nlock:m, nlock:m] + H[nlock:m, nlock:m].T)
            theta_a, Ya = ortho._eigh_root(Hm)
            order = np.argsort(-np.abs(theta_a), kind="stable")
            theta_a, Ya = theta_a[order], Ya[:, order]
            coupling = H[m:end, nlock:m]
            res = (np.linalg.norm(coupling @ Ya, axis=0) if end > m
                   else np.zeros(theta_a.size))
            rel_a = res / np.maximum(np.abs(theta_a), np.finfo(float).tiny)
            # all pairs (locked first), in descending |theta|: the nconv leading ones converged
            theta = np.concatenate([theta_lock, theta_a])
            rel = np.concatenate([rel_lock, rel_a])
            merged = np.argsort(-np.abs(theta), kind="stable")
            conv = rel[merged] < tol
            nconv = int(np.argmin(conv)) if not conv.all() else m
            done = nconv >= nev
        if done or end == m or restarts >= max_restarts:
            break
        b = end - m
        # thick restart: keep the converged Ritz vectors and a fraction `keep` of the rest
        nconv_all = int(np.sum(rel < tol))
        kept = min(m - 1, max(nconv_all + int(keep * (m - nconv_all)), nev + 1))
        kept = max(min(kept, cap - 2 * b), 1)   # room for at least one expansion
        conv_a = np.flatnonzero(rel_a < tol) if lock else np.zeros(0, dtype=int)
        conv_a = conv_a[:max(kept - nlock - 1, 0)]   # at least one active column stays
        rest = np.setdiff1d(np.arange(theta_a.size), conv_a, assume_unique=True)
        sel = np.concatenate([conv_a, rest[:max(kept - nlock - conv_a.size, 0)]])
        with timer("restart"):
            V[:, nlock:nlock + sel.size] = V[:, nlock:m] @ Ya[:, sel]
            R = V[:, m:end].copy()
            S = coupling @ Ya[:, sel]
            S[:, :conv_a.size] = 0.0
            theta_lock = np.concatenate([theta_lock, theta_a[conv_a]])
            rel_lock = np.concatenate([rel_lock, rel_a[conv_a]])
            kept = nlock + sel.size
            H[:] = 0.0
            H[:kept, :kept] = np.diag(np.concatenate([theta_lock, theta_a[rest[:sel.size
                                                                               - conv_a.size]]]))
            nlock += conv_a.size
            V[:, kept:kept + b] = R
            H[kept:kept + b, nlock:kept] = S[:, conv_a.size:]
            H[nlock:kept, kept:kept + b] = S[:, conv_a.size:].T
        j, end = kept, kept + b
        local = nlock
        restarts += 1
        if sk is not None:
            with timer("orth_sketch"):
                sk.rebuild(V, end)
    if not done and end > m:
        raise SolverError(f"block Krylov-Schur converged {nconv} of {nev} eigenpairs after "
                          f"{restarts} restarts (tol {tol:g})")
    nconv = min(nconv, nev)   # Ritz vectors only for the pairs asked for
    pick = merged[:nconv]
    theta, rel = theta[pick], rel[pick]
    with timer("ritz_vectors"):
        locked = pick[pick < nlock]
        active = pick[pick >= nlock] - nlock
        vecs = np.empty((n_loc, nconv), order="F")
        is_locked = pick < nlock
        vecs[:, is_locked] = V[:, locked]
        vecs[:, ~is_locked] = V[:, nlock:m] @ Ya[:, active]
    lam = op.sigma + 1.0 / theta
    order = np.argsort(lam, kind="stable")
    lam, rel, vecs = lam[order], rel[order], vecs[:, order]
    seconds = dict(timer.seconds)
    seconds["orth_passes"] = ortho.passes
    seconds["orth_skipped"] = ortho.skipped
    return BlockKSResult(lam=lam, vecs=vecs, restarts=restarts, solves=op.solves - solves0,
                         residuals=rel, seconds=seconds, locked=nlock)
