"""The staged multi-sequence inversion: curriculum, optimiser segments, history, checkpoints.

A run is a list of stages (stages(Config)). Each stage fits its sequences with a fixed mode
count, chosen at the stage's starting kappa (at a spectral gap), so that the objective stays
smooth within the stage. The optimiser runs in segments of `checkpoint_every` iterations; at
each segment start the continuity weights w_ij are re-evaluated (then held fixed) and the
manifold weight follows its linear ramp over the whole run. A checkpoint (written atomically by
rank 0) after every segment holds everything needed to continue bit-for-bit the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spinverse_fem.evaluation.compartments import compare_compartments
from spinverse_fem.config import Config
from spinverse_fem.inverse.curriculum import stages
from spinverse_fem.errors import InputError
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.evaluation.interface import extract_interface
from spinverse_fem.inverse.model import FaceParameters, InverseProblem, PriorWeights
from spinverse_fem.evaluation.metrics import evaluate
from spinverse_fem.inverse.misfit import SignalMisfit
from spinverse_fem.inverse.optimisers import Adam, AdamState, TaoSegment
from spinverse_fem.inverse.priors import GeometricPriors
from spinverse_fem.geometry.phantom import Phantom
from spinverse_fem.io.signals import atomic_h5

HISTORY_KEYS = ("stage", "iteration", "misfit", "continuity", "manifold", "total",
                "manifold_weight", "cd_l2", "bad_edge_pct", "interface_faces", "seconds")


@dataclass
class RunState:
    """Everything a checkpoint holds."""

    x: np.ndarray
    stage: int = 0
    stage_iteration: int = 0
    global_iteration: int = 0
    modes: list = field(default_factory=list)          # fixed mode count of each started stage
    stage_kappa: list = field(default_factory=list)    # kappa at the end of each finished stage
    history: dict = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    adam: AdamState | None = None
    elapsed: float = 0.0
    done: bool = False


class Inversion:
    """comm; cfg; problem (grid, faces, ground truth); model: ForwardModel on that grid;
    targets / s0_reference: per config sequence; truth: (F,) membrane mask or None;
    log: callable(str) for progress lines (rank 0 prints)."""

    def __init__(self, comm, cfg: Config, problem: Phantom, model: ForwardModel, targets,
                 s0_reference, truth=None, log=print):
        self.comm, self.cfg, self.problem, self.model = comm, cfg, problem, model
        self.targets, self.s0_reference, self.truth = targets, s0_reference, truth
        self.log = log
        inv = cfg.inversion
        self.stages = stages(cfg)
        self.total_iterations = sum(s.iterations for s in self.stages)
        active = problem.active
        fixed = np.full(problem.faces.num_faces, float(inv.kappa_max_um_per_ms))
        self.params = FaceParameters(active=active, lower=np.log10(inv.kappa_min_um_per_ms),
                                     upper=np.log10(inv.kappa_max_um_per_ms), fixed_kappa=fixed)
        self.priors = GeometricPriors(problem.faces.faces, active=active,
                                      threshold_um_per_ms=inv.threshold_um_per_ms)
        self.segment = inv.checkpoint_every if inv.checkpoint_every > 0 else 10

    # -- state ---------------------------------------------------------------------------
    def initial_state(self) -> RunState:
        x0 = np.full(self.params.size, np.log10(self.cfg.inversion.start_um_per_ms))
        return RunState(x=x0)

    def kappa(self, x) -> np.ndarray:
        return self.params.kappa(x)

    def _misfit(self, stage_index: int, num_modes: int) -> SignalMisfit:
        st = self.stages[stage_index]
        seqs = [self.cfg.sequences[i] for i in st.sequences]
        tg = [self.targets[i] for i in st.sequences]
        s0 = None if self.s0_reference is None else [self.s0_reference[i] for i in st.sequences]
        norm = self.cfg.inversion.normalisation
        return SignalMisfit(self.model, seqs, tg, weight=self.cfg.inversion.misfit_weight,
                            normalisation=norm, s0_reference=s0, num_modes=num_modes,
                            # an optimiser needs far less than the Taylor tests: these change
                            # the gradient by ~1e-9 relative (benchmarks/gradient.py)
                            adjoint_rtol=1e-6, taylor_tol=2.0**-40)

    def manifold_weight(self, global_iteration: int) -> float:
        final = self.stages[min(self._stage_for(global_iteration), len(self.stages) - 1)].manifold_weight
        return final * min(global_iteration / max(self.total_iterations, 1), 1.0)

    def _stage_for(self, global_iteration: int) -> int:
        acc = 0
        for i, s in enumerate(self.stages):
            acc += s.iterations
            if global_iteration < acc:
                return i
        return len(self.stages) - 1

    def interface_metrics(self, kappa) -> dict:
        if self.truth is None:
            return {}
        pred = extract_interface(kappa, self.cfg.inversion.threshold_um_per_ms, self.problem.active)
        out = evaluate(self.problem.grid.points, self.problem.faces.faces, pred, self.truth)
        out.update(compare_compartments(self.problem.faces, pred, self.truth,
                                        outer_drains=self.problem.outer == "robin"))
        return out

    # -- the run -------------------------------------------------------------------------
    def run(self, state: RunState, checkpoint=None) -> RunState:
        """Continue `state` to the end; `checkpoint(state)` is called after every segment."""
        inv = self.cfg.inversion
        t_start = time.perf_counter() - state.elapsed
        adam = None
        if inv.optimizer == "adam":
            adam = Adam(self.params.lower, self.params.upper, lr=inv.adam_lr,
                        warmup=inv.adam_warmup, final_factor=inv.adam_final_lr_factor,
                        clip=inv.clip_grad_norm)
        while state.stage < len(self.stages):
            si = state.stage
            stage = self.stages[si]
            names = ", ".join(self.cfg.sequences[i].name for i in stage.sequences)
            if len(state.modes) <= si:
                basis = self.model.eigenbasis(self.kappa(state.x))
                state.modes.append(int(basis.num_modes))
                self.log(f"stage {si + 1}/{len(self.stages)} ({names} ms): {stage.iterations} "
                         f"iterations, {state.modes[si]} modes (fixed for the stage)")
                if adam is not None and si > 0 and inv.adam_restart_per_stage:
                    # the moments of the previous stage's objective would damp this one's steps
                    state.adam = None
            misfit = self._misfit(si, state.modes[si])
            problem = InverseProblem(self.params, misfit, self.priors,
                                     PriorWeights(stage.continuity_weight, 0.0))
            if adam is not None and state.adam is None:
                state.adam = adam.start(state.x)
            while state.stage_iteration < stage.iterations:
                n = min(self.segment, stage.iterations - state.stage_iteration)
                problem.weights.manifold = self.manifold_weight(state.global_iteration)
                problem.refresh_continuity_weights(state.x)
                if adam is None:
                    converged = self._tao_segment(problem, state, n, si, t_start)
                else:
                    converged = self._adam_segment(problem, adam, state, n, si, stage, t_start)
                state.elapsed = time.perf_counter() - t_start
                if converged:
                    self.log(f"  stage {si + 1}: optimiser converged ({converged})")
                    state.global_iteration += stage.iterations - state.stage_iteration
                    state.stage_iteration = stage.iterations
                if checkpoint is not None:
                    checkpoint(state)
            state.stage_kappa.append(self.kappa(state.x))
            state.stage += 1
            state.stage_iteration = 0
            if checkpoint is not None:
                checkpoint(state)
        state.done = True
        return state

    def _record(self, state, si, x, problem, t_start):
        kappa = self.kappa(x)
        m = self.interface_metrics(kappa)
        h = state.history
        terms = problem.last_terms
        row = dict(stage=si, iteration=state.global_iteration, misfit=terms.get("misfit", np.nan),
                   continuity=terms.get("continuity", np.nan), manifold=terms.get("manifold", np.nan),
                   total=terms.get("total", np.nan), manifold_weight=problem.weights.manifold,
                   cd_l2=m.get("cd_l2", np.nan), bad_edge_pct=m.get("bad_edge_pct", np.nan),
                   interface_faces=int(np.sum(extract_interface(
                       kappa, self.cfg.inversion.threshold_um_per_ms, self.problem.active))),
                   seconds=time.perf_counter() - t_start)
        for k in HISTORY_KEYS:
            h[k].append(float(row[k]))
        cd = "" if np.isnan(row["cd_l2"]) else f" CD-L2 {row['cd_l2']:7.3f} um^2 BadEdge {row['bad_edge_pct']:5.1f}%"
        self.log(f"  stage {si + 1} it {state.global_iteration:4d}  misfit {row['misfit']:.4e}  "
                 f"continuity {row['continuity']:.3e}  manifold {row['manifold']:.3e}"
                 f"{cd}  faces {row['interface_faces']:4d}  {row['seconds']:7.1f} s")

    def _tao_segment(self, problem, state, n, si, t_start):
        last = {}

        def fun(x):
            return problem.cost_and_gradient(x)

        def monitor(it, x, f, gnorm):
            state.global_iteration += 1
            state.stage_iteration += 1
            # the monitor sees the accepted point; recompute terms there (cached eigen-solve)
            problem.cost_and_gradient(x)
            self._record(state, si, x, problem, t_start)
            last["x"] = x

        seg = TaoSegment(self.comm, self.params.size, self.params.lower, self.params.upper,
                         tao_type=self.cfg.inversion.optimizer)
        before = state.stage_iteration
        x, reason = seg.run(state.x, fun, n, monitor)
        state.x = x
        done = state.stage_iteration - before
        if done < n:
            # TAO stopped early (converged or line search failure): the stage is over
            return reason
        return None

    def _adam_segment(self, problem, adam, state, n, si, stage, t_start):
        for _ in range(n):
            x = adam.x_of(state.adam.v)
            problem.weights.manifold = self.manifold_weight(state.global_iteration)
            problem.refresh_continuity_weights(x)
            _, grad = problem.cost_and_gradient(x)
            self._record(state, si, x, problem, t_start)
            adam.step(state.adam, grad, state.stage_iteration, stage.iterations)
            state.global_iteration += 1
            state.stage_iteration += 1
            state.x = adam.x_of(state.adam.v)
        return None


# -- checkpoints ---------------------------------------------------------------------------

def write_checkpoint(path: Path, state: RunState, fingerprint: str) -> None:
    """Atomic (temp file + rename): a killed run never leaves a half-written checkpoint."""
    with atomic_h5(path) as f:
        f["x"] = state.x
        f.attrs["stage"] = state.stage
        f.attrs["stage_iteration"] = state.stage_iteration
        f.attrs["global_iteration"] = state.global_iteration
        f.attrs["elapsed"] = state.elapsed
        f.attrs["done"] = state.done
        f.attrs["fingerprint"] = fingerprint
        f["modes"] = np.asarray(state.modes, dtype=np.int64)
        for i, k in enumerate(state.stage_kappa):
            f[f"stage_kappa/{i}"] = k
        for k, v in state.history.items():
            f[f"history/{k}"] = np.asarray(v, dtype=float)
        if state.adam is not None:
            for k in ("v", "m", "s"):
                f[f"adam/{k}"] = getattr(state.adam, k)
            f.attrs["adam_t"] = state.adam.t


def read_checkpoint(path: Path, fingerprint: str) -> RunState:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(str(path), None, f"cannot read checkpoint ({e})") from None
    with f:
        if f.attrs.get("fingerprint") != fingerprint:
            raise InputError(str(path), "fingerprint", "checkpoint belongs to a different "
                             "configuration or target; remove it or use another --out")
        st = RunState(x=np.asarray(f["x"]))
        st.stage = int(f.attrs["stage"])
        st.stage_iteration = int(f.attrs["stage_iteration"])
        st.global_iteration = int(f.attrs["global_iteration"])
        st.elapsed = float(f.attrs["elapsed"])
        st.done = bool(f.attrs["done"])
        st.modes = [int(m) for m in np.asarray(f["modes"])]
        if "stage_kappa" in f:
            st.stage_kappa = [np.asarray(f[f"stage_kappa/{i}"]) for i in
                              sorted(f["stage_kappa"].keys(), key=int)]
        st.history = {k: list(np.asarray(f[f"history/{k}"])) for k in HISTORY_KEYS}
        if "adam" in f:
            st.adam = AdamState(v=np.asarray(f["adam/v"]), m=np.asarray(f["adam/m"]),
                                s=np.asarray(f["adam/s"]), t=int(f.attrs["adam_t"]))
    return st


def fingerprint_of(cfg_text: str, targets) -> str:
    import hashlib

    h = hashlib.sha256(cfg_text.encode())
    for t in targets:
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()[:16]


def history_json(history: dict) -> str:
    return json.dumps({k: list(map(float, v)) for k, v in history.items()})
