"""`spinverse invert` (= run_inversion.py): the main job.

Interrupting a run: SIGINT (Ctrl-C; `mpiexec` forwards it to every rank) or SIGTERM (a batch
system's stop) asks the inversion to stop at the next iteration boundary, on every rank at the
same iteration. The state there is checkpointed (Adam: exactly; a TAO type: the state at the
start of its segment, the last checkpoint), one line says where it stopped and how to continue
(`--resume`), and the exit code is 130 (SIGINT) or 143 (SIGTERM). A second signal in a serial
run stops at once, keeping the last checkpoint. The output folder's lock is released either way.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.parallel import say, world

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "examples" / "paper_torus.toml"


def add_invert_arguments(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TOML configuration (default: the paper's torus, "
                   "examples/paper_torus.toml)")
    p.add_argument("--out", default="out",
                   help="output folder (default: out/), created if missing; locked while the "
                   "run writes into it (a second run into the same folder is refused)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.h5 (same --config, --target, --iterations "
                   "and --start-kappa as the run that wrote it); without a checkpoint the run "
                   "starts afresh")
    p.add_argument("--target", help="reference signals (signals.h5 from `spinverse simulate`); "
                   "default: simulated from the config's ground truth")
    p.add_argument("--iterations", type=int,
                   help="override inversion.iterations_per_stage (quick runs)")
    p.add_argument("--start-kappa", metavar="FILE",
                   help="warm start: per-face kappa file (HDF5 kappa_um_per_ms, faces, vertices "
                   "on the config's grid, e.g. result.h5 of an earlier run) instead of "
                   "inversion.start_um_per_ms; values outside [kappa_min, kappa_max] are "
                   "clipped to the bounds")
    p.add_argument("--extend", type=int, metavar="N",
                   help="continue the run in OUT (finished or not) with N more iterations of "
                   "its last stage, past the end of its schedules (Adam's learning rate and "
                   "the manifold weight stay at their final values); implies --resume")


# every file an inversion writes into --out (besides its lock, .lock)
OUTPUT_FILES = ("result.h5", "checkpoint.h5", "interface.xdmf", "interface.h5", "interface.ply",
                "metrics.json", "history.png", "fit.png")


class _StopNow(BaseException):
    """A second SIGINT/SIGTERM in a serial run: stop at once (like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Interrupts:
    """SIGINT and SIGTERM during `invert`: the first sets `signum`, which the inversion polls at
    every iteration boundary (`Inversion.run(stop=...)`); a second one in a serial run raises
    _StopNow at once (under mpiexec a rank cannot leave alone: hydra turns a second SIGINT into
    SIGKILL anyway). Installed after PETSc's initialisation, whose own SIGTERM handler (an
    abort banner) it replaces; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, comm):
        self.comm = comm
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            # PETSc (and SLEPc) install their handlers when initialised: do that first
            from petsc4py import PETSc  # noqa: F401
            from slepc4py import SLEPc  # noqa: F401

            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum and self.comm.size == 1:
            raise _StopNow(signum)
        self.signum = self.signum or signum

    def __call__(self) -> int:
        return self.signum


def exit_code(signum: int) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number."""
    return 128 + int(signum)


def cmd_invert(args) -> int:
    comm = world()
    with Interrupts(comm) as interrupts:
        try:
            return _invert_locked(args, comm, interrupts)
        except _StopNow as e:
            # serial only: the checkpoint of the last segment (if any) is kept
            print("interrupted again: stopped at once; continue from the last checkpoint "
                  "with --resume", flush=True)
            return exit_code(e.signum)


def _invert_locked(args, comm, interrupts) -> int:
    from spinverse_fem.cli.outputs import config_inputs, remove_stale
    from spinverse_fem.config import load_config
    from spinverse_fem.io.paths import Output, OutputLock, check_outputs, remove_if_empty

    t0 = time.perf_counter()
    cfg = load_config(args.config)
    if args.iterations is not None:
        if args.iterations < 1:
            raise InputError("--iterations", None, f"must be >= 1, got {args.iterations}")
        from dataclasses import replace

        cfg = replace(cfg, inversion=replace(cfg.inversion, iterations_per_stage=args.iterations))
    if args.extend is not None and args.extend < 1:
        raise InputError("--extend", None, f"must be >= 1, got {args.extend}")
    target = args.target or (cfg.target.file if cfg.target is not None else None)
    # refused before anything is computed; the folder is created (rank 0) and locked
    created = check_outputs([Output(args.out, "--out", kind="dir", files=OUTPUT_FILES)],
                            [*config_inputs(args.config, cfg), ("target", target),
                             ("start kappa", args.start_kappa)], comm, create=True)
    out = Path(args.out)
    try:
        lock = OutputLock(out, comm).acquire()
        try:
            if lock.note:
                say(comm, lock.note)
            remove_stale(comm, out, OUTPUT_FILES)
            return _invert(args, comm, cfg, out, t0, interrupts)
        finally:
            lock.release()
    except BaseException:
        remove_if_empty(created, comm)  # a run refused early leaves no empty folder behind
        raise


def _invert(args, comm, cfg, out: Path, t0: float, interrupts: Interrupts) -> int:
    from spinverse_fem.cli.outputs import write_failed
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.evaluation.scoring import score
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.inverse.checkpoint import fingerprint_of, read_checkpoint, write_checkpoint
    from spinverse_fem.inverse.driver import Inversion
    from spinverse_fem.io.outputs import (
        plot_history,
        write_interface_ply,
        write_interface_xdmf,
        write_metrics,
        write_result,
    )
    from spinverse_fem.io.paths import on_root
    from spinverse_fem.io.plots import plot_fit

    # the checkpoint is read on rank 0 and broadcast: every rank resumes from the same state or
    # raises the same error
    ckpt = out / "checkpoint.h5"
    has_ckpt = on_root(comm, ckpt.exists)
    if args.extend is not None and not has_ckpt:
        raise InputError(str(ckpt), "--extend", "no checkpoint to extend: run the inversion "
                         "into this --out first")
    resume = (bool(args.resume) or args.extend is not None) and has_ckpt
    if resume:  # a damaged checkpoint is refused before any solve (nothing to broadcast)
        on_root(comm, lambda: read_checkpoint(ckpt, None).stage)
    case = Case(comm, cfg, target_file=args.target)
    problem = case.phantom
    start_x, start_note = None, None
    if args.start_kappa is not None:  # checked against the grid before the targets are made
        start_x, start_note = _start_x(args.start_kappa, case, comm)
    targets = case.targets.signals
    source = case.targets.source
    truth = case.truth
    threshold = cfg.inversion.threshold_um_per_ms
    say(comm, f"spinverse invert: {args.config}; targets: {source}")
    say(comm, f"grid: {problem.grid.num_tets} tetrahedra, {int(problem.active.sum())} unknown "
              f"face permeabilities (log10 kappa in "
              f"[{np.log10(cfg.inversion.kappa_min_um_per_ms):g}, "
              f"{np.log10(cfg.inversion.kappa_max_um_per_ms):g}]), optimiser "
              f"{cfg.inversion.optimizer}, curriculum {cfg.inversion.curriculum}, "
              f"{comm.size} rank(s)")
    from spinverse_fem.geometry.phantom import tissue_summary

    for line in tissue_summary(cfg, problem):
        say(comm, "  " + line)
    if cfg.inversion.noise_snr is not None:
        say(comm, f"  misfit: Rician magnitudes at SNR {cfg.inversion.noise_snr:g} "
                  "(sqrt(|S/S0|^2 + 2/SNR^2) against |data|)")
    if case.params.tissue is not None:
        start = case.tissue_values(case.start_x())
        say(comm, f"  also fitted: {' and '.join(cfg.inversion.fit_compartments)} of every "
                  "compartment, from " + "; ".join(
                      f"{name} D {v['diffusivity_um2_per_ms']:.4g} um^2/ms"
                      + ("" if v["t2_ms"] is None else f", T2 {v['t2_ms']:.4g} ms")
                      for name, v in start.items()))
    inv = Inversion(case, log=lambda s: say(comm, s),
                    observer=lambda kappa: score(problem, kappa, threshold, truth))
    start_tag = ""
    if start_x is not None:
        say(comm, start_note)
        start_tag = "\nstart kappa " + hashlib.sha256(start_x.tobytes()).hexdigest()[:16]
    fp = _fingerprint(case, cfg.text + str(args.iterations) + start_tag)
    if resume:
        # a checkpoint of an earlier version hashed simulated targets bit for bit
        legacy = fingerprint_of(cfg.text + str(args.iterations) + start_tag, targets)
        if on_root(comm, lambda: _stored_fingerprint(ckpt)) == legacy:
            fp = legacy
        state = on_root(comm, lambda: read_checkpoint(ckpt, fp, num_parameters=case.params.size,
                                                      num_stages=len(case.stages)))
        say(comm, f"resuming from {ckpt}: stage {min(state.stage + 1, len(case.stages))}, "
                  f"iteration {state.global_iteration}")
        if args.extend is not None:
            _extend(inv, state, args.extend, comm)
    else:
        if args.resume:
            say(comm, f"no checkpoint in {out}: starting afresh")
        state = inv.initial_state()
        if start_x is not None:
            state.x = start_x

    def write_ckpt(st):
        try:
            write_checkpoint(ckpt, st, fp)
        except OSError as e:
            raise write_failed(ckpt, e) from None

    def checkpoint(st):
        # rank 0 writes; the broadcast verdict keeps the ranks together (a failed write is
        # the same InputError on every rank instead of a rank waiting in a barrier)
        on_root(comm, lambda: write_ckpt(st))

    state = inv.run(state, checkpoint=checkpoint, stop=interrupts)
    if inv.stopped is not None:
        checkpoint(state)  # what the stop left: continued by --resume
        say(comm, _interrupted_line(inv, state))
        return exit_code(inv.stopped.signal)

    inv.finish(state)  # the final iterate's history row
    kappa = inv.kappa(state.x)
    predicted = inv.predicted_signals(state)
    metrics = score(problem, kappa, threshold, truth)
    interface = extract_interface(kappa, threshold, problem.active)
    final_misfit = float(state.history["misfit"][-1])
    metrics.update(iterations=int(state.global_iteration), modes_per_stage=state.modes,
                   final_misfit=final_misfit, wall_seconds=float(state.elapsed),
                   ranks=comm.size, targets=source, interface_faces=int(interface.sum()),
                   start=(f"kappa file {args.start_kappa}" if args.start_kappa is not None else
                          f"inversion.start_um_per_ms = {cfg.inversion.start_um_per_ms:g}"))
    fitted = case.tissue_values(state.x)
    if fitted:
        metrics.update(compartments=fitted)
    fit = _fit_table(cfg, case, state, predicted)

    def write_outputs():
        path = out
        try:
            path = out / "result.h5"
            write_result(path, problem, state, kappa, interface, cfg.text,
                         dict(optimizer=cfg.inversion.optimizer,
                              curriculum=cfg.inversion.curriculum, targets=source,
                              final_misfit=final_misfit), fit=fit)
            path = out / "interface.xdmf"
            write_interface_xdmf(path, problem, kappa, interface)
            path = out / "interface.ply"
            write_interface_ply(path, problem, interface)
            path = out / "metrics.json"
            write_metrics(path, metrics)
            names = [" + ".join(cfg.sequences[i].name for i in s.sequences) for s in case.stages]
            path = out / "history.png"
            plot_history(path, state.history, names)
            path = out / "fit.png"
            plot_fit(path, fit, title=f"{Path(args.config).name}: measured and predicted "
                     f"signals at the final kappa (iteration {state.global_iteration})")
        except OSError as e:
            raise write_failed(path, e) from None

    on_root(comm, write_outputs)
    if comm.rank == 0:
        print(f"done in {time.perf_counter() - t0:.1f} s: iteration {state.global_iteration}, "
              f"final misfit {final_misfit:.4e}, {int(interface.sum())} interface faces"
              + (f", CD-L2 {metrics['cd_l2']:.3f} um^2, BadEdge {metrics['bad_edge_pct']:.1f}%, "
                 f"face IoU {metrics['iou']:.3f}" if "cd_l2" in metrics else "")
              + (f"; frozen basis refreshed {inv.refreshes} times in this process"
                 if inv.frozen else ""), flush=True)
        for name, v in fitted.items():
            t2 = "" if v["t2_ms"] is None else f", T2 {v['t2_ms']:.4g} ms"
            print(f"  fitted compartment {name!r}: D {v['diffusivity_um2_per_ms']:.4g} "
                  f"um^2/ms{t2}", flush=True)
        print(f"wrote {out}/result.h5, interface.xdmf, interface.ply, metrics.json, history.png, "
              "fit.png", flush=True)
    # a signal that came after the last iteration: everything was written, but say so
    late = int(comm.allreduce(interrupts.signum, op=_mpi_max())) if comm.size > 1 else \
        interrupts.signum
    if late:
        say(comm, "interrupted after the last iteration: all outputs were written")
        return exit_code(late)
    return 0


def _fingerprint(case, text: str) -> str:
    """What a checkpoint must belong to: the configuration (with --iterations, --start-kappa)
    and, for targets read from a file, the targets bit for bit. Simulated targets are fixed by
    the configuration; their last bits vary between runs under MPI (parallel MUMPS is not
    bitwise reproducible) and with the rank count, so they are not hashed."""
    from spinverse_fem.inverse.checkpoint import fingerprint_of

    return fingerprint_of(text, case.targets.signals if case.target_file else [])


def _stored_fingerprint(path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            fp = f.attrs.get("fingerprint")
    except OSError:
        return None
    return fp.decode("utf-8", "replace") if isinstance(fp, bytes) else fp


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


def _start_x(path, case, comm) -> tuple[np.ndarray, str]:
    """(x0, a line saying what it is): x0 = log10 kappa on the active faces from a kappa file
    of the config's grid (read on rank 0, checked against the grid), clipped to the bounds."""
    from spinverse_fem.io.kappa import read_kappa
    from spinverse_fem.io.paths import on_root

    problem = case.phantom
    kappa = on_root(comm, lambda: read_kappa(path, problem.faces.faces, problem.grid.points))
    inv = case.cfg.inversion
    active = np.asarray(kappa, dtype=float)[case.params.active]
    low = int(np.sum(active < inv.kappa_min_um_per_ms))
    high = int(np.sum(active > inv.kappa_max_um_per_ms))
    with np.errstate(divide="ignore"):
        x = case.params.from_kappa(kappa)
    note = (f"warm start from {path}: kappa in [{active.min():.4g}, {active.max():.4g}] um/ms "
            f"on the {active.size} active faces"
            + (f"; {low} below kappa_min and {high} above kappa_max clipped to the bounds"
               if low or high else ""))
    return x, note


def _extend(inv, state, n: int, comm) -> None:
    """Lengthen the last stage by n iterations past where the checkpoint stands (a finished run
    is reopened in its last stage) or past its configured end, whichever is later."""
    stages = inv.stages
    last = len(stages) - 1
    if state.stage > last:  # finished: reopen the last stage where it ended
        before = sum(s.iterations for s in stages[:-1])
        state.stage = last
        state.stage_iteration = state.global_iteration - before
        state.stage_kappa = state.stage_kappa[:last]
        state.done = False
        base = state.stage_iteration
    elif state.stage == last:
        base = max(state.stage_iteration, stages[-1].iterations)
    else:
        base = stages[-1].iterations
    inv.extend_last_stage(base + n)
    say(comm, f"extending: stage {last + 1} runs to its iteration {inv.last_stage_end} "
              f"({n} more than {base}); the run ends at iteration {inv.planned_iterations}")


def _interrupted_line(inv, state) -> str:
    """One line: where the run stopped and how to continue it."""
    st = inv.stopped
    line = f"interrupted at stage {st.stage + 1}, iteration {st.iteration}; continue with --resume"
    last = len(inv.stages) - 1
    configured = inv.stages[-1].iterations
    if inv.last_stage_end > configured:
        done = state.stage_iteration if state.stage == last else 0
        line += f" --extend {inv.last_stage_end - max(configured, done)}"
    if st.resume_iteration != st.iteration:
        line += (f" (from the checkpoint at iteration {st.resume_iteration}: a TAO "
                 "optimiser's memory cannot be saved inside a segment)")
    return line


def _fit_table(cfg, case, state, predicted) -> dict:
    """What result.h5's fit group and fit.png show: per configured sequence its name, b,
    directions, the targets and the predicted S/S0 at the final kappa."""
    targets = case.targets.signals
    return dict(
        names=[s.name for s in cfg.sequences],
        b=[np.asarray(s.b_s_per_mm2, dtype=float) for s in cfg.sequences],
        directions=[np.asarray(s.directions, dtype=float) for s in cfg.sequences],
        target=[np.asarray(t, dtype=complex) for t in targets],
        predicted=[np.asarray(p, dtype=complex) for p in predicted],
        modes=int(state.modes[-1]), iteration=int(state.global_iteration),
        normalisation=cfg.inversion.normalisation)


def register(sub):
    p = sub.add_parser("invert", help="reconstruct face permeabilities (the main job)",
                       description="Reconstruct the face permeabilities. Ctrl-C (SIGINT) or "
                       "SIGTERM stops at the next iteration and writes a checkpoint: continue "
                       "with --resume (exit code 130 / 143).")
    add_invert_arguments(p)
    p.set_defaults(func=cmd_invert)
