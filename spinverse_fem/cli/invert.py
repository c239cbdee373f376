"""`spinverse invert` (= run_inversion.py): the main job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.parallel import say, world

ROOT = Path(__file__).resolve().parents[1]
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
    from spinverse_fem.inverse.curriculum import stages
    from spinverse_fem.forward.model import ForwardModel
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.inverse.driver import (Inversion, fingerprint_of, read_checkpoint,
                                         write_checkpoint)
    from spinverse_fem.io.outputs import (plot_history, write_interface_ply, write_interface_xdmf,
                                       write_metrics, write_result)
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.forward.synthetic import simulate_targets

    comm = world()
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    if args.iterations is not None:
        if args.iterations < 1:
            raise InputError("--iterations", None, "must be >= 1")
        from dataclasses import replace

        cfg = replace(cfg, inversion=replace(cfg.inversion, iterations_per_stage=args.iterations))
    out = Path(args.out)
    problem = build_phantom(cfg)
    tcfg = cfg.target
    target_file = args.target or (str(tcfg.file) if tcfg and tcfg.file else None)
    if target_file:
        from spinverse_fem.io.targets import load_targets

        targets, s0 = load_targets(target_file, cfg)
        source = f"file {target_file}"
    else:
        refine = (tcfg.grid_refinement if tcfg and tcfg.grid_refinement else 1)
        snr = tcfg.noise_snr if tcfg else None
        targets, s0, _ = simulate_targets(comm, cfg, refine, snr, tcfg.seed if tcfg else 0)
        source = (f"simulated ground truth ({cfg.geometry.kind}), grid refinement {refine}"
                  + (f", Rician noise SNR {snr:g}" if snr else ", noiseless"))
    if cfg.inversion.normalisation == "reference" and s0 is None:
        raise InputError(target_file or args.config, "s0_um3", "normalisation 'reference' needs "
                         "the reference b = 0 signal (s0_um3) in the target file")
    truth = problem.membrane if cfg.geometry.kind != "none" else None
    say(comm, f"spinverse invert: {args.config}; targets: {source}")
    say(comm, f"grid: {problem.grid.num_tets} tetrahedra, {int(problem.active.sum())} unknown "
              f"face permeabilities (log10 kappa in [{np.log10(cfg.inversion.kappa_min_um_per_ms):g}, "
              f"{np.log10(cfg.inversion.kappa_max_um_per_ms):g}]), optimiser "
              f"{cfg.inversion.optimizer}, curriculum {cfg.inversion.curriculum}, {comm.size} rank(s)")
    model = ForwardModel(comm, problem, cfg.physics, cfg.eigen)
    inv = Inversion(comm, cfg, problem, model, targets, s0, truth=truth,
                    log=lambda s: say(comm, s))
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
    interface = extract_interface(kappa, cfg.inversion.threshold_um_per_ms, problem.active)
    metrics = dict(inv.interface_metrics(kappa))
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
        names = [" + ".join(cfg.sequences[i].name for i in s.sequences) for s in stages(cfg)]
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
