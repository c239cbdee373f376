"""The staged multi-sequence inversion: curriculum, optimiser segments, history, checkpoints.

A run is a list of stages (`inverse.curriculum`). Each stage fits its sequences with a fixed mode
count, chosen at the stage's starting kappa (at a spectral gap), so that the objective stays
smooth within the stage. The optimiser runs in segments of `checkpoint_every` iterations; at
each segment start the continuity weights w_ij are re-evaluated (then held fixed) and the
manifold weight follows its linear ramp over the whole run. A checkpoint (written atomically by
rank 0; `inverse.checkpoint`) after every segment holds everything needed to continue
bit-for-bit the same way.

Stopping on request (`run(stop=...)`, e.g. SIGINT/SIGTERM): every rank asks `stop()` at every
iteration boundary and at every segment start, and the ranks agree through an allreduce, so all
of them stop at the same iteration. Adam stops before taking the step of the iteration it has
just evaluated: the state returned (x, Adam's moments, counters, history) continues bit-for-bit
like the uninterrupted run. A TAO type's quasi-Newton memory cannot be saved mid-segment: its
state is returned as it was at the segment's start (what the last checkpoint holds, or the start
state). `stopped` says where and why.

The last history row (`finish`): Adam records every iteration at the point it steps from, so
the final iterate (after the last step) has no row of its own; `finish` evaluates it once with
the last stage's model and appends its row, so that the final kappa, the last history row and
the reported final misfit describe the same iterate. The row is not part of any checkpoint, so
a finished run can be resumed or extended (`extend_last_stage`) without a stale row.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from spinverse_fem.forward.mode_selection import RESELECT_GAP
from spinverse_fem.inverse.optimisers import ADAM, AdamSettings, AdamState, TaoSegment
from spinverse_fem.parallel import say

HISTORY_KEYS = ("stage", "iteration", "misfit", "continuity", "manifold", "total",
                "manifold_weight", "modes", "mode_gap", "cd_l2", "bad_edge_pct",
                "interface_faces", "seconds")

# the stages' misfit settings: an optimiser needs far less than the Taylor tests; these change
# the gradient by ~1e-9 relative (benchmarks/gradient.py)
MODEL_OPTIONS = dict(adjoint_rtol=1e-6, taylor_tol=2.0**-40)


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
    basis_x: np.ndarray | None = None    # basis "frozen": where the current stage's basis was
    basis_iteration: int = -1            # computed, and at which stage iteration
    elapsed: float = 0.0
    done: bool = False


@dataclass(frozen=True)
class Stopped:
    """Where a run stopped on request: `signal` (what `stop()` returned, agreed over the ranks),
    `stage` (0-based) and `iteration` (global iterations completed) where it stopped;
    `resume_iteration`: the global iteration the returned state continues from (= iteration,
    except for a TAO type stopped inside a segment: the segment's start)."""

    signal: int
    stage: int
    iteration: int
    resume_iteration: int


class _Segment(TaoSegment):
    """A TaoSegment whose running TAO can be told to stop at the current iteration (from the
    monitor): TAO ends its solve with CONVERGED_USER; Adam (`AdamTao.solve`) returns before the
    step of the iteration whose monitor asked, so the Adam state returned is the one that
    produced the iterate returned."""

    _tao = None

    def _set_type(self, tao) -> None:
        self._tao = tao  # the TAO of the solve under way (TaoSegment.run creates one per call)
        super()._set_type(tao)

    def stop(self) -> None:
        tao = self._tao
        tao.setConvergedReason(tao.ConvergedReason.CONVERGED_USER)


class Inversion:
    """The staged inversion of one Case.

    case: the assembled pipeline (phantom, forward model, targets, parameter map, priors,
    curriculum); log: callable(str) for progress lines (default: print on rank 0); observer:
    callable(kappa) -> dict of interface metrics recorded in the history at every iteration
    (keys cd_l2, bad_edge_pct, interface_faces; e.g. `evaluation.scoring.score`), or None.
    """

    def __init__(self, case, log=None, observer=None):
        self.case = case
        self.comm, self.cfg = case.comm, case.cfg
        self.log = log if log is not None else (lambda s: say(self.comm, s))
        self.observer = observer
        inv = self.cfg.inversion
        self.stages = case.stages
        # the schedules (Adam's learning rate, the manifold weight's ramp) span the configured
        # iterations; an extension runs past their ends
        self.total_iterations = sum(s.iterations for s in self.stages)
        self.params = case.params
        self.segment = inv.checkpoint_every if inv.checkpoint_every > 0 else 10
        self.last_stage_end = self.stages[-1].iterations
        self.stopped: Stopped | None = None
        self._stop = None
        self._signal = 0
        self._model = None   # (stage index, the model) of the last stage run in this process
        self._last_row_x = None
        self._clock = None   # (time, evaluations) at the start of this process's run
        self.refreshes = 0   # basis "frozen": refreshes in this process

    @property
    def planned_iterations(self) -> int:
        """Global iterations the run will have done at its end (with an extension)."""
        return self.total_iterations - self.stages[-1].iterations + self.last_stage_end

    def extend_last_stage(self, end: int) -> None:
        """Let the last stage run until its iteration `end` (>= its configured length) instead
        of its configured length. The extra iterations continue past the ends of the schedules:
        Adam's learning rate and the manifold weight stay at their final values (the learning
        rate keeps warming up if the stage was shorter than the warm-up), Adam's moments carry
        on; a TAO type starts a new segment."""
        self.last_stage_end = max(int(end), self.stages[-1].iterations)

    def stage_end(self, stage_index: int) -> int:
        """The iteration (within the stage) at which stage `stage_index` ends."""
        if stage_index == len(self.stages) - 1:
            return self.last_stage_end
        return self.stages[stage_index].iterations

    # -- state ---------------------------------------------------------------------------
    def initial_state(self) -> RunState:
        return RunState(x=self.case.start_x())

    def kappa(self, x) -> np.ndarray:
        return self.params.to_kappa(x)

    def _stage_model(self, stage_index: int, num_modes: int, x: np.ndarray):
        return self.case.stage_model(stage_index, num_modes, x, **MODEL_OPTIONS)

    def manifold_weight(self, global_iteration: int) -> float:
        stage = self.stages[min(self._stage_for(global_iteration), len(self.stages) - 1)]
        final = stage.manifold_weight
        return final * min(global_iteration / max(self.total_iterations, 1), 1.0)

    def _stage_for(self, global_iteration: int) -> int:
        acc = 0
        for i, s in enumerate(self.stages):
            acc += s.iterations
            if global_iteration < acc:
                return i
        return len(self.stages) - 1

    # -- the run -------------------------------------------------------------------------
    def run(self, state: RunState, checkpoint=None, stop=None) -> RunState:
        """Continue `state` to the end; `checkpoint(state)` is called after every segment.

        stop: None or a callable() -> int called by every rank at every iteration boundary and
        segment start (a nonzero value, e.g. a signal number, asks to stop; the ranks agree
        on the largest). On a stop the state returned can be checkpointed and continued (see
        the module docstring), `state.done` is False and `self.stopped` says where; otherwise
        `self.stopped` is None and `state.done` True. The final iterate's history row is
        appended by `finish`, not here.
        """
        inv = self.cfg.inversion
        self._stop, self._signal, self.stopped = stop, 0, None
        t_start = time.perf_counter() - state.elapsed
        self._clock = (time.perf_counter(), 0)
        segment = _Segment(self.comm, self.params.size, *self.params.bounds(),
                           tao_type=inv.optimizer,
                           adam=AdamSettings(inv.adam_lr, inv.adam_warmup,
                                             inv.adam_final_lr_factor, inv.clip_grad_norm,
                                             eps=inv.adam_eps))
        adam = segment.resolved_type()[0].lower() == ADAM
        while state.stage < len(self.stages):
            si = state.stage
            stage = self.stages[si]
            end = self.stage_end(si)
            names = ", ".join(self.cfg.sequences[i].name for i in stage.sequences)
            if len(state.modes) <= si:
                state.modes.append(self.case.num_modes_at(self.kappa(state.x)))
                self.log(f"stage {si + 1}/{len(self.stages)} ({names} ms): {stage.iterations} "
                         f"iterations, {state.modes[si]} modes (fixed while the spectral cut "
                         "stays open)")
                if adam and si > 0 and inv.adam_restart_per_stage:
                    # the moments of the previous stage's objective would damp this one's steps
                    state.adam = None
            model = self._stage_model(si, state.modes[si], state.x)
            self._model = (si, model)
            if self.frozen and state.basis_x is not None:
                # resumed inside a refresh interval: the basis the interrupted run was using
                self._refresh_basis(model, state, si, state.basis_x, state.basis_iteration)
            while state.stage_iteration < end:
                # segments end at multiples of the checkpoint interval: a resumed run cuts
                # them where the uninterrupted one did
                n = min(self.segment - state.stage_iteration % self.segment,
                        end - state.stage_iteration)
                if self.frozen:
                    self._maybe_refresh(model, state, si, state.x)
                    if not adam:
                        # TAO needs one objective per segment: it ends at the next refresh
                        n = min(n, state.basis_iteration + inv.basis_refresh_every
                                - state.stage_iteration)
                if self._stop_requested():
                    return self._stopped(state, state)
                # a TAO type's segment cannot be continued from inside: keep its start
                start = None if adam else copy.deepcopy(state)
                before = state.stage_iteration
                if not self.frozen:
                    self._check_cut(model, state, si)
                model.update_prior_weights(state.x, self.manifold_weight(state.global_iteration))
                converged = self._segment(segment, adam, model, state, n, si, stage, t_start)
                state.elapsed = time.perf_counter() - t_start
                if self._signal:
                    whole = state.stage_iteration - before == n  # stopped at the segment's end
                    return self._stopped(state, state if adam or whole else start)
                if converged:
                    self.log(f"  stage {si + 1}: optimiser converged ({converged})")
                    state.global_iteration += end - state.stage_iteration
                    state.stage_iteration = end
                if checkpoint is not None:
                    checkpoint(state)
            state.stage_kappa.append(self.kappa(state.x))
            state.stage += 1
            state.stage_iteration = 0
            state.basis_x, state.basis_iteration = None, -1
            if checkpoint is not None:
                checkpoint(state)
        state.done = True
        return state

    def finish(self, state: RunState) -> None:
        """Append the final iterate's history row (collective): the final kappa evaluated once
        with the last stage's model (its mode count, its continuity weights re-evaluated there,
        the manifold weight at the end of its ramp), unless the last row already describes it
        (a TAO type records the accepted iterate after every iteration). Call once, after
        `run` returned a finished state."""
        h = state.history
        if h["iteration"] and h["iteration"][-1] == state.global_iteration and (
                self._last_row_x is None or np.array_equal(self._last_row_x, state.x)):
            return
        si = len(self.stages) - 1
        if self._model is not None and self._model[0] == si:
            model = self._model[1]
        else:
            model = self._stage_model(si, state.modes[si], state.x)
        model.update_prior_weights(state.x, self.manifold_weight(state.global_iteration))
        model.cost_and_gradient(state.x)
        t_start = time.perf_counter() - state.elapsed
        self._record(state, si, state.x, model, t_start, label="final")

    def predicted_signals(self, state: RunState) -> list[np.ndarray]:
        """S/S0 (complex, per configured sequence) at the final kappa: the reduced model with
        the last stage's mode count and the stages' model settings, normalised as the misfit
        is (inversion.normalisation). Collective."""
        misfit = self.case.misfit(None, num_modes=state.modes[-1], **MODEL_OPTIONS)
        t = self.params.tissue
        if t is not None:   # the fitted compartment parameters of the final iterate
            misfit.set_tissue(*t.cell_fields(self.params.tissue_part(state.x)))
        return [np.asarray(s) for s in misfit.signals(self.kappa(state.x))]

    def _stop_requested(self) -> bool:
        """Collective: has any rank been asked to stop? (the agreed value is kept)"""
        if self._stop is None:
            return False
        local = int(self._stop() or 0)
        if self.comm.size > 1:
            from mpi4py import MPI

            local = int(self.comm.allreduce(local, op=MPI.MAX))
        if local:
            self._signal = local
        return bool(local)

    def _stopped(self, state: RunState, resumable: RunState) -> RunState:
        self.stopped = Stopped(self._signal, state.stage, state.global_iteration,
                               resumable.global_iteration)
        resumable.done = False
        return resumable

    @property
    def frozen(self) -> bool:
        """The stages' reduced model is on a frozen basis (inversion.basis = "frozen")."""
        return self.cfg.inversion.basis == "frozen"

    def _refresh_basis(self, model, state, si, x, stage_iteration) -> None:
        """Basis "frozen": the eigenbasis at x becomes the stage's basis (collective). If its
        cut has (nearly) closed, the mode count is re-selected there first, as `_check_cut`
        does for the eigenbasis model; the basis is then fixed, and the objective smooth,
        until the next refresh."""
        model.refresh_basis(x)
        if self._check_cut(model, state, si, x):
            model.refresh_basis(x)
        self.refreshes += 1
        state.basis_x = np.array(x, copy=True)
        state.basis_iteration = int(stage_iteration)

    def _maybe_refresh(self, model, state, si, x) -> bool:
        """Basis "frozen": refresh at x (the iterate of the current stage iteration) when there
        is no basis, when basis_refresh_every iterations have passed since the last refresh,
        or (Adam) when some face's log10 kappa has moved more than basis_refresh_step since
        it. True if it refreshed."""
        inv = self.cfg.inversion
        due = (state.basis_x is None
               or state.stage_iteration - state.basis_iteration >= inv.basis_refresh_every)
        if not due and inv.basis_refresh_step > 0 and state.basis_iteration != \
                state.stage_iteration:
            due = float(np.max(np.abs(np.asarray(x) - state.basis_x))) > inv.basis_refresh_step
        if due:
            self._refresh_basis(model, state, si, x, state.stage_iteration)
        return due

    def _check_cut(self, model, state, si, x=None) -> bool:
        """Re-select the stage's mode count when the last evaluation's spectral cut has (nearly)
        closed (`forward.mode_selection`): announced, recorded in the history and in
        state.modes, and deterministic (gap thresholds far above round-off). True if the
        count changed."""
        cut = model.misfit.last_cut
        if cut is None or not cut.rel_gap < RESELECT_GAP:
            return False
        x = state.x if x is None else x
        k_new = self.case.num_modes_at(self.kappa(x))
        if k_new == cut.modes:
            return False
        self.log(f"  stage {si + 1} it {state.global_iteration}: modes {cut.modes} and "
                 f"{cut.modes + 1} within {cut.rel_gap:.1e} (relative; lambda = "
                 f"{cut.lam_k:.6g} 1/ms): mode count re-selected {cut.modes} -> {k_new}")
        model.set_num_modes(k_new)
        state.modes[si] = k_new
        return True

    def _record(self, state, si, x, model, t_start, label=None):
        kappa = self.kappa(x)
        m = self.observer(kappa) if self.observer is not None else {}
        h = state.history
        terms = model.last_terms
        row = dict(stage=si, iteration=state.global_iteration,
                   misfit=terms.get("misfit", np.nan), continuity=terms.get("continuity", np.nan),
                   manifold=terms.get("manifold", np.nan),
                   total=terms.get("total", np.nan), manifold_weight=model.weights.manifold,
                   modes=terms.get("modes", np.nan), mode_gap=terms.get("mode_gap", np.nan),
                   cd_l2=m.get("cd_l2", np.nan), bad_edge_pct=m.get("bad_edge_pct", np.nan),
                   interface_faces=m.get("interface_faces", np.nan),
                   seconds=time.perf_counter() - t_start)
        for k in HISTORY_KEYS:
            h[k].append(float(row[k]))
        self._last_row_x = np.array(x, copy=True)
        if m.get("empty_prediction"):
            cd = " CD-L2     n/a (no interface faces)"
        elif np.isnan(row["cd_l2"]):
            cd = ""
        else:
            cd = f" CD-L2 {row['cd_l2']:7.3f} um^2 BadEdge {row['bad_edge_pct']:5.1f}%"
        self.log(f"  {label or f'stage {si + 1}'} it {self._progress(state)}  misfit "
                 f"{row['misfit']:.4e}  continuity {row['continuity']:.3e}  manifold "
                 f"{row['manifold']:.3e}{cd}  faces {row['interface_faces']:4.0f}  "
                 f"{row['seconds']:7.1f} s{self._pace(state, label)}")

    def _progress(self, state) -> str:
        """k/N: the row's global iteration of the planned total."""
        total = max(self.planned_iterations, state.global_iteration)
        return f"{state.global_iteration:{len(str(total))}d}/{total}"

    def _pace(self, state, label) -> str:
        """Seconds per iteration (mean over this process's iterations, set-up of the stages
        included) and the estimated time to the end of the run."""
        if label is not None or self._clock is None:
            return ""
        t0, done = self._clock
        done += 1
        self._clock = (t0, done)
        rate = (time.perf_counter() - t0) / done
        # Adam records the point it steps from: that iteration's step is still to come
        left = max(self.planned_iterations - state.global_iteration, 0)
        return f"  {rate:.2f} s/it  ETA {_duration(rate * left)}"

    def _segment(self, segment, adam, model, state, n, si, stage, t_start):
        """Run at most n optimiser iterations; the stage's end reason if TAO stopped early."""

        def before_iteration(x):
            # Adam moves the prior weights every iteration (the paper's schedule)
            model.update_prior_weights(x, self.manifold_weight(state.global_iteration))

        def monitor(it, x, f, gnorm):
            if adam:
                if self._stop_requested():
                    # stop before this iteration's step: Adam's state is the one that produced
                    # x, which the next run evaluates (and records) again
                    segment.stop()
                    return
                # x is the point the step is taken from; its terms are current
                self._record(state, si, x, model, t_start)
                state.global_iteration += 1
                state.stage_iteration += 1
            else:
                state.global_iteration += 1
                state.stage_iteration += 1
                # the monitor sees the accepted point; recompute terms there (cached solve)
                model.cost_and_gradient(x)
                self._record(state, si, x, model, t_start)
                if self._stop_requested():
                    segment.stop()

        def cost_and_gradient(x):
            if adam and self.frozen:
                # Adam evaluates once per iteration, at the iterate it steps from: the basis
                # can be refreshed there (TAO's line search cannot: its segments end instead)
                self._maybe_refresh(model, state, si, x)
            value = model.cost_and_gradient(x)
            # (a frozen basis has no cut to cross between refreshes: checked at each refresh)
            if adam and not self.frozen and self._check_cut(model, state, si, x):
                # the gradient at a near-closed cut is ill-conditioned (~1 / gap): a step
                # taken from it amplifies round-off ~100x (measured, docs/reproducibility.md),
                # so Adam steps from this point with the re-selected model instead. TAO's line
                # search and quasi-Newton memory need one objective per segment (checked at
                # its start)
                value = model.cost_and_gradient(x)
            return value

        before = state.stage_iteration
        x, reason, adam_state = segment.run(
            state.x, cost_and_gradient, n, monitor,
            before_iteration=before_iteration if adam else None,
            adam_state=state.adam, stage_iteration=state.stage_iteration,
            stage_length=stage.iterations)
        state.x = x
        if adam:
            state.adam = adam_state
        if self._signal:
            return None
        if state.stage_iteration - before < n:
            # TAO stopped early (converged or line search failure): the stage is over
            return reason
        return None


def _duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
