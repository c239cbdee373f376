"""Command line for the misfit and its adjoint gradient: `spinverse objective` and
`spinverse taylor` (run under mpirun as is).

    spinverse objective CONFIG.toml --target signals.h5 [--kappa kappa.h5]
                        [--model reduced|full] [--sequences NAME ...] [--modes K] --out result.h5
    spinverse taylor    CONFIG.toml --target signals.h5 [--kappa kappa.h5]
                        [--model reduced|full] [--sequences NAME ...] [--modes K]
                        [--seed 0] [--h0 1e-2] [--halvings 4] [--json out.json]

The misfit is the configuration's: J = w / N sum_c |S_c / S0 - T_c|^2 with w =
inversion.misfit_weight and S0 per inversion.normalisation ("reference": the target file's b = 0
signal s0_um3; "own": the model's own b = 0 signal). The targets T are the rows of a signal table
written by `spinverse simulate` for the same sequences (checked row by row). Without --kappa the
starting point is inversion.start_um_per_ms on every face; a kappa file (kappa_io) must belong
to the configuration's grid (faces and vertices are checked). `objective`'s output file holds
kappa_um_per_ms, faces and vertices too, so it is itself a valid --kappa file.

`objective` writes (rank 0, atomically): objective (scalar J), gradient (F,) dJ/dkappa in
1/(um/ms), gradient_log10 (F,) dJ/dlog10(kappa) = ln(10) kappa dJ/dkappa, kappa_um_per_ms (F,),
faces (F, 3), vertices (V, 3) um, active (F,) int8 (faces whose kappa enters the model; the
gradient is 0 elsewhere), all in canonical face order; attributes model, normalisation, modes
(K; 0 for the full model, which records time_step_ms instead), misfit_weight, sequences (JSON),
counters (JSON), config (TOML text), target, kappa_source, ranks, seconds, units.
`taylor` prints h, |J(h) - J(0)| (first order), |J(h) - J(0) - h <kappa dJ/dkappa, d>| (second
order) and their observed rates for a seeded standard-normal direction d in log kappa, and exits
with 0 if the smallest second-order rate is >= 1.9, else 1; --json writes the same numbers.

Reduced model: the mode count K is fixed for the whole run (J is smooth only at fixed K): --modes
if given, else the model's rule ([eigen] length scale / num_modes, cap, moved down to a spectral
gap) evaluated at the evaluation kappa. Full model: Crank-Nicolson with [full_order] time_step_ms.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from spinverse_fem.cli.outputs import config_inputs, write_failed
from spinverse_fem.errors import InputError
from spinverse_fem.io.atomic import write_json_atomic
from spinverse_fem.io.paths import Output, check_outputs, on_root
from spinverse_fem.parallel import say, world

MODELS = ("reduced", "full")
TAYLOR_MIN_RATE = 1.9
#: the taylor command may halve h this many more times to reach the asymptotic part
EXTRA_HALVINGS = 6


# -- shared set-up ---------------------------------------------------------------------------------

class Evaluation:
    """Everything one command needs: the problem, the kappa to evaluate at and the misfit.

    misfit: inverse.misfit.ReducedMisfit or FullOrderMisfit (built by the Case); kappa (F,) um/ms;
    modes: fixed reduced mode count K (0 for the full model); names: active sequence names.
    """

    def __init__(self, args, comm):
        from spinverse_fem.config import load_config
        from spinverse_fem.inverse.case import Case
        from spinverse_fem.io.kappa import read_kappa

        self.comm = comm
        self.model_name = args.model
        cfg = self.cfg = load_config(args.config)
        idx = _sequence_indices(cfg, args.sequences, str(args.config))
        self.case = case = Case(comm, cfg, target_file=args.target)
        case.targets  # read and checked before any solve
        self.normalisation = cfg.inversion.normalisation
        self.sequences = [cfg.sequences[i] for i in idx]
        self.names = [s.name for s in self.sequences]
        self.problem = problem = case.phantom
        if args.kappa is not None:
            self.kappa = read_kappa(args.kappa, problem.faces.faces, problem.grid.points)
            self.kappa_source = str(args.kappa)
        else:
            self.kappa = case.start_kappa()
            self.kappa_source = (f"inversion.start_um_per_ms = "
                                 f"{cfg.inversion.start_um_per_ms:g}")
        self.time_step_ms = cfg.full_order.time_step_ms if args.model == "full" else None
        self.misfit = case.misfit(idx, model=args.model, num_modes=args.modes)
        self.modes = 0 if args.model == "full" else self.misfit.freeze_modes(self.kappa)

    def describe(self) -> str:
        m = (f"reduced model, {self.modes} modes" if self.model_name == "reduced"
             else f"full-order model, time step {self.time_step_ms:g} ms")
        n = sum(s.num_measurements for s in self.sequences)
        return (f"{m}; normalisation {self.normalisation}; sequences {', '.join(self.names)} "
                f"({n} measurements); {self.problem.faces.num_faces} faces; "
                f"{self.comm.size} rank(s)")

    def counters(self) -> dict:
        return asdict(self.misfit.counters)

    def destroy(self) -> None:
        self.case.destroy()


def _sequence_indices(cfg, names, source: str) -> list[int]:
    if not names:
        return list(range(len(cfg.sequences)))
    out = []
    for name in names:
        try:
            i = cfg.sequence_index(name)
        except KeyError:
            raise InputError(source, "--sequences", f"no sequence named {name!r}; the config "
                             f"has {[s.name for s in cfg.sequences]}") from None
        if i not in out:
            out.append(i)
    return out


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML configuration")
    p.add_argument("--target", required=True,
                   help="target signal table (HDF5, as written by `spinverse simulate`)")
    p.add_argument("--kappa", default=None,
                   help="per-face kappa file (HDF5: kappa_um_per_ms, faces, vertices); "
                        "default inversion.start_um_per_ms on every face")
    p.add_argument("--model", choices=MODELS, default="reduced",
                   help="reduced eigenbasis model (default) or full-order Crank-Nicolson")
    p.add_argument("--sequences", nargs="+", metavar="NAME", default=None,
                   help="names of the sequences in the misfit (default: all)")
    p.add_argument("--modes", type=_positive_int, default=None,
                   help="reduced model only (ignored by --model full): fixed mode count "
                        "(default: the [eigen] rule at the evaluation kappa)")


# -- objective -------------------------------------------------------------------------------------

def _write_objective(out: Path, ev, args, comm, value, grad, grad_log10, seconds) -> None:
    """The objective command's HDF5 file (docs/file_formats.md), written atomically."""
    from spinverse_fem.io.atomic import atomic_h5

    with atomic_h5(out) as f:
        f["objective"] = float(value)
        f["gradient"] = grad
        f["gradient_log10"] = grad_log10
        f["faces"] = ev.problem.faces.faces
        f["vertices"] = ev.problem.grid.points
        f["kappa_um_per_ms"] = ev.kappa
        f["active"] = ev.problem.active.astype(np.int8)
        a = f.attrs
        a["model"] = ev.model_name
        a["normalisation"] = ev.normalisation
        a["modes"] = ev.modes
        if ev.time_step_ms is not None:
            a["time_step_ms"] = ev.time_step_ms
        a["misfit_weight"] = ev.misfit.weight
        a["sequences"] = json.dumps(ev.names)
        a["counters"] = json.dumps(ev.counters())
        a["config"] = ev.cfg.text
        a["target"] = str(args.target)
        a["kappa_source"] = ev.kappa_source
        a["ranks"] = comm.size
        a["seconds"] = seconds
        a["units"] = ("objective: dimensionless; gradient: dJ/dkappa in 1/(um/ms); "
                      "gradient_log10: dJ/dlog10(kappa); kappa: um/ms; vertices: um; "
                      "faces: canonical order")


def cmd_objective(args) -> int:
    """J and dJ/dkappa at one kappa -> HDF5 (rank 0, atomic) and a summary on stdout."""
    comm = world()
    t0 = time.perf_counter()
    _check_outputs(args, comm, Output(args.out))
    ev = Evaluation(args, comm)
    try:
        value, grad = ev.misfit.cost_and_gradient(ev.kappa)
    finally:
        ev.destroy()
    seconds = time.perf_counter() - t0
    grad = np.asarray(grad, dtype=np.float64)
    grad_log10 = grad * ev.kappa * math.log(10.0)

    def write():
        out = Path(args.out)
        try:
            _write_objective(out, ev, args, comm, value, grad, grad_log10, seconds)
        except OSError as e:
            raise write_failed(out, e) from None

    on_root(comm, write)
    say(comm, f"objective ({ev.describe()})")
    say(comm, f"  J = {value:.10e}; |dJ/dkappa| = {np.linalg.norm(grad):.6e} 1/(um/ms), "
              f"|dJ/dlog10 kappa| = {np.linalg.norm(grad_log10):.6e}")
    say(comm, f"wrote {args.out} ({seconds:.2f} s)")
    return 0


def _check_outputs(args, comm, *outputs) -> None:
    """Refuse outputs that cannot be written or would replace an input (the config, the
    files it reads, the target, the kappa file), on every rank, before any solve."""
    from spinverse_fem.config import load_config

    cfg = load_config(args.config)
    check_outputs(list(outputs), [*config_inputs(args.config, cfg), ("target", args.target),
                                  ("kappa", args.kappa)], comm)


def register_objective(sub) -> None:
    p = sub.add_parser("objective", help="misfit and its adjoint gradient at one kappa")
    _add_common(p)
    p.add_argument("--out", required=True, help="output HDF5 (objective, gradient, ...)")
    p.set_defaults(func=cmd_objective)


# -- taylor ----------------------------------------------------------------------------------------

class _CutRecorder:
    """The misfit, recording the spectral cut (`ModeCut`) of every evaluation of the test."""

    def __init__(self, misfit):
        self.misfit = misfit
        self.cuts = []

    def cost(self, kappa):
        value = self.misfit.cost(kappa)
        self.cuts.append(self.misfit.last_cut)
        return value

    def cost_and_gradient(self, kappa):
        return self.misfit.cost_and_gradient(kappa)


def asymptotic_rates(res) -> tuple[np.ndarray, int]:
    """(rates judged, how many): the last two second-order rates (the sequence was extended
    until they agree, `taylor_test(max_extra_halvings=...)`), leaving out those whose smaller
    remainder is at round-off (1e3 eps |J|)."""
    n = 2
    floor = 1e3 * np.finfo(float).eps * max(abs(res.J0), 1e-300)
    keep = res.r1[1:] > floor
    judged = res.rates1[keep][-n:]
    return judged, int(judged.size)


def cmd_taylor(args) -> int:
    """Taylor test of the adjoint gradient in log kappa; exit 0 iff the asymptotic second-order
    rates are >= 1.9, 1 if not, 2 if the model is not differentiable at the point (the reduced
    model's spectral cut is (nearly) closed there or along the test path)."""
    from spinverse_fem.forward.mode_selection import RESELECT_GAP
    from spinverse_fem.inverse.taylor import taylor_test

    comm = world()
    t0 = time.perf_counter()
    if args.json:
        _check_outputs(args, comm, Output(args.json, "--json"))
    ev = Evaluation(args, comm)
    try:
        cut = ev.misfit.last_cut
        if cut is not None:
            say(comm, f"spectral cut: K = {cut.modes}, lambda_K = {cut.lam_k:.6g} 1/ms, "
                      f"lambda_K+1 = {cut.lam_next:.6g} 1/ms, relative gap {cut.rel_gap:.2e}")
            if not cut.rel_gap >= RESELECT_GAP:
                raise InputError(ev.kappa_source, "spectral cut",
                                 f"the reduced model with K = {cut.modes} modes is not "
                                 f"differentiable here: lambda_K and lambda_K+1 are within "
                                 f"{cut.rel_gap:.1e} (relative; below {RESELECT_GAP:g}), so "
                                 "no gradient is certified; drop --modes to use the mode "
                                 "rule, or choose K at a spectral gap")
        rec = _CutRecorder(ev.misfit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = taylor_test(rec, ev.kappa, seed=args.seed, h0=args.h0,
                              halvings=args.halvings, multiplicative=True,
                              max_extra_halvings=EXTRA_HALVINGS)
        closing = [(h, c) for h, c in zip(res.h, rec.cuts)
                   if c is not None and not c.rel_gap >= RESELECT_GAP]
        if closing:
            h, c = closing[0]
            raise InputError(ev.kappa_source, "spectral cut",
                             f"the test path crosses a near-degeneracy at K = {c.modes}: at "
                             f"h = {h:.2e} lambda_K and lambda_K+1 are within {c.rel_gap:.1e} "
                             "(relative), where the reduced model is not differentiable; use "
                             "a smaller --h0")
    finally:
        ev.destroy()
    seconds = time.perf_counter() - t0
    hs, slope, r0, r1, rates0, rates = res.h, res.slope, res.r0, res.r1, res.rates0, res.rates1
    judged, n_judged = asymptotic_rates(res)
    min_rate = (float(np.min(judged)) if n_judged and np.all(np.isfinite(judged))
                else float("nan"))
    passed = bool(min_rate >= TAYLOR_MIN_RATE)
    say(comm, f"taylor test ({ev.describe()})")
    say(comm, f"  J = {res.J0:.10e}; direction: seed {args.seed} in log kappa; "
              f"<kappa dJ/dkappa, d> = {slope:.6e}")
    say(comm, f"  {'h':>10}  {'|J(h)-J(0)|':>14}  {'rate':>6}  {'|J(h)-J(0)-h g.d|':>18}  "
              f"{'rate':>6}  {'gap':>8}")
    for i, h in enumerate(hs):
        a = f"{rates0[i - 1]:6.3f}" if i else " " * 6
        b = f"{rates[i - 1]:6.3f}" if i else " " * 6
        g = f"{rec.cuts[i].rel_gap:8.1e}" if rec.cuts[i] is not None else ""
        say(comm, f"  {h:10.4e}  {r0[i]:14.6e}  {a}  {r1[i]:18.6e}  {b}  {g}")
    for w in caught:
        say(comm, f"  note: {w.message}")
    if res.reaches_roundoff:
        say(comm, "  note: Taylor remainders reach round-off; increase --h0")
    say(comm, f"  judged on the asymptotic part: the last {n_judged} second-order rates"
              + (f" (h <= {hs[-n_judged - 1]:.2e})" if n_judged else " (none above round-off)"))
    say(comm, f"min asymptotic second-order rate {min_rate:.3f} "
              f"{'>=' if passed else 'below'} {TAYLOR_MIN_RATE}: "
              f"{'PASS' if passed else 'FAIL'} ({seconds:.2f} s)")
    if args.json:
        on_root(comm, lambda: write_json_atomic(Path(args.json), dict(
            model=ev.model_name, normalisation=ev.normalisation, modes=ev.modes,
            lambda_K=cut.lam_k if cut else None,
            lambda_K1=cut.lam_next if cut else None,
            relative_gap=cut.rel_gap if cut else None,
            time_step_ms=ev.time_step_ms, sequences=ev.names, seed=args.seed,
            J=res.J0, slope=slope, h=hs.tolist(), first_order_remainders=r0.tolist(),
            first_order_rates=rates0.tolist(), second_order_remainders=np.asarray(r1).tolist(),
            second_order_rates=rates.tolist(), judged_rates=judged.tolist(),
            min_second_order_rate=min_rate,
            threshold=TAYLOR_MIN_RATE, passed=passed, counters=ev.counters(),
            seconds=seconds, ranks=comm.size, kappa_source=ev.kappa_source)))
    return 0 if passed else 1


def register_taylor(sub) -> None:
    p = sub.add_parser("taylor", help="Taylor test of the adjoint gradient (exit 0 if rate ~2)")
    _add_common(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random log-kappa direction")
    p.add_argument("--h0", type=_positive_float, default=1e-2, help="largest step in log kappa")
    p.add_argument("--halvings", type=_positive_int, default=4, help="number of step halvings")
    p.add_argument("--json", default=None, help="also write the table as JSON (rank 0)")
    p.set_defaults(func=cmd_taylor)
