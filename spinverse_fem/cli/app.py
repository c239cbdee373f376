"""Command line: `spinverse simulate|objective|taylor|invert|evaluate ...` (run under mpirun as is).

Bad input (config, protocol, mesh, signal or kappa files, output paths, PETSc options) and solver
failures print one message naming the file and field and exit with code 2, leaving no output
file behind. Warnings of the solvers (Python `warnings`) print as one line `note: <message>`
(rank 0, once per distinct message, without source paths).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

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
EXIT_SIGINT = 130  # 128 + SIGINT, the shell's code for a command stopped by Ctrl-C

# what each PETSc options prefix configures (docs/units_and_files.md, section 5)
PETSC_PREFIXES = {
    "spinverse_": "the SLEPc eigen-solver (-spinverse_eps_*, -spinverse_st_*) and the TAO "
                  "optimiser (-spinverse_tao_*)",
    "spinverse_inertia_": "the inertia count's factorisation",
    "spinverse_adj_": "the adjoint preconditioner",
    "spinverse_cn_": "the Crank-Nicolson solves",
}
PETSC_EPILOG = """\
PETSc and SLEPc options go after the command as single-dash '-key value' pairs, e.g.
  spinverse {command} ... -spinverse_eps_ncv 600 -spinverse_tao_type bqnls
(or in the environment: PETSC_OPTIONS="-spinverse_eps_view"). Prefixes:
  -spinverse_eps_* -spinverse_st_*   SLEPc eigen-solver of the eigenbasis
  -spinverse_tao_*                   TAO optimiser of `invert`
  -spinverse_inertia_*               factorisation of the inertia (mode count) check
  -spinverse_adj_*                   adjoint preconditioner (objective, taylor, invert)
  -spinverse_cn_*                    Crank-Nicolson solves (--model full)
-spinverse_eps_ncv N without -spinverse_eps_mpd also sets -spinverse_eps_mpd N (SLEPc needs
ncv <= nev + mpd). An unknown solver type or a bad value is refused with one message (exit 2).
"""
# commands that run no PETSc solver (their epilog says so)
NO_PETSC = ("evaluate",)
NO_PETSC_EPILOG = """\
`{command}` runs no PETSc or SLEPc solver: it takes no PETSc options (the solver options of
the other commands go after the command as single-dash '-key value' pairs; see `spinverse
simulate --help`).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinverse", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"spinverse-fem {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS.values():
        register(sub)
    for name, parser in sub.choices.items():
        parser.epilog = (NO_PETSC_EPILOG if name in NO_PETSC else PETSC_EPILOG).format(
            command=name)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
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
    previous = warnings.showwarning
    warnings.showwarning = _Notes()
    try:
        if petsc_opts:
            _set_petsc_options(petsc_opts)
        return int(args.func(args) or 0)
    except (InputError, SolverError) as e:
        _report(str(e))
        return EXIT_INPUT
    except Exception as e:
        err = _petsc_error(e)
        if err is None:
            raise
        _report(_petsc_message(err, petsc_opts))
        return EXIT_INPUT
    except KeyboardInterrupt:
        # Ctrl-C where no command handles it (`invert` stops at an iteration instead)
        if _rank() == 0:
            print("spinverse: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    finally:
        warnings.showwarning = previous


class _Notes:
    """warnings.showwarning while a command runs: `note: <message>` on stdout, rank 0 only,
    once per distinct message; no category, source path or line (a user cannot act on them).
    E.g. `note: 911 eigenvalues lie below the cutoff; keeping 111 (max_modes = 111)`."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text in self.seen:
            return
        self.seen.add(text)
        if _rank() == 0:
            print(f"note: {text}", flush=True)


def _rank() -> int:
    """This process's MPI rank (0 before MPI is initialised)."""
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        return mpi.COMM_WORLD.rank if mpi is not None else 0
    except Exception:  # pragma: no cover
        return 0


def _report(message: str) -> None:
    """The one error line, on rank 0."""
    try:
        rank = world().rank
    except Exception:  # pragma: no cover
        rank = 0
    if rank == 0:
        print(f"spinverse: error: {message}", file=sys.stderr, flush=True)


def _set_petsc_options(petsc_opts) -> None:
    """Put the command line's PETSc options into the options database (petsc4py does not read
    sys.argv itself), after refusing an unknown solver type, and add -..._eps_mpd N to a
    -..._eps_ncv N given alone (SLEPc refuses ncv > nev + mpd, and the eigenbasis sets mpd
    for its own ncv: forward/eigenbasis.py)."""
    world()
    from petsc4py import PETSc

    given = dict(petsc_opts)
    for key, value in petsc_opts:
        _check_type_option(key, value)
    opts = PETSc.Options()
    for key, value in petsc_opts:
        opts[key] = value
    for key, value in petsc_opts:
        if key.endswith("eps_ncv") and key[:-3] + "mpd" not in given and value:
            opts[key[:-3] + "mpd"] = value


def _type_names(cls) -> set[str]:
    return {v for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, str)}


def _check_type_option(key: str, value: str) -> None:
    """InputError for a *_type option whose value is not a type PETSc/SLEPc knows."""
    from petsc4py import PETSc

    kinds = {"pc_factor_mat_solver_type": ("solver", lambda: _type_names(PETSc.Mat.SolverType)),
             "eps_type": ("EPS", lambda: _slepc_types("EPS")),
             "st_type": ("ST", lambda: _slepc_types("ST")),
             "ksp_type": ("KSP", lambda: _type_names(PETSc.KSP.Type)),
             "pc_type": ("PC", lambda: _type_names(PETSc.PC.Type)),
             "tao_type": ("TAO", lambda: _type_names(PETSc.TAO.Type) | {"adam"})}
    for suffix, (what, names) in kinds.items():
        if key == suffix or key.endswith("_" + suffix):
            known = names()
            # type names are case-sensitive in PETSc; "adam" (ours) is not
            if value not in known and not (what == "TAO" and value.lower() == "adam"):
                raise InputError("PETSc options", f"-{key}", f"unknown {what} type {value!r}; "
                                 f"known: {', '.join(sorted(known))}")
            return


def _slepc_types(name: str) -> set[str]:
    from slepc4py import SLEPc

    return _type_names(getattr(SLEPc, name).Type)


def _petsc_error(exc: BaseException):
    """The PETSc.Error behind exc (itself, or in its __cause__ / __context__ chain), or None.
    petsc4py sometimes reports one as a SystemError ("returned a result with an exception
    set") whose cause is the PETSc.Error."""
    mod = sys.modules.get("petsc4py.PETSc")
    if mod is None:
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, mod.Error):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _petsc_message(err, petsc_opts) -> str:
    """One line: PETSc's own reason (without source paths and URLs), the routine, the options
    the user gave and what their prefixes configure."""
    lines = str(err).splitlines()
    head = lines[0].strip() if lines else f"error code {getattr(err, 'ierr', '?')}"
    body = [ln.split("] ", 1)[1].strip() for ln in lines[1:] if ln.startswith("[") and "] " in ln]
    calls = [b.split("(", 1)[0] for b in body if re.search(r"\(\) at ", b)]
    reasons = [re.sub(r"[:;]?\s*https?://\S+", "", b).strip() for b in body
               if not re.search(r"\(\) at ", b)]
    reasons = [r for r in reasons if r]
    where = f" in {calls[0]}" if calls else ""
    msg = f"PETSc {head}{where}: " + ("; ".join(reasons[-2:]) if reasons else "solver failure")
    if petsc_opts:
        given = " ".join(f"-{k}" + (f" {v}" if v else "") for k, v in petsc_opts)
        prefixes = sorted({_prefix_of(k) for k, _ in petsc_opts} - {None})
        about = "; ".join(f"prefix {p} configures {PETSC_PREFIXES[p]}" for p in prefixes)
        msg += (f" (PETSc options given: {given}" + (f"; {about}" if about else "")
                + "; see `spinverse COMMAND --help`)")
    return msg


def _prefix_of(key: str) -> str | None:
    """The longest spinverse options prefix `key` starts with (None for a global option)."""
    hits = [p for p in PETSC_PREFIXES if key.startswith(p)]
    return max(hits, key=len) if hits else None


if __name__ == "__main__":
    sys.exit(main())
