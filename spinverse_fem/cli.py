"""Command line: `spinverse simulate|objective|taylor|evaluate ...` (run under mpirun as is).

Bad input (config, protocol, mesh, signal or kappa files) and solver failures print one message
naming the file and field and exit with code 2, leaving no output file behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from spinverse_fem.errors import InputError, SolverError

EXIT_INPUT = 2


def _comm():
    import dolfinx_solver  # noqa: F401
    from mpi4py import MPI

    return MPI.COMM_WORLD


def say(comm, *args) -> None:
    """Print on rank 0 only (progress output), flushed so long runs show progress."""
    if comm.rank == 0:
        print(*args, flush=True)


def cmd_simulate(args) -> int:
    from spinverse_fem.config import load_config
    from spinverse_fem.forward import ForwardModel
    from spinverse_fem.plots import plot_signal_decay
    from spinverse_fem.problem import build_problem
    from spinverse_fem.reduced_model import reference_b0_signal
    from spinverse_fem.signals_io import table_from_sequences, write_signal_table

    comm = _comm()
    cfg = load_config(args.config)
    out = Path(args.out)
    t0 = time.perf_counter()
    problem = build_problem(cfg)
    n_in = int(np.sum(problem.membrane & problem.faces.interior))
    n_out = int(np.sum(problem.membrane & problem.faces.outer))
    say(comm, f"grid: {problem.grid.num_tets} tetrahedra, {problem.faces.num_faces} faces; "
              f"membrane: {n_in} interior + {n_out} outer faces; outer = {problem.outer}; "
              f"{comm.size} rank(s)")
    model = ForwardModel(comm, problem, cfg.physics, cfg.eigen)
    basis, system = model.reduce(problem.kappa)
    say(comm, f"eigenbasis: {basis.num_modes} modes, lambda in [{basis.lam[0]:.4g}, "
              f"{basis.lam[-1]:.4g}] 1/ms (cutoff {model.lam_max:.4g} 1/ms"
              + (f", {basis.cutoff_count} below it, capped" if basis.capped else "") + ")")
    signals = model.normalised_signals(system, cfg.sequences)
    s0 = [reference_b0_signal(system, seq.echo_time_ms) for seq in cfg.sequences]
    table = table_from_sequences(cfg.sequences, signals, cfg.text, s0=s0)
    if comm.rank == 0:
        write_signal_table(out, table, extra={
            "faces": problem.faces.faces, "vertices": problem.grid.points,
            "kappa_um_per_ms": problem.kappa, "membrane": problem.membrane.astype(np.int8)})
        plot = out.with_name(out.stem + "_decay.png")
        plot_signal_decay(table, plot, title=f"{Path(args.config).name}: |S/S0| against b")
        for k, seq in enumerate(cfg.sequences):
            rows = table.rows_of(k)
            mag = np.abs(table.signal[rows])
            print(f"  sequence {seq.name}: {len(rows)} measurements, |S/S0| in "
                  f"[{mag.min():.4f}, {mag.max():.4f}]")
        print(f"wrote {out} and {plot} ({time.perf_counter() - t0:.2f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinverse", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate the signals of a configuration")
    s.add_argument("config", help="TOML configuration")
    s.add_argument("--out", default="signals.h5", help="output HDF5 signal table")
    s.set_defaults(func=cmd_simulate)
    for name, fn in _extra_commands().items():
        fn(sub)
    return p


def _extra_commands():
    """Sub-commands registered by other modules (objective, taylor, evaluate, invert)."""
    out = {}
    try:
        from spinverse_fem import cli_adjoint

        out.update(cli_adjoint.COMMANDS)
    except ImportError:
        pass
    try:
        from spinverse_fem import cli_inversion

        out.update(cli_inversion.COMMANDS)
    except ImportError:
        pass
    return out


def _petsc_options(extra: list[str]):
    """[(key, value)] from leftover '-key [value]' tokens; None if any token is not of that form."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("-") or tok.startswith("--") or _is_number(tok):
            return None
        nxt = extra[i + 1] if i + 1 < len(extra) else None
        if nxt is not None and (not nxt.startswith("-") or _is_number(nxt)):
            out.append((tok[1:], nxt))
            i += 2
        else:
            out.append((tok[1:], ""))
            i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    petsc_opts = _petsc_options(extra)
    if petsc_opts is None:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if petsc_opts:
        # PETSc options (e.g. -spinverse_eps_ncv 600 -spinverse_tao_type bqnls) go straight
        # to the options database: petsc4py does not read sys.argv itself
        _comm()
        from petsc4py import PETSc

        opts = PETSc.Options()
        for key, value in petsc_opts:
            opts[key] = value
    try:
        return int(args.func(args) or 0)
    except (InputError, SolverError) as e:
        try:
            rank = _comm().rank
        except Exception:  # pragma: no cover
            rank = 0
        if rank == 0:
            print(f"spinverse: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
