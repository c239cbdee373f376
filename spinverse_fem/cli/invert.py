"""`spinverse invert` (= run_inversion.py): the main job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.parallel import say, world

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "examples" / "paper_torus.toml"


def add_invert_arguments(p) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TOML configuration (default: the paper's torus, examples/paper_torus.toml)")
    p.add_argument("--out", default="out", help="output directory (default: out/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.h5 (same config and targets)")
    p.add_argument("--target", help="reference signals (signals.h5 from `spinverse simulate`); "
                   "default: simulated from the config's ground truth")
    p.add_argument("--iterations", type=int,
                   help="override inversion.iterations_per_stage (quick runs)")


def cmd_invert(args) -> int:
    from spinverse_fem.config import load_config
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.evaluation.scoring import score
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.inverse.checkpoint import fingerprint_of, read_checkpoint, write_checkpoint
    from spinverse_fem.inverse.driver import Inversion
    from spinverse_fem.io.outputs import (plot_history, write_interface_ply, write_interface_xdmf,
                                          write_metrics, write_result)

    comm = world()
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    if args.iterations is not None:
        if args.iterations < 1:
            raise InputError("--iterations", None, "must be >= 1")
        from dataclasses import replace

        cfg = replace(cfg, inversion=replace(cfg.inversion, iterations_per_stage=args.iterations))
    out = Path(args.out)
    case = Case(comm, cfg, target_file=args.target)
    problem = case.phantom
    targets = case.targets.signals
    source = case.targets.source
    truth = case.truth
    threshold = cfg.inversion.threshold_um_per_ms
    say(comm, f"spinverse invert: {args.config}; targets: {source}")
    say(comm, f"grid: {problem.grid.num_tets} tetrahedra, {int(problem.active.sum())} unknown "
              f"face permeabilities (log10 kappa in [{np.log10(cfg.inversion.kappa_min_um_per_ms):g}, "
              f"{np.log10(cfg.inversion.kappa_max_um_per_ms):g}]), optimiser "
              f"{cfg.inversion.optimizer}, curriculum {cfg.inversion.curriculum}, {comm.size} rank(s)")
    inv = Inversion(case, log=lambda s: say(comm, s),
                    observer=lambda kappa: score(problem, kappa, threshold, truth))
    fp = fingerprint_of(cfg.text + str(args.iterations), targets)
    ckpt = out / "checkpoint.h5"
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if args.resume and ckpt.exists():
        state = read_checkpoint(ckpt, fp)
        say(comm, f"resuming from {ckpt}: stage {state.stage + 1}, iteration "
                  f"{state.global_iteration}")
    else:
        if args.resume:
            say(comm, f"no checkpoint in {out}: starting afresh")
        state = inv.initial_state()

    def checkpoint(st):
        if comm.rank == 0:
            write_checkpoint(ckpt, st, fp)
        comm.Barrier()

    state = inv.run(state, checkpoint=checkpoint)
    kappa = inv.kappa(state.x)
    metrics = score(problem, kappa, threshold, truth)
    interface = extract_interface(kappa, threshold, problem.active)
    metrics.update(iterations=int(state.global_iteration), modes_per_stage=state.modes,
                   final_misfit=float(state.history["misfit"][-1]) if state.history["misfit"] else None,
                   wall_seconds=float(state.elapsed), ranks=comm.size, targets=source,
                   interface_faces=int(interface.sum()))
    if comm.rank == 0:
        write_result(out / "result.h5", problem, state, kappa, interface, cfg.text,
                     dict(optimizer=cfg.inversion.optimizer, curriculum=cfg.inversion.curriculum,
                          targets=source))
        write_interface_xdmf(out / "interface.xdmf", problem, kappa, interface)
        write_interface_ply(out / "interface.ply", problem, interface)
        write_metrics(out / "metrics.json", metrics)
        names = [" + ".join(cfg.sequences[i].name for i in s.sequences) for s in case.stages]
        plot_history(out / "history.png", state.history, names)
        print(f"done in {time.perf_counter() - t0:.1f} s: {int(interface.sum())} interface faces"
              + (f", CD-L2 {metrics['cd_l2']:.3f} um^2, BadEdge {metrics['bad_edge_pct']:.1f}%, "
                 f"face IoU {metrics['iou']:.3f}" if "cd_l2" in metrics else ""), flush=True)
        print(f"wrote {out}/result.h5, interface.xdmf, interface.ply, metrics.json, history.png",
              flush=True)
    return 0


def register(sub):
    p = sub.add_parser("invert", help="reconstruct face permeabilities (the main job)")
    add_invert_arguments(p)
    p.set_defaults(func=cmd_invert)
