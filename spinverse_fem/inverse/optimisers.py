"""Optimisers for the bounded problem min Phi(x), lower <= x <= upper (x = log10 kappa, kappa in
um/ms, so x is dimensionless; Phi is the dimensionless inversion objective).

Everything runs through PETSc TAO:

- `TaoSegment`: one TAO solve of a bounded number of iterations over a distributed Vec of the
  active faces in canonical order. The inversion restarts it at every checkpoint so that a
  resumed run follows the same path as an uninterrupted one (the quasi-Newton memory of e.g.
  blmvm is not serialisable, so both restart it at the same iterations).
- TAO type `adam`: the paper's Adam, a TAOPYTHON type (context `AdamTao`). It optimises the
  unconstrained v with x = lower + (upper - lower) s(v), s the logistic function (the paper's
  log10 kappa[um/us] = -5 + 4 s(v)), with warm-up then cosine decay per stage and global
  gradient-norm clipping. Its state (v, m, s, t) goes in and comes out of `TaoSegment.run`, so a
  checkpoint holds it exactly. The update arithmetic lives in `Adam` only.

Selecting the type: `TaoSegment(..., tao_type=...)` is the default and `-spinverse_tao_type`
overrides it, as for any PETSc object. "adam" is not a name PETSc knows (petsc4py cannot
register a Python TAO type under its own name), so `TaoSegment` resolves it itself: the TAO gets
type "python" with an `AdamTao` context. All other names go to PETSc; an unknown one raises
`InputError`. The Adam constants default to `AdamSettings` and can be overridden with
`-spinverse_tao_adam_{lr,warmup,final_factor,clip,beta1,beta2,eps}`;
`-spinverse_tao_max_it`, `-spinverse_tao_monitor`, `-spinverse_tao_view`,
`-spinverse_tao_converged_reason`, `-spinverse_tao_gatol` act on Adam as on any TAO type.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import dolfinx_solver  # noqa: F401  (loads the PETSc build petsc4py must use)
import numpy as np
from petsc4py import PETSc

from spinverse_fem.errors import InputError

TAO_PREFIX = "spinverse_"
ADAM = "adam"

TAO_REASONS = {v: k for k, v in vars(PETSc.TAO.ConvergedReason).items() if isinstance(v, int)}

_PETSC_ERR_UNKNOWN_TYPE = 86


# -- Adam: the update arithmetic ------------------------------------------------------------

@dataclass
class AdamState:
    """Adam's state, replicated on every rank: v (the unconstrained variable), m and s (first
    and second moment estimates of the v-gradient), t (number of steps taken)."""

    v: np.ndarray
    m: np.ndarray
    s: np.ndarray
    t: int = 0

    def copy(self) -> AdamState:
        return AdamState(v=self.v.copy(), m=self.m.copy(), s=self.s.copy(), t=int(self.t))


@dataclass(frozen=True)
class AdamSettings:
    """Adam's constants. lr: peak step in v (dimensionless); warmup: iterations of linear
    warm-up; final_factor: lr at the end of a stage / lr; clip: maximum 2-norm of the v-gradient
    (0 disables clipping); betas: moment decay rates; eps: added to sqrt(s_hat)."""

    lr: float = 0.6
    warmup: int = 50
    final_factor: float = 0.1
    clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class Adam:
    """Adam on v, x = lower + (upper - lower) s(v), s(v) = 1 / (1 + exp(-v)), with the paper's
    schedule. `lower`, `upper`: bounds of x (log10 of um/ms)."""

    def __init__(self, lower: float, upper: float, lr: float = 0.6, warmup: int = 50,
                 final_factor: float = 0.1, clip: float = 1.0, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        self.lower, self.upper = lower, upper
        self.lr, self.warmup, self.final_factor, self.clip = lr, warmup, final_factor, clip
        self.b1, self.b2 = betas
        self.eps = eps

    @classmethod
    def from_settings(cls, lower: float, upper: float, settings: AdamSettings) -> Adam:
        return cls(lower, upper, **dataclasses.asdict(settings))

    def x_of(self, v: np.ndarray) -> np.ndarray:
        return self.lower + (self.upper - self.lower) / (1.0 + np.exp(-v))

    def v_of(self, x: np.ndarray) -> np.ndarray:
        s = np.clip((x - self.lower) / (self.upper - self.lower), 1e-12, 1 - 1e-12)
        return np.log(s / (1.0 - s))

    def learning_rate(self, i: int, n: int) -> float:
        """Linear warm-up over `warmup` iterations, then cosine decay to final_factor * lr at
        iteration n (i counts from 0 within the stage)."""
        if i < self.warmup:
            return self.lr * (i + 1) / self.warmup
        span = max(n - self.warmup, 1)
        c = 0.5 * (1.0 + math.cos(math.pi * min(i - self.warmup, span) / span))
        return self.lr * (self.final_factor + (1.0 - self.final_factor) * c)

    def start(self, x0: np.ndarray) -> AdamState:
        v = self.v_of(x0)
        return AdamState(v=v, m=np.zeros_like(v), s=np.zeros_like(v))

    def v_gradient(self, v: np.ndarray, grad_x: np.ndarray) -> np.ndarray:
        """Chain rule: dPhi/dv = dPhi/dx (upper - lower) s(v) (1 - s(v))."""
        sig = 1.0 / (1.0 + np.exp(-v))
        return grad_x * (self.upper - self.lower) * sig * (1.0 - sig)

    def step(self, state: AdamState, grad_x: np.ndarray, i: int, n: int) -> None:
        """One step from the x-gradient at x_of(state.v); i, n as in `learning_rate`."""
        self.step_v(state, self.v_gradient(state.v, grad_x), i, n)

    def step_v(self, state: AdamState, g: np.ndarray, i: int, n: int) -> None:
        """One step from the v-gradient g: clip ||g||_2 to `clip`, update the bias-corrected
        moments, v -= lr(i, n) m_hat / (sqrt(s_hat) + eps)."""
        norm = float(np.linalg.norm(g))
        if self.clip and norm > self.clip:
            g = g * (self.clip / norm)
        state.t += 1
        state.m = self.b1 * state.m + (1 - self.b1) * g
        state.s = self.b2 * state.s + (1 - self.b2) * g * g
        mhat = state.m / (1 - self.b1**state.t)
        shat = state.s / (1 - self.b2**state.t)
        state.v = state.v - self.learning_rate(i, n) * mhat / (np.sqrt(shat) + self.eps)


# -- Adam as a TAO type ---------------------------------------------------------------------

class AdamTao:
    """TAOPYTHON context: `tao.setType("python"); tao.setPythonContext(AdamTao(settings))`.

    petsc4py calls `setFromOptions(tao)` from TaoSetFromOptions, `setUp(tao)` from TaoSetUp,
    `solve(tao)` from TaoSolve (after resetting the iteration count and the reason), `view(tao,
    viewer)` from TaoView and `destroy(tao)` when the context is replaced or the TAO destroyed.
    `solve` is the whole loop: petsc4py's default loop would apply TAO's line search to the step,
    which is not Adam.

    Iteration k (0-based within the solve, i = stage_iteration + k within the stage of
    stage_length iterations) on replicated arrays:

        x_k = x_of(v);  before_iteration(x_k);  Phi, dPhi/dx = TAO objective-gradient at x_k
        TaoMonitor(k, Phi, ||dPhi/dv||_2, 0, lr(i, n));  TaoConverged -> stop if not iterating
        Adam step (clip, moments, v update)

    so a monitor sees x_k before its step with the cost of x_k; the final iterate x(v) after
    max_it steps is not evaluated (the next segment's k = 0 is). Bounds: the uniform scalars of
    `setVariableBounds` (required); the logistic map keeps x strictly inside them.
    """

    def __init__(self, settings: AdamSettings | None = None):
        self.settings = settings if settings is not None else AdamSettings()
        self.adam: Adam | None = None
        self.state: AdamState | None = None
        self.stage_iteration = 0
        self.stage_length: int | None = None
        self.before_iteration = None
        self._scatter = self._full = None

    def prepare(self, state: AdamState | None, stage_iteration: int = 0,
                stage_length: int | None = None, before_iteration=None) -> None:
        """Per-solve input: state None starts from the TAO's initial solution."""
        self.state = None if state is None else state.copy()
        self.stage_iteration = int(stage_iteration)
        self.stage_length = stage_length
        self.before_iteration = before_iteration

    # -- the petsc4py protocol --
    def setFromOptions(self, tao) -> None:
        opts = PETSc.Options(tao.getOptionsPrefix())
        s = self.settings
        self.settings = AdamSettings(
            lr=opts.getReal("tao_adam_lr", s.lr),
            warmup=opts.getInt("tao_adam_warmup", s.warmup),
            final_factor=opts.getReal("tao_adam_final_factor", s.final_factor),
            clip=opts.getReal("tao_adam_clip", s.clip),
            betas=(opts.getReal("tao_adam_beta1", s.betas[0]),
                   opts.getReal("tao_adam_beta2", s.betas[1])),
            eps=opts.getReal("tao_adam_eps", s.eps))

    def setUp(self, tao) -> None:
        lb, ub = tao.getVariableBounds()
        if not lb.handle or not ub.handle:
            raise ValueError("TAO type adam needs variable bounds (TAOSetVariableBounds): "
                             "x = lower + (upper - lower) logistic(v)")
        self._scatter, self._full = PETSc.Scatter.toAll(tao.getSolution())
        # min/max are exact, so the bounds (and every iterate) do not depend on the rank count
        lower, upper = lb.min()[1], ub.max()[1]
        if lb.max()[1] != lower or ub.min()[1] != upper:
            # per-variable bounds (fitted compartment parameters after the faces): replicated
            lower, upper = self._gather(lb), self._gather(ub)
        if not np.all(np.asarray(lower) < np.asarray(upper)):
            raise ValueError("TAO type adam needs bounds lower < upper")
        self.adam = Adam.from_settings(lower, upper, self.settings)

    def destroy(self, tao) -> None:
        for obj in (self._scatter, self._full):
            if obj is not None:
                obj.destroy()
        self._scatter = self._full = None

    def view(self, tao, viewer) -> None:
        s = self.settings
        viewer.printfASCII(f"  Adam on x = lower + (upper - lower) logistic(v): lr {s.lr:g}, "
                           f"warm-up {s.warmup} it, final factor {s.final_factor:g}, clip "
                           f"{s.clip:g}, betas {s.betas[0]:g} {s.betas[1]:g}, eps {s.eps:g}\n")
        if self.state is not None:
            viewer.printfASCII(f"  Adam steps taken: {self.state.t}\n")

    def _gather(self, vec) -> np.ndarray:
        self._scatter.scatter(vec, self._full, addv=PETSc.InsertMode.INSERT,
                              mode=PETSc.ScatterMode.FORWARD)
        return self._full.getArray().copy()

    def solve(self, tao) -> None:
        adam = self.adam
        X = tao.getSolution()
        G = tao.getGradient()[0]
        lo, hi = X.getOwnershipRange()
        max_it = tao.getMaximumIterations()
        state = self.state if self.state is not None else adam.start(self._gather(X))
        self.state = state
        n = self.stage_length if self.stage_length is not None else self.stage_iteration + max_it
        continuing = PETSc.TAO.ConvergedReason.CONTINUE_ITERATING
        for k in range(max_it):
            # x is replicated; the Vec round trip (set local part, gather) copies it exactly
            x = adam.x_of(state.v)
            X.setArray(x[lo:hi])
            if self.before_iteration is not None:
                self.before_iteration(x)
            f = tao.computeObjectiveGradient(X, G)
            g = adam.v_gradient(state.v, self._gather(G))
            i = self.stage_iteration + k
            tao.setIterationNumber(k)
            # TAO's residual slot gets ||dPhi/dv||_2 (Adam's stationarity measure, computed on
            # the replicated array so it is rank-count independent), its step slot lr(i, n)
            tao.monitor(k, f, float(np.linalg.norm(g)), 0.0, adam.learning_rate(i, n))
            if tao.checkConverged() != continuing:
                return
            adam.step_v(state, g, i, n)
        X.setArray(adam.x_of(state.v)[lo:hi])
        tao.setIterationNumber(max_it)
        tao.setConvergedReason(PETSc.TAO.ConvergedReason.DIVERGED_MAXITS)


# -- one TAO solve --------------------------------------------------------------------------

def _original(exc: BaseException) -> BaseException:
    """petsc4py wraps an exception raised in a Python callback into PETSc.Error(101) with the
    original as __cause__ (nested once per callback level); return that original."""
    while isinstance(exc, PETSc.Error) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


class TaoSegment:
    """One TAO solve of at most `max_it` iterations over x in [lower, upper]^n (`n` variables,
    distributed over `comm`), options prefix `spinverse_`.

    tao_type: "adam" (`AdamTao`) or any PETSc TAO type ("blmvm", "bncg", "bqnls", ...);
    `-spinverse_tao_type` overrides it. gatol: absolute tolerance on the gradient norm (TAO's
    residual): None means 1e-7 for a TAO type and 0 for Adam, which runs its schedule to the
    end. adam: Adam's constants (None: `AdamSettings()`), used only when the type is adam.
    """

    def __init__(self, comm, n: int, lower: float, upper: float, tao_type: str = "blmvm",
                 gatol: float | None = None, adam: AdamSettings | None = None):
        self.comm = comm
        self.n = n
        self.x = PETSc.Vec().createMPI(n, comm=comm)
        self.lb = self.x.duplicate()
        self.ub = self.x.duplicate()
        r0, r1 = self.x.getOwnershipRange()
        for vec, b in ((self.lb, lower), (self.ub, upper)):
            if np.ndim(b) == 0:
                vec.set(float(b))
            else:
                vec.setArray(np.asarray(b, dtype=float)[r0:r1])
        self.g = self.x.duplicate()
        self.tao_type = tao_type
        self.gatol = gatol
        self.adam = adam
        self._scatter, self._full = PETSc.Scatter.toAll(self.x)

    def _gather(self, vec: PETSc.Vec) -> np.ndarray:
        self._scatter.scatter(vec, self._full, addv=PETSc.InsertMode.INSERT,
                              mode=PETSc.ScatterMode.FORWARD)
        return self._full.getArray().copy()

    def resolved_type(self) -> tuple[str, bool]:
        """(type, from_options): `-spinverse_tao_type` if given, else the constructor's."""
        name = PETSc.Options(TAO_PREFIX).getString("tao_type", "")
        return (name, True) if name else (self.tao_type, False)

    def _set_type(self, tao) -> None:
        name, from_options = self.resolved_type()
        if name.lower() == ADAM:
            tao.setType(PETSc.TAO.Type.PYTHON)
            tao.setPythonContext(AdamTao(self.adam))
            return
        try:
            tao.setType(name)
        except PETSc.Error as e:
            if e.ierr != _PETSC_ERR_UNKNOWN_TYPE:
                raise
            field = f"-{TAO_PREFIX}tao_type" if from_options else "tao_type"
            raise InputError("optimizer", field, f"unknown optimiser {name!r}: neither 'adam' "
                             "nor a PETSc TAO type (e.g. blmvm, bncg, bqnls, lmvm)") from None

    def _set_from_options(self, tao) -> None:
        opts = PETSc.Options(TAO_PREFIX)
        alias = opts.getString("tao_type", "")
        if alias.lower() != ADAM:
            tao.setFromOptions()
            return
        # TaoSetFromOptions would look "adam" up in PETSc's registry and fail; show it the
        # type the TAO already has for the duration of the call
        opts.setValue("tao_type", PETSc.TAO.Type.PYTHON)
        try:
            tao.setFromOptions()
        finally:
            opts.setValue("tao_type", alias)

    def run(self, x0: np.ndarray, fun, max_it: int, monitor=None, before_iteration=None,
            adam_state: AdamState | None = None, stage_iteration: int = 0,
            stage_length: int | None = None) -> tuple[np.ndarray, str, AdamState | None]:
        """Run at most `max_it` iterations (`-spinverse_tao_max_it` overrides) from x0.

        fun(x) -> (Phi, dPhi/dx) on replicated arrays (the same on every rank).
        monitor(it, x, Phi, gnorm): TAO's monitor at iterate x_it (rank-consistent). For a TAO
        type it = 1..k, x the accepted iterate after iteration it (it = 0, the start point, is
        skipped: the previous segment reported it); Phi may come from a line-search trial, so
        recompute the cost terms at x if needed. For adam it = 0..k-1, x the point iteration
        it evaluated before stepping, and the last fun call was at x (its cost terms are
        current); gnorm is ||dPhi/dv||_2.
        before_iteration(x): adam only, called before each cost evaluation (for a TAO type,
        whose line searches evaluate several points per iteration, it is not called).
        adam_state: Adam's state to continue from (None: start at x0; otherwise x0 is ignored
        and x = x(v)); stage_iteration, stage_length: position in the stage for the schedule
        (None: the stage ends with this segment).

        Returns (x, reason, adam_state): the final iterate, TAO's converged reason name, Adam's
        state after the last step (a new object; None for a TAO type).
        """
        lo, hi = self.x.getOwnershipRange()
        self.x.setArray(x0[lo:hi])
        tao = PETSc.TAO().create(self.comm)
        try:
            tao.setOptionsPrefix(TAO_PREFIX)
            self._set_type(tao)
            adam = self.resolved_type()[0].lower() == ADAM

            def objgrad(tao_, xv, gv):
                val, grad = fun(self._gather(xv))
                gv.setArray(grad[lo:hi])
                return val

            tao.setObjectiveGradient(objgrad, self.g)
            tao.setVariableBounds(self.lb, self.ub)
            gatol = self.gatol if self.gatol is not None else (0.0 if adam else 1e-7)
            tao.setTolerances(gatol=gatol, grtol=0.0, gttol=0.0)
            tao.setMaximumIterations(max_it)
            ctx = None
            if monitor is not None:
                def _mon(tao_):
                    it, f, gnorm, *_ = tao_.getSolutionStatus()
                    if isinstance(ctx, AdamTao) or it > 0:
                        monitor(it, self._gather(tao_.getSolution()), f, gnorm)
                tao.setMonitor(_mon)
            self._set_from_options(tao)
            # after the options: an AdamTao chosen by -spinverse_tao_python_type gets them too
            if tao.getType() == PETSc.TAO.Type.PYTHON:
                ctx = tao.getPythonContext()
            if isinstance(ctx, AdamTao):
                ctx.prepare(adam_state, stage_iteration, stage_length, before_iteration)
            try:
                tao.solve(self.x)
            except PETSc.Error as e:
                # a callback's own error (SolverError, InputError, ...) is the useful one
                orig = _original(e)
                if orig is e:
                    raise
                raise orig from None
            reason = TAO_REASONS.get(tao.getConvergedReason(), str(tao.getConvergedReason()))
            x = self._gather(self.x)
            state = ctx.state if isinstance(ctx, AdamTao) else None
        finally:
            tao.destroy()
        return x, reason, state
