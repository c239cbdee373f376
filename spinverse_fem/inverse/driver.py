"""The staged multi-sequence inversion: curriculum, optimiser segments, history, checkpoints.

A run is a list of stages (`inverse.curriculum`). Each stage fits its sequences with a fixed mode
count, chosen at the stage's starting kappa (at a spectral gap), so that the objective stays
smooth within the stage. The optimiser runs in segments of `checkpoint_every` iterations; at
each segment start the continuity weights w_ij are re-evaluated (then held fixed) and the
manifold weight follows its linear ramp over the whole run. A checkpoint (written atomically by
rank 0; `inverse.checkpoint`) after every segment holds everything needed to continue
bit-for-bit the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from spinverse_fem.forward.mode_selection import RESELECT_GAP
from spinverse_fem.inverse.optimisers import ADAM, AdamSettings, AdamState, TaoSegment

HISTORY_KEYS = ("stage", "iteration", "misfit", "continuity", "manifold", "total",
                "manifold_weight", "modes", "mode_gap", "cd_l2", "bad_edge_pct",
                "interface_faces", "seconds")


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
    """The staged inversion of one Case.

    case: the assembled pipeline (phantom, forward model, targets, parameter map, priors,
    curriculum); log: callable(str) for progress lines (rank 0 prints); observer:
    callable(kappa) -> dict of interface metrics recorded in the history at every iteration
    (keys cd_l2, bad_edge_pct, interface_faces; e.g. `evaluation.scoring.score`), or None.
    """

    def __init__(self, case, log=print, observer=None):
        self.case = case
        self.comm, self.cfg = case.comm, case.cfg
        self.log = log
        self.observer = observer
        inv = self.cfg.inversion
        self.stages = case.stages
        self.total_iterations = sum(s.iterations for s in self.stages)
        self.params = case.params
        self.segment = inv.checkpoint_every if inv.checkpoint_every > 0 else 10

    # -- state ---------------------------------------------------------------------------
    def initial_state(self) -> RunState:
        return RunState(x=self.case.start_x())

    def kappa(self, x) -> np.ndarray:
        return self.params.to_kappa(x)

    def _stage_model(self, stage_index: int, num_modes: int, x: np.ndarray):
        # an optimiser needs far less than the Taylor tests: these change the gradient by
        # ~1e-9 relative (benchmarks/gradient.py)
        return self.case.stage_model(stage_index, num_modes, x, adjoint_rtol=1e-6,
                                     taylor_tol=2.0**-40)

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

    # -- the run -------------------------------------------------------------------------
    def run(self, state: RunState, checkpoint=None) -> RunState:
        """Continue `state` to the end; `checkpoint(state)` is called after every segment."""
        inv = self.cfg.inversion
        t_start = time.perf_counter() - state.elapsed
        segment = TaoSegment(self.comm, self.params.size, self.params.lower, self.params.upper,
                             tao_type=inv.optimizer,
                             adam=AdamSettings(inv.adam_lr, inv.adam_warmup,
                                               inv.adam_final_lr_factor, inv.clip_grad_norm))
        adam = segment.resolved_type()[0].lower() == ADAM
        while state.stage < len(self.stages):
            si = state.stage
            stage = self.stages[si]
            names = ", ".join(self.cfg.sequences[i].name for i in stage.sequences)
            if len(state.modes) <= si:
                state.modes.append(self.case.num_modes_at(self.kappa(state.x)))
                self.log(f"stage {si + 1}/{len(self.stages)} ({names} ms): {stage.iterations} "
                         f"iterations, {state.modes[si]} modes (fixed while the spectral cut stays open)")
                if adam and si > 0 and inv.adam_restart_per_stage:
                    # the moments of the previous stage's objective would damp this one's steps
                    state.adam = None
            model = self._stage_model(si, state.modes[si], state.x)
            while state.stage_iteration < stage.iterations:
                n = min(self.segment, stage.iterations - state.stage_iteration)
                self._check_cut(model, state, si)
                model.update_prior_weights(state.x, self.manifold_weight(state.global_iteration))
                converged = self._segment(segment, adam, model, state, n, si, stage, t_start)
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

    def _check_cut(self, model, state, si, x=None) -> None:
        """Re-select the stage's mode count when the last evaluation's spectral cut has (nearly)
        closed (`forward.mode_selection`): announced, recorded in the history and in
        state.modes, and deterministic (gap thresholds far above round-off)."""
        cut = model.misfit.last_cut
        if cut is None or not cut.rel_gap < RESELECT_GAP:
            return
        x = state.x if x is None else x
        k_new = self.case.num_modes_at(self.kappa(x))
        if k_new == cut.modes:
            return
        self.log(f"  stage {si + 1} it {state.global_iteration}: modes {cut.modes} and "
                 f"{cut.modes + 1} within {cut.rel_gap:.1e} (relative; lambda = "
                 f"{cut.lam_k:.6g} 1/ms): mode count re-selected {cut.modes} -> {k_new}")
        model.set_num_modes(k_new)
        state.modes[si] = k_new

    def _record(self, state, si, x, model, t_start):
        kappa = self.kappa(x)
        m = self.observer(kappa) if self.observer is not None else {}
        h = state.history
        terms = model.last_terms
        row = dict(stage=si, iteration=state.global_iteration, misfit=terms.get("misfit", np.nan),
                   continuity=terms.get("continuity", np.nan), manifold=terms.get("manifold", np.nan),
                   total=terms.get("total", np.nan), manifold_weight=model.weights.manifold,
                   modes=terms.get("modes", np.nan), mode_gap=terms.get("mode_gap", np.nan),
                   cd_l2=m.get("cd_l2", np.nan), bad_edge_pct=m.get("bad_edge_pct", np.nan),
                   interface_faces=m.get("interface_faces", np.nan),
                   seconds=time.perf_counter() - t_start)
        for k in HISTORY_KEYS:
            h[k].append(float(row[k]))
        cd = "" if np.isnan(row["cd_l2"]) else f" CD-L2 {row['cd_l2']:7.3f} um^2 BadEdge {row['bad_edge_pct']:5.1f}%"
        self.log(f"  stage {si + 1} it {state.global_iteration:4d}  misfit {row['misfit']:.4e}  "
                 f"continuity {row['continuity']:.3e}  manifold {row['manifold']:.3e}"
                 f"{cd}  faces {row['interface_faces']:4.0f}  {row['seconds']:7.1f} s")

    def _segment(self, segment, adam, model, state, n, si, stage, t_start):
        """Run at most n optimiser iterations; the stage's end reason if TAO stopped early."""

        def before_iteration(x):
            # Adam moves the prior weights every iteration (the paper's schedule)
            model.update_prior_weights(x, self.manifold_weight(state.global_iteration))

        def monitor(it, x, f, gnorm):
            if adam:
                # x is the point the step is taken from; its terms are current
                self._record(state, si, x, model, t_start)
                state.global_iteration += 1
                state.stage_iteration += 1
                # Adam takes the next step on the re-selected model; TAO's line search and
                # quasi-Newton memory need one objective per segment (checked at its start)
                self._check_cut(model, state, si, x)
            else:
                state.global_iteration += 1
                state.stage_iteration += 1
                # the monitor sees the accepted point; recompute terms there (cached solve)
                model.cost_and_gradient(x)
                self._record(state, si, x, model, t_start)

        before = state.stage_iteration
        x, reason, adam_state = segment.run(
            state.x, model.cost_and_gradient, n, monitor,
            before_iteration=before_iteration if adam else None,
            adam_state=state.adam, stage_iteration=state.stage_iteration,
            stage_length=stage.iterations)
        state.x = x
        if adam:
            state.adam = adam_state
        if state.stage_iteration - before < n:
            # TAO stopped early (converged or line search failure): the stage is over
            return reason
        return None
