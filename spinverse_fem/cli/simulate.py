"""`spinverse simulate`: the signals of a configuration's ground truth -> signal table + plot."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from spinverse_fem.cli.outputs import config_inputs, remove_stale, write_failed
from spinverse_fem.errors import InputError
from spinverse_fem.parallel import say, world


def cmd_simulate(args) -> int:
    from spinverse_fem.config import load_config
    from spinverse_fem.forward.reduced_model import b0_signal
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.io.paths import Output, check_outputs, on_root
    from spinverse_fem.io.plots import plot_signal_decay
    from spinverse_fem.io.signals import table_from_sequences, write_signal_table

    comm = world()
    cfg = load_config(args.config)
    out = Path(args.out)
    # "", "/" or ".." have no name to derive the plot's from: check_outputs refuses them
    plot = out.with_name(out.stem + "_decay.png") if out.name not in ("", "..") else out
    check_outputs([Output(args.out), Output(plot)], config_inputs(args.config, cfg), comm)
    remove_stale(comm, out.parent, [out.name, plot.name])
    t0 = time.perf_counter()
    case = Case(comm, cfg)
    problem, model = case.phantom, case.forward
    n_in = int(np.sum(problem.membrane & problem.faces.interior))
    n_out = int(np.sum(problem.membrane & problem.faces.outer))
    say(comm, f"grid: {problem.grid.num_tets} tetrahedra, {problem.faces.num_faces} faces; "
              f"membrane: {n_in} interior + {n_out} outer faces; outer = {problem.outer}; "
              f"{comm.size} rank(s)")
    from spinverse_fem.geometry.phantom import tissue_summary

    for line in tissue_summary(cfg, problem):
        say(comm, "  " + line)
    if args.model == "full":
        from spinverse_fem.forward.full_order import FullOrderModel

        dt = cfg.full_order.time_step_ms
        say(comm, f"full-order Crank-Nicolson model, time step {dt:g} ms "
                  f"({model.space.num_dofs_global} dofs; [full_order] time_step_ms)")
        full = FullOrderModel(model.ops, dt)
        try:
            signals, s0 = full.normalised_signals(cfg.sequences, problem.kappa)
        finally:
            full.destroy()
    else:
        basis, system = model.reduce(problem.kappa)
        say(comm, f"eigenbasis: {basis.num_modes} modes, lambda in [{basis.lam[0]:.4g}, "
                  f"{basis.lam[-1]:.4g}] 1/ms (cutoff {model.lam_max:.4g} 1/ms"
                  + (f", {basis.cutoff_count} below it, capped" if basis.capped else "") + ")")
        signals = model.normalised_signals(system, cfg.sequences)
        s0 = [b0_signal(system, seq.echo_time_ms) for seq in cfg.sequences]
    table = table_from_sequences(cfg.sequences, signals, cfg.text, s0=s0)

    def write():
        try:
            write_signal_table(out, table, extra={
                "faces": problem.faces.faces, "vertices": problem.grid.points,
                "kappa_um_per_ms": problem.kappa, "membrane": problem.membrane.astype(np.int8)})
        except OSError as e:
            raise write_failed(out, e) from None
        try:
            plot_signal_decay(table, plot, title=f"{Path(args.config).name}: |S/S0| against b")
        except OSError as e:
            raise InputError(str(plot), "--out", f"cannot write the plot ({e.strerror or e}); "
                             f"the signal table {out} was written") from None
        for k, seq in enumerate(cfg.sequences):
            rows = table.rows_of(k)
            mag = np.abs(table.signal[rows])
            print(f"  sequence {seq.name}: {len(rows)} measurements, |S/S0| in "
                  f"[{mag.min():.4f}, {mag.max():.4f}]")
        print(f"wrote {out} and {plot} ({time.perf_counter() - t0:.2f} s)", flush=True)

    on_root(comm, write)  # rank 0 writes; a failure is the same error on every rank
    return 0


def register(sub) -> None:
    s = sub.add_parser("simulate", help="simulate the signals of a configuration")
    s.add_argument("config", help="TOML configuration")
    s.add_argument("--out", default="signals.h5",
                   help="output HDF5 signal table (the decay plot goes next to it as "
                   "<stem>_decay.png); must not be an input file")
    s.add_argument("--model", choices=["reduced", "full"], default="reduced",
                   help="reduced: the eigenbasis (matrix formalism) model; full: the full-order "
                   "Crank-Nicolson reference ([full_order] time_step_ms), normalised the same "
                   "way (S0 = the model's own b = 0 signal at the echo time)")
    s.set_defaults(func=cmd_simulate)
