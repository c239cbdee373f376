"""Optimisers for the bounded problem min Phi(x), lower <= x <= upper (x = log10 kappa).

- `TaoSegment`: PETSc TAO (default blmvm; any type via `-spinverse_tao_type` etc.) over a
  distributed Vec of the active faces in canonical order. It runs a bounded number of
  iterations from a given x; the inversion restarts it at every checkpoint so that a resumed
  run follows the same path as an uninterrupted one (the quasi-Newton memory is not
  serialisable, so both restart it at the same iterations).
- `Adam`: the paper's optimiser on the unconstrained v with x = lower + (upper - lower) s(v),
  s the logistic function (the paper's log10 kappa[um/us] = -5 + 4 s(v)); warm-up then cosine
  decay per stage, global gradient-norm clipping; its state is checkpointed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dolfinx_solver  # noqa: F401
import numpy as np
from petsc4py import PETSc

TAO_PREFIX = "spinverse_"

TAO_REASONS = {v: k for k, v in vars(PETSc.TAO.ConvergedReason).items() if isinstance(v, int)}


class TaoSegment:
    """One TAO solve of at most `max_it` iterations; `fun(x) -> (Phi, grad)` on replicated
    arrays, `monitor(it, x, Phi, gnorm)` after every iteration (rank-consistent)."""

    def __init__(self, comm, n: int, lower: float, upper: float, tao_type: str = "blmvm",
                 gatol: float = 1e-7):
        self.comm = comm
        self.n = n
        self.x = PETSc.Vec().createMPI(n, comm=comm)
        self.lb = self.x.duplicate()
        self.ub = self.x.duplicate()
        self.lb.set(lower)
        self.ub.set(upper)
        self.g = self.x.duplicate()
        self.tao_type = tao_type
        self.gatol = gatol
        self._scatter, self._full = PETSc.Scatter.toAll(self.x)

    def _gather(self, vec: PETSc.Vec) -> np.ndarray:
        self._scatter.scatter(vec, self._full, addv=PETSc.InsertMode.INSERT,
                              mode=PETSc.ScatterMode.FORWARD)
        return self._full.getArray().copy()

    def run(self, x0: np.ndarray, fun, max_it: int, monitor=None) -> tuple[np.ndarray, str]:
        lo, hi = self.x.getOwnershipRange()
        self.x.setArray(x0[lo:hi])
        tao = PETSc.TAO().create(self.comm)
        tao.setOptionsPrefix(TAO_PREFIX)
        tao.setType(self.tao_type)

        def objgrad(tao_, xv, gv):
            x = self._gather(xv)
            val, grad = fun(x)
            gv.setArray(grad[lo:hi])
            return val

        tao.setObjectiveGradient(objgrad, self.g)
        tao.setVariableBounds(self.lb, self.ub)
        tao.setTolerances(gatol=self.gatol, grtol=0.0, gttol=0.0)
        tao.setMaximumIterations(max_it)
        if monitor is not None:
            def _mon(tao_):
                it, f, gnorm, *_ = tao_.getSolutionStatus()
                if it > 0:
                    monitor(it, self._gather(tao_.getSolution()), f, gnorm)
            tao.setMonitor(_mon)
        tao.setFromOptions()
        tao.solve(self.x)
        reason = TAO_REASONS.get(tao.getConvergedReason(), str(tao.getConvergedReason()))
        x = self._gather(self.x)
        tao.destroy()
        return x, reason


@dataclass
class AdamState:
    v: np.ndarray
    m: np.ndarray
    s: np.ndarray
    t: int = 0


class Adam:
    """Adam on v (x = lower + (upper - lower) logistic(v)) with the paper's schedule."""

    def __init__(self, lower: float, upper: float, lr: float = 0.6, warmup: int = 50,
                 final_factor: float = 0.1, clip: float = 1.0, betas=(0.9, 0.999),
                 eps: float = 1e-8):
        self.lower, self.upper = lower, upper
        self.lr, self.warmup, self.final_factor, self.clip = lr, warmup, final_factor, clip
        self.b1, self.b2 = betas
        self.eps = eps

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

    def step(self, state: AdamState, grad_x: np.ndarray, i: int, n: int) -> None:
        sig = 1.0 / (1.0 + np.exp(-state.v))
        g = grad_x * (self.upper - self.lower) * sig * (1.0 - sig)
        norm = float(np.linalg.norm(g))
        if self.clip and norm > self.clip:
            g = g * (self.clip / norm)
        state.t += 1
        state.m = self.b1 * state.m + (1 - self.b1) * g
        state.s = self.b2 * state.s + (1 - self.b2) * g * g
        mhat = state.m / (1 - self.b1**state.t)
        shat = state.s / (1 - self.b2**state.t)
        state.v = state.v - self.learning_rate(i, n) * mhat / (np.sqrt(shat) + self.eps)
