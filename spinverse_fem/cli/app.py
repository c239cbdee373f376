"""Command line: `spinverse simulate|objective|taylor|invert|evaluate ...` (run under mpirun as is).

Bad input (config, protocol, mesh, signal or kappa files) and solver failures print one message
naming the file and field and exit with code 2, leaving no output file behind.
"""

from __future__ import annotations

import argparse
import sys

from spinverse_fem import __version__
from spinverse_fem.cli import evaluate, invert, objective, simulate
from spinverse_fem.errors import InputError, SolverError
from spinverse_fem.parallel import world

# every command, in the order `spinverse --help` lists them
COMMANDS = {
    "simulate": simulate.register,
    "objective": objective.register_objective,
    "taylor": objective.register_taylor,
    "invert": invert.register,
    "evaluate": evaluate.register,
}

EXIT_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinverse", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"spinverse-fem {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS.values():
        register(sub)
    return p


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
        world()
        from petsc4py import PETSc

        opts = PETSc.Options()
        for key, value in petsc_opts:
            opts[key] = value
    try:
        return int(args.func(args) or 0)
    except (InputError, SolverError) as e:
        try:
            rank = world().rank
        except Exception:  # pragma: no cover
            rank = 0
        if rank == 0:
            print(f"spinverse: error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
