r"""Full-order reference model: Crank-Nicolson time stepping of the semi-discrete Bloch-Torrey
system on the broken P1 space, and its exact discrete adjoint for per-face permeabilities.

Semi-discrete system for measurement c (direction g_c, strength q_c in 1/(um ms)) of a sequence
with piecewise-constant waveform f(t) in [-1, 1]:

    M dm/dt = -(L(kappa) + i q_c f(t) G_c) m,   G_c = g_c . J,   m(0) = rho (every dof: the
                                                  spin density, 1 unless compartments differ),
    S_c = (M 1)^T m(TE)                         (complex, unnormalised, um^3).

PETSc is real-scalar, so m = a + i b and z = [a; b] (2N real unknowns, per rank laid out as
[a_owned, b_owned]) solves  M_blk dz/dt = -H z  with

    H(s) = [[L, -s G], [s G, L]],   M_blk = diag(M, M),   s = q_c f_j on segment j.

Crank-Nicolson on a segment of duration d_j (ms) split into n_j = ceil(d_j / time_step) equal
steps dt_j = d_j / n_j (segment ends are hit exactly, so the waveform is constant on each step):

    P_n z^{n+1} = Q_n z^n,   P_n = M_blk + dt_n/2 H(s_n),   Q_n = M_blk - dt_n/2 H(s_n).

Factorisations (MUMPS LU, one per distinct key, reused across steps and measurements):
- s != 0: the 2N x 2N block P(dt, s g). M, L, G are symmetric, so H(s)^T = H(-s) and
  P(s)^T = P(-s): one factorisation of P(|s| g) serves the segments with +s (solve) and -s
  (transposed solve); the adjoint's P^T solves use the same factors. Q_n = 2 M_blk - P_n.
- s = 0 (gradient off, or a b = 0 measurement): a and b decouple, so the N x N matrix
  A = M + dt/2 L is factored once per dt and every such column of every measurement in a batch
  is advanced by one multi-right-hand-side solve (much cheaper per column than single solves);
  here Q = M - dt/2 L is its own matrix.
Measurements are processed in batches, time step by time step for the whole batch; identical
gradient vectors q_c g_c (e.g. all b = 0 rows) are simulated once.

Adjoint (exact for the discrete recursion). For a real objective J with
S_bar_c = dJ/dRe S_c + i dJ/dIm S_c, i.e. dJ = Re(sum_c conj(S_bar_c) dS_c):

    P_{N-1}^T lam_N = [Re S_bar w; Im S_bar w],   w = M 1,
    P_{n-1}^T lam_n = Q_n^T lam_{n+1}                       (n = N-1, ..., 1),
    dJ/dkappa_f = -sum_n dt_n/2 lam_{n+1}^T diag(B_f, B_f) (z^n + z^{n+1}),

because dP_n/dkappa_f = -dQ_n/dkappa_f = dt_n/2 diag(B_f, B_f) (L = A + sum_f kappa_f B_f; the
G blocks do not depend on kappa). The per-face contraction runs through `FaceSensitivity` on
stacked columns (two per time step and measurement: the a and b halves), `sensitivity_chunk`
columns per assembly.

Memory: the forward states of a batch are kept every `checkpoint_interval` steps; the backward
sweep recomputes the states inside each interval from its checkpoint (interval 1 = store all, no
recomputation; interval K stores about N/K + K states per measurement for one extra forward
sweep). A batch keeps its block factorisations alive (about one per measurement for PGSE).

Every PETSc solve uses a KSP with options prefix "spinverse_cn_" (default preonly + LU with
MUMPS), so e.g. `-spinverse_cn_pc_factor_mat_solver_type superlu_dist` changes the solver.
"""

from __future__ import annotations

import math

import dolfinx_solver  # noqa: F401  (must precede petsc4py)
import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from spinverse_fem.errors import SolverError
from spinverse_fem.fem.operators import BlochTorreyOperators
from spinverse_fem.fem.sensitivity import FaceSensitivity

CN_PREFIX = "spinverse_cn_"
# ceil(d / time_step) with this relative slack, so that e.g. 10 / 0.1 = 100.00000000000001 gives
# 100 steps, not 101.
_STEP_COUNT_RTOL = 1e-9
_ZERO = (0.0, 0.0, 0.0)


def segment_steps(segments, time_step_ms: float) -> list[tuple[float, int, float]]:
    """Time grid of a piecewise-constant waveform: [(dt_ms, n_steps, amplitude), ...].

    segments: ((duration_ms, amplitude), ...). A segment of duration d > 0 gets
    n = ceil(d / time_step_ms) steps of dt = d / n (ms); zero-length segments are dropped.
    """
    ts = float(time_step_ms)
    out = []
    for duration, amplitude in segments:
        d = float(duration)
        if d <= 0.0:
            continue
        n = max(1, math.ceil(d / ts * (1.0 - _STEP_COUNT_RTOL)))
        out.append((d / n, n, float(amplitude)))
    return out


def _canonical(v: np.ndarray) -> tuple[tuple[float, float, float], int]:
    """(key, sign) with v = sign * key and the first nonzero component of key positive.

    Exact in floating point (negation only), so v and -v map to the same key; +0.0 removes -0.0.
    """
    nz = np.flatnonzero(v)
    if nz.size == 0:
        return _ZERO, 1
    sign = 1 if v[nz[0]] > 0 else -1
    key = v if sign > 0 else -v
    return (float(key[0]) + 0.0, float(key[1]) + 0.0, float(key[2]) + 0.0), sign


def _cn_ksp(A: PETSc.Mat) -> PETSc.KSP:
    """Direct solver for A (preonly + LU/MUMPS unless the spinverse_cn_ options say otherwise)."""
    ksp = PETSc.KSP().create(A.getComm())
    ksp.setOptionsPrefix(CN_PREFIX)
    ksp.setOperators(A)
    ksp.setType(PETSc.KSP.Type.PREONLY)
    pc = ksp.getPC()
    pc.setType(PETSc.PC.Type.LU)
    pc.setFactorSolverType("mumps")
    ksp.setFromOptions()
    ksp.setUp()
    return ksp


def _verify_transposed_solves(comm) -> None:
    """Raise SolverError if the configured spinverse_cn_ solver gets transposed solves wrong.

    Segments with -s and every adjoint step rely on KSPSolveTranspose; some factorisation
    packages (e.g. SuperLU_DIST in PETSc 3.25) silently solve the untransposed system instead.
    Checked on a small nonsymmetric bidiagonal matrix (2 on the diagonal, 1 above).
    """
    n_loc = 4
    A = PETSc.Mat().createAIJ(((n_loc, PETSc.DECIDE), (n_loc, PETSc.DECIDE)), nnz=(2, 1),
                              comm=comm)
    r0, r1 = A.getOwnershipRange()
    n = A.getSize()[0]
    for i in range(r0, r1):
        A.setValue(i, i, 2.0)
        if i + 1 < n:
            A.setValue(i, i + 1, 1.0)
    A.assemble()
    ksp = _cn_ksp(A)
    b, x = A.createVecs()
    b.set(1.0)
    ksp.solveTranspose(b, x)
    r = b.duplicate()
    A.multTranspose(x, r)
    r.axpy(-1.0, b)
    rel = r.norm() / b.norm()
    tol = max(1e-6, 100.0 * ksp.getTolerances()[0])
    pc = ksp.getPC()
    solver = pc.getFactorSolverType() if pc.getType() in ("lu", "cholesky") else None
    for obj in (r, b, x, ksp, A):
        obj.destroy()
    if not rel <= tol:
        raise SolverError(f"the {CN_PREFIX} solver ({solver or 'as configured'}) returns wrong "
                          f"transposed solves (relative residual {rel:.2e}); use e.g. MUMPS")


def _check(ksp: PETSc.KSP) -> None:
    reason = ksp.getConvergedReason()
    if reason < 0:
        raise SolverError(f"Crank-Nicolson solve failed (KSP converged reason {reason})")


class _BlockFactor:
    """P(dt, v) = M_blk + dt/2 H(v) (2N x 2N AIJ, rows [a_owned, b_owned]) and its KSP.

    v: (3,) gradient vector s g in 1/(um ms) (q f g), nonzero; H(v) = [[L, -v.J], [v.J, L]].
    """

    def __init__(self, ops: BlochTorreyOperators, dt: float, v: tuple[float, float, float]):
        A = ops.L.copy()
        A.scale(0.5 * dt)
        # pattern(M) is a subset of pattern(L): L holds the cell blocks plus the face couplings
        A.axpy(1.0, ops.M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        C = ops.J[0].copy()
        C.scale(0.5 * dt * v[0])
        C.axpy(0.5 * dt * v[1], ops.J[1], PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        C.axpy(0.5 * dt * v[2], ops.J[2], PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
        mC = C.copy()
        mC.scale(-1.0)
        nest = PETSc.Mat().createNest([[A, mC], [C, A]], comm=ops.M.getComm())
        # petsc4py converts in place when no output Mat is given: `nest` becomes the AIJ matrix
        self.P = nest.convert(PETSc.Mat.Type.AIJ)
        for m in (A, C, mC):
            m.destroy()
        self.ksp = _cn_ksp(self.P)

    def destroy(self) -> None:
        self.ksp.destroy()
        self.P.destroy()


class _ZeroFactor:
    """Gradient-free step dt on the N x N level: A = M + dt/2 L (factored), B = M - dt/2 L."""

    def __init__(self, ops: BlochTorreyOperators, dt: float):
        self.A = ops.L.copy()
        self.A.scale(0.5 * dt)
        self.A.axpy(1.0, ops.M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        self.B = ops.L.copy()
        self.B.scale(-0.5 * dt)
        self.B.axpy(1.0, ops.M, PETSc.Mat.Structure.SUBSET_NONZERO_PATTERN)
        self.ksp = _cn_ksp(self.A)

    def _dense(self, W: np.ndarray) -> PETSc.Mat:
        # PETSc wraps (does not copy) the caller's Fortran-ordered array
        n_loc, k = W.shape
        return PETSc.Mat().createDense(((n_loc, self.A.getSize()[0]), (PETSc.DECIDE, k)),
                                       array=np.asfortranarray(W), comm=self.A.getComm())

    def apply_B(self, W: np.ndarray, transpose: bool) -> np.ndarray:
        """B W or B^T W for local rows W (n_owned, k), Fortran-ordered."""
        Wd = self._dense(W)
        Y = self.B.transposeMatMult(Wd) if transpose else self.B.matMult(Wd)
        out = Y.getDenseArray().copy(order="F")
        Y.destroy()
        Wd.destroy()
        return out

    def solve(self, W: np.ndarray, transpose: bool) -> np.ndarray:
        """A^{-1} W or A^{-T} W for local rows W (n_owned, k), Fortran-ordered."""
        Wd = self._dense(W)
        X = Wd.duplicate()
        if transpose:
            self.ksp.matSolveTranspose(Wd, X)
        else:
            self.ksp.matSolve(Wd, X)
        _check(self.ksp)
        out = X.getDenseArray().copy(order="F")
        X.destroy()
        Wd.destroy()
        return out

    def destroy(self) -> None:
        for obj in (self.ksp, self.A, self.B):
            obj.destroy()


class _StepPlan:
    """How one time step advances the columns of a batch.

    dt: step (ms); zero_cols: (k,) columns with s = 0, advanced together by `zero`;
    block: [(column, factor, transposed)] with P_n = factor.P (or its transpose).
    """

    def __init__(self, dt, zero_cols, zero, block):
        self.dt = dt
        self.zero_cols = zero_cols
        self.zero = zero
        self.block = block


class FullOrderModel:
    """Crank-Nicolson Bloch-Torrey signals and their exact adjoint gradient in kappa.

    Parameters
    ----------
    ops: BlochTorreyOperators. The model uses its current L (set kappa with ops.set_kappa or
         the `kappa` argument of the methods; a change of L is detected and the cached
         factorisations are rebuilt).
    time_step_ms: largest Crank-Nicolson step (ms); each segment of duration d gets
         ceil(d / time_step_ms) equal steps.
    checkpoint_interval: keep every K-th forward state for the adjoint (1 = all states).
    batch_size: distinct gradient vectors advanced together (their gradient-free steps share
         one multi-right-hand-side solve; their block factorisations live together).
    sensitivity_chunk: columns per face-sensitivity assembly.

    All methods are collective; inputs (sequence, S_bar, kappa) must be identical on every rank
    and outputs are replicated.
    """

    def __init__(self, ops: BlochTorreyOperators, time_step_ms: float, *,
                 checkpoint_interval: int = 1, batch_size: int = 8,
                 sensitivity_chunk: int = 16):
        ts = float(time_step_ms)
        if not (math.isfinite(ts) and ts > 0):
            raise ValueError(f"time_step_ms must be a positive number of ms, got {time_step_ms!r}")
        for name, val in (("checkpoint_interval", checkpoint_interval),
                          ("batch_size", batch_size), ("sensitivity_chunk", sensitivity_chunk)):
            if int(val) != val or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        _verify_transposed_solves(ops.M.getComm())
        self.ops = ops
        self.time_step_ms = ts
        self.checkpoint_interval = int(checkpoint_interval)
        self.batch_size = int(batch_size)
        self.comm: MPI.Comm = ops.comm
        self.n_owned = ops.M.getLocalSize()[0]
        nest = PETSc.Mat().createNest([[ops.M, None], [None, ops.M]], comm=ops.M.getComm())
        self.M_blk = nest.convert(PETSc.Mat.Type.AIJ)  # in place; rows [a_owned, b_owned]
        self._x, self._y = self.M_blk.createVecs()
        self._tmp = self.M_blk.createVecLeft()
        self.w = ops.mass_ones.getArray(readonly=True).copy()  # owned rows of M 1 (um^3)
        self._chunk = int(sensitivity_chunk)
        self._sensitivity: FaceSensitivity | None = None
        self._block: dict = {}
        self._zero: dict = {}
        self._L_state = None

    # -- public API -----------------------------------------------------------------------------

    def signals(self, sequence, kappa: np.ndarray | None = None) -> np.ndarray:
        """(n,) complex signals S_c = (M 1)^T m_c(TE) in um^3 for the sequence's measurements.

        kappa: optional (F,) um/ms, canonical faces; set on `ops` before simulating.
        """
        S, _ = self._run(sequence, None, kappa)
        return S

    def signals_and_vjp(self, sequence, S_bar, kappa: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Signals (n,) complex and kappa_bar (F,) = dJ/dkappa (canonical faces, per um/ms).

        S_bar: (n,) complex, dJ/dRe S + i dJ/dIm S of a real objective J (so that
        dJ = Re(sum_c conj(S_bar_c) dS_c)); the same array on every rank.
        """
        n = np.asarray(sequence.b_s_per_mm2).shape[0]
        S_bar = np.asarray(S_bar, dtype=np.complex128)
        if S_bar.shape != (n,):
            raise ValueError(f"S_bar has shape {S_bar.shape}, expected ({n},)")
        if not np.all(np.isfinite(S_bar)):
            raise ValueError("S_bar must be finite")
        # column subsets of the backward sweep follow S_bar: differing copies would deadlock
        same = np.array_equal(S_bar, self.comm.bcast(S_bar, root=0))
        if not self.comm.allreduce(same, op=MPI.LAND):
            raise ValueError("S_bar differs between MPI ranks")
        return self._run(sequence, S_bar, kappa)

    def normalised_signals(self, sequences, kappa: np.ndarray | None = None
                           ) -> tuple[list[np.ndarray], list[float]]:
        """(S/S0 (n_k,) complex per sequence, S0 per sequence in um^3): S0 is the model's own
        b = 0 signal at the sequence's echo time, computed by the same Crank-Nicolson
        recursion (one appended b = 0 row), as the reduced model normalises
        (`ForwardModel.normalised_signals`). SolverError if an S0 is not positive and finite."""
        out, s0s = [], []
        for seq in sequences:
            raw = self.signals(with_b0_row(seq), kappa=kappa)
            s0 = float(raw[-1].real)
            if not (np.isfinite(s0) and s0 > 0.0):
                raise SolverError(f"the full-order b = 0 signal of sequence {seq.name!r} is "
                                  f"{s0:.3g} um^3: check T2, the echo time and the time step")
            out.append(raw[:-1] / s0)
            s0s.append(s0)
        return out, s0s

    def time_steps(self, sequence) -> list[tuple[float, int, float]]:
        """The time grid used for `sequence`: [(dt_ms, n_steps, amplitude), ...]."""
        return segment_steps(sequence.segments, self.time_step_ms)

    def destroy(self) -> None:
        """Free the PETSc objects (collective)."""
        self._clear(block_only=False)
        for obj in (self.M_blk, self._x, self._y, self._tmp):
            obj.destroy()

    # -- factor caches --------------------------------------------------------------------------

    def _refresh(self, kappa) -> None:
        if kappa is not None:
            self.ops.set_kappa(kappa)
        _ = self.ops.kappa_values  # raises if L was never assembled
        state = self.ops.L.stateGet()
        # the decision must be collective: every rank rebuilds (and destroys) the same factors
        if self.comm.allreduce(state != self._L_state, op=MPI.LOR):
            self._clear(block_only=False)
            self._L_state = state

    def _clear(self, block_only: bool) -> None:
        # sorted keys: PETSc objects are destroyed in the same order on every rank
        for key in sorted(self._block):
            self._block.pop(key).destroy()
        if not block_only:
            for key in sorted(self._zero):
                self._zero.pop(key).destroy()

    def _plan(self, grid, V: np.ndarray) -> list[_StepPlan]:
        """Per time step, how the columns with gradient vectors V (m, 3) advance."""
        plans = []
        for dt, n, amp in grid:
            zero_cols, block = [], []
            for c in range(V.shape[0]):
                key, sign = _canonical(amp * V[c])
                if key == _ZERO:
                    zero_cols.append(c)
                    continue
                f = self._block.get((dt, key))
                if f is None:
                    f = self._block[(dt, key)] = _BlockFactor(self.ops, dt, key)
                block.append((c, f, sign < 0))
            zero = None
            if zero_cols:
                zero = self._zero.get(dt)
                if zero is None:
                    zero = self._zero[dt] = _ZeroFactor(self.ops, dt)
            plan = _StepPlan(dt, np.array(zero_cols, dtype=np.int64), zero, block)
            plans.extend([plan] * n)
        return plans

    # -- sweeps ---------------------------------------------------------------------------------
    # States of a batch are arrays X (m, 2 n_owned): row c is [a_owned, b_owned] of column c.
    # The sweeps go segment by segment ("runs" of steps sharing one plan). Inside a run the
    # columns are independent: the gradient-free columns advance together (one multi-RHS solve
    # per step) and each gradient column runs through all steps of the run with its own factor
    # before the next column starts (so the factor stays in cache).

    def _to_w(self, X: np.ndarray) -> np.ndarray:
        """(k, 2 n_owned) rows -> (n_owned, 2k) Fortran columns [a_1..a_k, b_1..b_k]."""
        nloc = self.n_owned
        return np.asfortranarray(np.concatenate([X[:, :nloc], X[:, nloc:]]).T)

    def _from_w(self, W: np.ndarray) -> np.ndarray:
        k = W.shape[1] // 2
        return np.concatenate([W[:, :k].T, W[:, k:].T], axis=1)

    @staticmethod
    def _subruns(plans, n0: int, n1: int) -> list[tuple[int, int]]:
        """Maximal ranges [r0, r1) inside [n0, n1) whose steps share one plan."""
        runs, r0 = [], n0
        for n in range(n0 + 1, n1 + 1):
            if n == n1 or plans[n] is not plans[r0]:
                runs.append((r0, n))
                r0 = n
        return runs

    def _block_step(self, f: _BlockFactor, tr: bool) -> None:
        """self._x <- P^{-1} Q self._x with Q = 2 M_blk - P, P = f.P (f.P^T if tr)."""
        self.M_blk.mult(self._x, self._y)
        self._y.scale(2.0)
        if tr:
            f.P.multTranspose(self._x, self._tmp)
            self._y.axpy(-1.0, self._tmp)
            f.ksp.solveTranspose(self._y, self._x)
        else:
            f.P.mult(self._x, self._tmp)
            self._y.axpy(-1.0, self._tmp)
            f.ksp.solve(self._y, self._x)
        _check(f.ksp)

    def _advance(self, plans, X: np.ndarray, n0: int, n1: int, store: dict, keep) -> np.ndarray:
        """Z^{n1} from X = Z^{n0}; store[n] = Z^n for the n in (n0, n1] with keep(n)."""
        X = X.copy()

        def put(n, rows, values):
            if n not in store:
                store[n] = np.empty_like(X)
            store[n][rows] = values

        for r0, r1 in self._subruns(plans, n0, n1):
            plan = plans[r0]
            zc = plan.zero_cols
            if zc.size:
                W = self._to_w(X[zc])
                for n in range(r0, r1):
                    W = plan.zero.solve(plan.zero.apply_B(W, False), False)
                    if keep(n + 1):
                        put(n + 1, zc, self._from_w(W))
                X[zc] = self._from_w(W)
            for c, f, tr in plan.block:
                self._x.setArray(X[c])
                for n in range(r0, r1):
                    self._block_step(f, tr)
                    if keep(n + 1):
                        put(n + 1, c, self._x.getArray(readonly=True))
                X[c] = self._x.getArray(readonly=True)
        return X

    def _adjoint_run(self, plans, r0: int, r1: int, R: np.ndarray, states,
                     buf: _ColumnBuffer) -> np.ndarray:
        """rhs_{r0} from R = rhs_{r1} over the steps of one run, adding the kappa terms.

        For n = r1-1, ..., r0:  lam_{n+1} = P_n^{-T} rhs_{n+1};  terms of step n;
        rhs_n = Q_n^T lam_{n+1}.  (rhs_N = [Re S_bar w; Im S_bar w].)
        """
        nloc = self.n_owned
        plan = plans[r0]
        dt = plan.dt
        out = np.empty_like(R)
        zc = plan.zero_cols
        if zc.size:
            W = self._to_w(R[zc])
            for n in range(r1 - 1, r0 - 1, -1):
                lam = plan.zero.solve(W, True)
                buf.add(-0.5 * dt * lam, self._to_w(states[n][zc] + states[n + 1][zc]))
                W = plan.zero.apply_B(lam, True)
            out[zc] = self._from_w(W)
        for c, f, tr in plan.block:
            # adjoint solves use P^T: the transposed flag flips
            self._y.setArray(R[c])
            for n in range(r1 - 1, r0 - 1, -1):
                if tr:
                    f.ksp.solve(self._y, self._x)
                else:
                    f.ksp.solveTranspose(self._y, self._x)
                _check(f.ksp)
                lam = self._x.getArray(readonly=True)
                zz = states[n][c] + states[n + 1][c]
                buf.add(-0.5 * dt * np.stack([lam[:nloc], lam[nloc:]], axis=1),
                        np.stack([zz[:nloc], zz[nloc:]], axis=1))
                # rhs_n = (2 M_blk - P_n)^T lam_{n+1}
                self.M_blk.multTranspose(self._x, self._y)
                self._y.scale(2.0)
                if tr:
                    f.P.mult(self._x, self._tmp)
                else:
                    f.P.multTranspose(self._x, self._tmp)
                self._y.axpy(-1.0, self._tmp)
            out[c] = self._y.getArray(readonly=True)
        return out

    def _run(self, sequence, S_bar, kappa):
        self._refresh(kappa)
        q = np.asarray(sequence.q_per_um_ms(), dtype=np.float64)
        dirs = np.asarray(sequence.directions, dtype=np.float64).reshape(q.size, 3)
        grid = segment_steps(sequence.segments, self.time_step_ms)
        nloc = self.n_owned

        # identical gradient vectors q g (e.g. all b = 0 rows) give identical signals: simulate once
        groups: dict[tuple[float, float, float], list[int]] = {}
        for c in range(q.size):
            v = q[c] * dirs[c] if q[c] != 0.0 else np.zeros(3)
            groups.setdefault(tuple(float(x) + 0.0 for x in v), []).append(c)
        keys = list(groups)

        want_grad = S_bar is not None
        if want_grad:
            if self._sensitivity is None:
                self._sensitivity = FaceSensitivity(self.ops, chunk=self._chunk)
            buf = _ColumnBuffer(self._sensitivity, nloc, self._chunk)
        s_local = np.zeros(q.size, dtype=np.complex128)
        for b0 in range(0, len(keys), self.batch_size):
            batch = keys[b0:b0 + self.batch_size]
            V = np.array(batch, dtype=np.float64)
            plans = self._plan(grid, V)
            N, K = len(plans), self.checkpoint_interval
            X = np.zeros((len(batch), 2 * nloc))
            X[:, :nloc] = 1.0 if self.ops.initial is None else self.ops.initial
            ckpt = {0: X}
            if want_grad:
                def keep(n):
                    return n % K == 0 or n == N
            else:
                def keep(n):
                    return False
            Z = self._advance(plans, X, 0, N, ckpt, keep)
            ckpt[N] = Z
            for j, key in enumerate(batch):
                s_local[groups[key]] = complex(self.w @ Z[j, :nloc], self.w @ Z[j, nloc:])
            if want_grad:
                sbar = np.array([np.sum(S_bar[groups[key]]) for key in batch])
                live = np.flatnonzero(sbar != 0.0)
                if live.size:
                    sub_plans = self._plan(grid, V[live]) if live.size < len(batch) else plans
                    sub_ckpt = {n: Zn[live] for n, Zn in ckpt.items()}
                    self._backward(sub_plans, sub_ckpt, sbar[live], buf)
            self._clear(block_only=True)
        S = self.comm.allreduce(s_local, op=MPI.SUM)
        if not want_grad:
            return S, None
        buf.flush()
        return S, self.ops.space.gather_face_vector(buf.acc)

    def _backward(self, plans, ckpt, sbar: np.ndarray, buf: _ColumnBuffer) -> None:
        N, K = len(plans), self.checkpoint_interval
        R = np.concatenate([np.outer(sbar.real, self.w), np.outer(sbar.imag, self.w)], axis=1)
        # with every state stored the whole time range is one window; else one per checkpoint
        window = K if K > 1 else N
        for k0 in range(((N - 1) // window) * window, -1, -window):
            k1 = min(k0 + window, N)
            if K > 1:
                states = {k0: ckpt[k0], k1: ckpt[k1]}
                self._advance(plans, ckpt[k0], k0, k1 - 1, states, lambda n: True)
            else:
                states = ckpt
            for r0, r1 in reversed(self._subruns(plans, k0, k1)):
                R = self._adjoint_run(plans, r0, r1, R, states, buf)


class _ColumnBuffer:
    """Collects column pairs (a_j, b_j) and contracts them `chunk` at a time:
    acc_f += sum_j a_j^T B_f b_j on this rank's owned faces (Q owned-dof order)."""

    def __init__(self, sens: FaceSensitivity, n_owned: int, chunk: int):
        self.sens = sens
        self.A = np.zeros((n_owned, chunk))
        self.B = np.zeros((n_owned, chunk))
        self.k = 0
        self.acc = np.zeros(sens.n_q_owned)

    def add(self, A: np.ndarray, B: np.ndarray) -> None:
        """Append the columns of A, B (n_owned, j)."""
        j0 = 0
        while j0 < A.shape[1]:
            take = min(A.shape[1] - j0, self.A.shape[1] - self.k)
            self.A[:, self.k:self.k + take] = A[:, j0:j0 + take]
            self.B[:, self.k:self.k + take] = B[:, j0:j0 + take]
            self.k += take
            j0 += take
            if self.k == self.A.shape[1]:
                self.flush()

    def flush(self) -> None:
        # column counts are identical on every rank (replicated time grid), so this is collective
        if self.k:
            self.acc += self.sens.owned(self.A[:, :self.k], self.B[:, :self.k])
            self.k = 0


def with_b0_row(seq):
    """`seq` with one extra measurement b = 0 (direction x) appended as the last row."""
    from spinverse_fem.config.protocol import Sequence

    return Sequence(seq.name, seq.segments, np.append(seq.b_s_per_mm2, 0.0),
                    np.vstack([seq.directions, [[1.0, 0.0, 0.0]]]))
