"""Gradient benchmark (issue 3): cost of the adjoint gradient of the reduced signal misfit.

Setting: the paper's torus (R = 10, r = 6 um) ground truth on the bcc grid of the 26.7 um box
(n cubes per side, a = 80/3/n um), D = 2 um^2/ms, outer faces robin, one PGSE sequence 10/60
ms, b = 0..5000 s/mm^2 step 1000, 30 Fibonacci directions (180 measurements); the paper loss
J = 100 mean |S/S0_ref - T|^2 ("reference" normalisation) with targets T = the ground truth's
signals and S0_ref its b = 0 signal (examples/paper_torus.toml through
`spinverse_fem.inverse.case.Case`, which simulates exactly these targets; the misfit is
`case.misfit(...)`, a `ReducedMisfit` with the library's default tolerances unless stated).

Part 1 (scaling), n in --sizes on each of --ranks: kappa = ground truth x exp(0.3 N(0, 1))
(seeded, every face); a fixed mode count K = the [eigen] rule at that kappa (lambda <=
D pi^2 / (2 um)^2) capped at --cap and moved down to a spectral gap (relative gap >= 1e-3).
Default cap 80: about the n = 4 rule count (79), so K is the same at every size and the ratio
isolates the dependence on the grid (--cap 300 runs the "rule capped at 300" variant).
Measured: wall and CPU seconds of J alone and of J + dJ/dkappa, their ratio (target <= 3 and
no growth with the number of faces), linear solves (the eigen-solve's shift-and-invert solves,
the adjoint's right-hand sides through its preconditioner, CG iterations), the seconds per
phase, and the adjoint part alone with adjoint_rtol = 1e-6.

Part 2 (paper start, one core): n = 4, kappa = 1 um/ms on every face (the l = 2 um rule gives
911 modes). Reference: the eigenbasis cut at the spectral gap at or below 500 modes. Finds the
smallest K (at a gap) whose 10/60 and 10/20 signals are within 1e-4 of the reference (and
reports 5/6), then times one J + gradient for the first curriculum stage (10/60 only) with the
library defaults and with legitimate settings (adjoint CG tolerance, Taylor tolerance, SLEPc
options through the PETSc options database); target: under 2 s on one core with signals within
1e-4 of the reference.

Part 3 (finite differences, same runs): central differences in log kappa on --fd-faces seeded
faces (two J evaluations each), per-face time extrapolated to all faces, agreement with the
adjoint (dJ/dlog kappa_f = kappa_f dJ/dkappa_f), at the paper start and in part 1 for
--fd-sizes (one rank).

Units: seconds (wall: perf_counter between barriers; CPU: process time summed over ranks),
J dimensionless, gradients in 1/(um/ms), signal errors relative to the reference b = 0 signal.

How to run (the driver is a serial process; it starts every configuration itself as
`mpiexec -n <r> python benchmarks/gradient.py --worker ...`, with OMP_NUM_THREADS=1):

    python benchmarks/gradient.py [--sizes 4 8 12] [--ranks 1 2] [--cap 80] [--fd-sizes 4]
                                  [--fd-faces 20] [--no-paper] [--paper-variants KEY ...]
                                  [--repeats 3] [--out benchmarks/results/gradient.json]
    # smallest check (seconds), results kept out of benchmarks/results/:
    python benchmarks/gradient.py --sizes 4 --ranks 1 --repeats 1 --fd-faces 4 \\
        --paper-variants defaults --out /tmp/gradient.json
    # one configuration directly under MPI (prints one "RESULT {json}" line; --out writes it):
    mpiexec -n 2 python benchmarks/gradient.py --worker scaling --n 4 --repeats 1

Timing (public hooks only; no library name is replaced): the phase seconds are the misfit's
own `counters.timings` (eigen: L assembly + eigen-solve incl. inertia checks; projection;
propagation; propagation_vjp; adjoint_solve: preconditioner factorisation + complement CG;
sensitivity: face assembly; "other" = the rest of the call), on rank 0; the solve counts are
`counters` deltas and PETSc log events (EPSSolve, MatSolve, MatMatSolve, MatCholFctrSym/Num:
count and seconds per call; factorisations include the inertia checks). A cold call starts from
an empty forward cache: the misfit caches the forward state of the last kappa it saw, so a cold
call alternates between kappa and its twin (kappa with face 0 moved up by one ulp; the results
differ by round-off) and the counters confirm that exactly one eigen-solve ran (none for a warm,
adjoint-only call). The best wall time of --repeats calls is kept (the machine may be shared)
with its CPU time beside it. The first gradient of a misfit also builds its face-sensitivity
form (~0.01 s at n = 4), which a best-of-several hides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from harness import driver_refused_under_mpiexec, report_worker

HERE = Path(__file__).resolve().parent
RATIO_TARGET = 3.0
PAPER_SECONDS_TARGET = 2.0
SIGNAL_TOL = 1e-4
GROWTH_TOL = 0.1        # "no growth": log-log slope of the ratio in the number of faces
K_CAP = 80              # part 1 default: about the n = 4 rule count, the same K at every size
MIN_REL_GAP = 1e-3      # part 1: K at a relative eigenvalue gap at least this wide
WIDE_REL_GAP = 1e-2     # part 2: the "well separated" K (faster adjoint CG)
FD_FACES = 20
FD_STEP = 1e-3          # central difference step in log kappa
PHASES = ("eigen", "projection", "propagation", "propagation_vjp", "adjoint_solve",
          "sensitivity")
PETSC_EVENTS = ("EPSSolve", "MatSolve", "MatMatSolve", "MatCholFctrSym", "MatCholFctrNum")

#: part 2 settings: key -> (name, K choice, misfit options, PETSc options)
PAPER_VARIANTS = {
    "defaults_kmin": ("library defaults, K_min", "min", {}, {}),
    "defaults": ("library defaults", "wide", {}, {}),
    "rtol_1e-11": ("adjoint_rtol 1e-11 (the earlier default)", "wide",
                   dict(adjoint_rtol=1e-11), {}),
    "rtol_1e-6": ("adjoint_rtol 1e-6", "wide", dict(adjoint_rtol=1e-6), {}),
    "rtol_1e-4": ("adjoint_rtol 1e-4", "wide", dict(adjoint_rtol=1e-4), {}),
    "taylor": ("Taylor tol 2^-30", "wide", dict(taylor_tol=2.0**-30), {}),
    "eps_tol": ("EPS tol 1e-8", "wide", {}, {"spinverse_eps_tol": "1e-8"}),
    "eps_ncv": ("EPS ncv 2K, mpd K", "wide", {}, "ncv"),
    "combined": ("combined: rtol 1e-4, Taylor 2^-30, EPS tol 1e-8", "wide",
                 dict(adjoint_rtol=1e-4, taylor_tol=2.0**-30), {"spinverse_eps_tol": "1e-8"}),
    "combined_kmin": ("combined, K_min", "min", dict(adjoint_rtol=1e-4, taylor_tol=2.0**-30),
                      {"spinverse_eps_tol": "1e-8"}),
}

# -------------------------------------------------------------------------------------------
# worker side
# -------------------------------------------------------------------------------------------


def paper_config(n: int, max_modes: int | None = None):
    """examples/paper_torus.toml on the n-cube grid of the same box (and another mode cap)."""
    from spinverse_fem.config import load_config

    cfg = load_config(HERE.parent / "examples" / "paper_torus.toml")
    cfg = dataclasses.replace(cfg, grid=dataclasses.replace(cfg.grid, cubes=n,
                                                            cube_um=80.0 / 3.0 / n))
    if max_modes is not None:
        cfg = dataclasses.replace(cfg, eigen=dataclasses.replace(cfg.eigen, max_modes=max_modes))
    return cfg


def set_petsc_options(opts: dict):
    from petsc4py import PETSc

    o = PETSc.Options()
    for k, v in opts.items():
        o.setValue(k, v)


def clear_petsc_options(opts: dict):
    from petsc4py import PETSc

    o = PETSc.Options()
    for k in opts:
        o.delValue(k)


def petsc_events() -> dict:
    """Cumulative (count, seconds) of the PETSc log events this benchmark reports (this rank)."""
    from petsc4py import PETSc

    out = {}
    for name in PETSC_EVENTS:
        info = PETSc.Log.Event(name).getPerfInfo()
        out[name] = (int(info["count"]), float(info["time"]))
    return out


class Probe:
    """A misfit evaluated at kappa or at its twin (face 0 one ulp up), through the public API.

    `cached` is the point whose forward state the misfit holds after the calls made here; a
    cold call uses the other point, a warm call the cached one. The misfit's counters check it.
    """

    def __init__(self, misfit, kappa):
        import numpy as np

        self.misfit = misfit
        self.kappa = np.array(kappa, dtype=np.float64)
        self.twin = self.kappa.copy()
        self.twin[0] = np.nextafter(self.twin[0], np.inf)
        self.cached = None

    @property
    def comm(self):
        return self.misfit.comm

    def cost(self, kappa) -> float:
        value = self.misfit.cost(kappa)
        self.cached = kappa.tobytes()
        return value

    def cost_and_gradient(self, kappa):
        out = self.misfit.cost_and_gradient(kappa)
        self.cached = kappa.tobytes()
        return out

    def signals(self, kappa) -> list:
        out = self.misfit.signals(kappa)
        self.cached = kappa.tobytes()
        return out

    def cold_point(self):
        return self.twin if self.cached == self.kappa.tobytes() else self.kappa


def timed_call(probe: Probe, which: str, cold: bool = True):
    """One J ("cost") or J + gradient ("cost_and_gradient") from an empty forward
    cache (cold) or with the forward state of kappa cached (warm: the adjoint part alone).
    Returns (value, grad or None, record)."""
    from mpi4py import MPI

    misfit, comm = probe.misfit, probe.comm
    if cold:
        point = probe.cold_point()
    else:
        point = probe.kappa
        if probe.cached != point.tobytes():
            probe.cost(point)                           # untimed: the forward into the cache
    c = misfit.counters
    t0 = dict(c.timings)
    n0 = (c.eigen_solves, c.linear_solves, c.cg_iterations)
    ev0 = petsc_events()
    comm.Barrier()
    w, cpu0 = time.perf_counter(), time.process_time()
    if which == "cost":
        value, grad = misfit.cost(point), None
    else:
        value, grad = misfit.cost_and_gradient(point)
    cpu = time.process_time() - cpu0
    comm.Barrier()
    wall = time.perf_counter() - w
    probe.cached = point.tobytes()
    ev1 = petsc_events()
    solved = c.eigen_solves - n0[0]
    if solved != (1 if cold else 0):
        raise RuntimeError(f"a {'cold' if cold else 'warm'} call ran {solved} eigen-solves")
    stages = {p: round(c.timings.get(p, 0.0) - t0.get(p, 0.0), 4) for p in PHASES}
    stages["other"] = round(wall - sum(stages.values()), 4)
    ev = {k: dict(count=ev1[k][0] - ev0[k][0], seconds=round(ev1[k][1] - ev0[k][1], 4))
          for k in PETSC_EVENTS}
    rec = dict(wall=wall, cpu_all_ranks=comm.allreduce(cpu, op=MPI.SUM), stages=stages,
               petsc_events=ev,
               eigen_linear_solves=ev["MatSolve"]["count"],
               eps_solves=ev["EPSSolve"]["count"],
               factorisations=ev["MatCholFctrNum"]["count"],
               adjoint_linear_solves=int(c.linear_solves - n0[1]),
               adjoint_cg_iterations=int(c.cg_iterations - n0[2]))
    rec["linear_solves_total"] = rec["eigen_linear_solves"] + rec["adjoint_linear_solves"]
    return value, grad, rec


def best_of(probe, which, repeats, cold=True):
    recs, out = [], None
    for _ in range(repeats):
        value, grad, rec = timed_call(probe, which, cold)
        recs.append(rec)
        out = (value, grad)
    best = dict(min(recs, key=lambda r: r["wall"]))
    best["wall_all_repeats"] = [round(r["wall"], 4) for r in recs]
    best["cpu_all_repeats"] = [round(r["cpu_all_ranks"], 4) for r in recs]
    best["wall"] = round(best["wall"], 4)
    best["cpu_all_ranks"] = round(best["cpu_all_ranks"], 4)
    best["cpu_min"] = round(min(r["cpu_all_ranks"] for r in recs), 4)
    return out[0], out[1], best


def fd_check(probe: Probe, grad, faces, step=FD_STEP):
    """Central differences of J in log kappa on `faces` against the adjoint gradient."""
    import numpy as np
    from mpi4py import MPI

    comm, kappa = probe.comm, probe.kappa
    fd = np.zeros(len(faces))
    comm.Barrier()
    w, c = time.perf_counter(), time.process_time()
    for i, f in enumerate(faces):
        vals = []
        for sgn in (1.0, -1.0):
            k = kappa.copy()
            k[f] *= np.exp(sgn * step)
            vals.append(probe.cost(k))
        fd[i] = (vals[0] - vals[1]) / (2.0 * step)
    comm.Barrier()
    wall = time.perf_counter() - w
    cpu = comm.allreduce(time.process_time() - c, op=MPI.SUM)
    adj = kappa[faces] * grad[faces]
    scale = float(np.max(np.abs(adj)))
    per_face = np.abs(fd - adj) / np.maximum(np.abs(adj), 1e-300)
    big = np.abs(adj) >= 1e-3 * scale
    F = kappa.size
    return dict(
        faces=[int(f) for f in faces], step_log_kappa=step,
        fd_dJ_dlogk=fd.tolist(), adjoint_dJ_dlogk=adj.tolist(),
        rel_error_norm=float(np.linalg.norm(fd - adj) / np.linalg.norm(adj)),
        rel_error_max_per_face=float(np.max(per_face[big])) if np.any(big) else None,
        faces_in_max=int(np.sum(big)),
        abs_error_max_over_max_adjoint=float(np.max(np.abs(fd - adj)) / scale),
        wall_checked_faces=round(wall, 3), cpu_checked_faces_all_ranks=round(cpu, 3),
        wall_per_face=round(wall / len(faces), 4),
        objective_evaluations=2 * len(faces),
        extrapolated_wall_all_faces=round(wall / len(faces) * F, 1),
        extrapolated_cpu_all_faces=round(cpu / len(faces) * F, 1),
        num_faces=int(F))


def pick_faces(phantom, seed=0, count=FD_FACES):
    """Seeded faces: the membrane, interior open faces and (robin) outer faces all represented."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fc = phantom.faces
    groups = [np.flatnonzero(phantom.membrane), np.flatnonzero(fc.interior & ~phantom.membrane),
              np.flatnonzero(fc.outer & ~phantom.membrane)]
    share = [count // 2, count - count // 2 - count // 5, count // 5]
    out = []
    for g, s in zip(groups, share):
        out.extend(rng.choice(g, size=min(s, g.size), replace=False).tolist())
    return sorted(out)


def gap_count(lam, k_max, min_rel_gap):
    """Largest k <= k_max with (lam[k] - lam[k-1]) >= min_rel_gap * lam[k] (lam ascending)."""
    for k in range(min(k_max, lam.size - 1), 0, -1):
        if lam[k] - lam[k - 1] >= min_rel_gap * max(abs(lam[k]), 1e-300):
            return k
    return None


def worker_scaling(n: int, repeats: int, fd: bool, cap: int = K_CAP,
                   fd_faces: int = FD_FACES) -> dict:
    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI
    from petsc4py import PETSc

    PETSc.Log.begin()
    from spinverse_fem.inverse.case import Case

    comm = MPI.COMM_WORLD
    cfg = paper_config(n, max_modes=cap)
    iseq = cfg.sequence_index("10/60")
    comm.Barrier()
    t0 = time.perf_counter()
    case = Case(comm, cfg)
    case.targets                  # ground-truth signals (the rule capped at cap), S/S0_gt
    phantom, forward = case.phantom, case.forward
    F = phantom.faces.num_faces
    k_gt = case.num_modes_at(phantom.kappa)
    # evaluation point and its mode count (rule at kappa, capped, at a gap)
    rng = np.random.default_rng(0)
    kappa = phantom.kappa * np.exp(0.3 * rng.standard_normal(F))
    b = forward.eigenbasis(kappa)
    lam_all = np.concatenate([b.lam, b.extra_lam])
    K = gap_count(lam_all, min(b.cutoff_count, cap), MIN_REL_GAP) or b.num_modes
    comm.Barrier()
    setup = time.perf_counter() - t0
    misfit = case.misfit([iseq], num_modes=K)
    probe = Probe(misfit, kappa)
    J1, _, rec_obj = best_of(probe, "cost", repeats)
    J2, grad, rec_grad = best_of(probe, "cost_and_gradient", repeats)
    out = dict(n=n, ranks=comm.size, tets=int(phantom.grid.num_tets),
               dofs=int(forward.space.num_dofs_global), faces=int(F),
               kappa="ground truth x exp(0.3 N(0,1)), seed 0",
               modes=int(K), mode_cap=int(cap), rule_count=int(b.cutoff_count),
               rel_gap_at_K=float((lam_all[K] - lam_all[K - 1]) / lam_all[K]),
               target_modes_ground_truth=k_gt, weight=misfit.weight,
               normalisation=misfit.normalisation, adjoint_rtol=misfit.adjoint_rtol,
               objective=J1,
               objective_consistent=bool(abs(J1 - J2) <= 1e-12 * max(abs(J1), 1e-300)),
               setup_seconds=round(setup, 2), J=rec_obj, J_and_gradient=rec_grad,
               ratio_wall=round(rec_grad["wall"] / rec_obj["wall"], 3),
               ratio_cpu=round(rec_grad["cpu_all_ranks"] / rec_obj["cpu_all_ranks"], 3),
               gradient_norm=float(np.linalg.norm(grad)),
               counters=dataclasses.asdict(misfit.counters))
    out["fd_extrapolated_wall_all_faces"] = round(2 * F * rec_obj["wall"], 1)
    # a looser adjoint CG tolerance: a second misfit; one untimed J + gradient builds it and
    # caches the forward state, then the adjoint part alone is timed and added to the J time
    rtol = 1e-6
    loose = Probe(case.misfit([iseq], num_modes=K, adjoint_rtol=rtol), kappa)
    loose.cost_and_gradient(kappa)
    _, g2, rec2 = best_of(loose, "cost_and_gradient", 1, cold=False)
    w2 = rec_obj["wall"] + rec2["wall"]
    c2 = rec_obj["cpu_all_ranks"] + rec2["cpu_all_ranks"]
    out["adjoint_rtol_1e-6"] = dict(
        adjoint_rtol=rtol, adjoint_only=rec2, J_and_gradient_wall=round(w2, 4),
        J_and_gradient_cpu=round(c2, 4), ratio_wall=round(w2 / rec_obj["wall"], 3),
        ratio_cpu=round(c2 / rec_obj["cpu_all_ranks"], 3),
        gradient_rel_change=float(np.linalg.norm(g2 - grad) / np.linalg.norm(grad)))
    if fd:
        out["finite_differences"] = fd_check(probe, grad, pick_faces(phantom, count=fd_faces))
    case.destroy()
    return out


def worker_paper(repeats: int, keys: list[str], fd_faces: int = FD_FACES) -> dict:
    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI
    from petsc4py import PETSc

    PETSc.Log.begin()
    from spinverse_fem.forward.eigenbasis import inertia_count
    from spinverse_fem.forward.reduced_model import ReducedSystem, project, propagator
    from spinverse_fem.inverse.case import Case

    comm = MPI.COMM_WORLD
    cfg = paper_config(4)
    seqs = {s.name: s for s in cfg.sequences}
    case = Case(comm, cfg)
    stage = case.stages[0]                         # the first curriculum stage: 10/60 alone
    if [cfg.sequences[i].name for i in stage.sequences] != ["10/60"]:
        raise RuntimeError(f"first stage fits {stage.sequences}, expected 10/60 alone")
    i1060 = stage.sequences[0]
    tg = case.targets                              # ground truth (rule: 79 modes), S/S0_gt
    s0_gt = float(tg.s0[i1060])
    phantom, forward = case.phantom, case.forward
    F = phantom.faces.num_faces
    out = dict(n=4, ranks=comm.size, faces=int(F), dofs=int(forward.space.num_dofs_global),
               kappa="1 um/ms on every face (the paper's start)")

    # reference spectrum at the start: 520 modes, cut at the gap at or below 500
    kappa = case.start_kappa()
    t = time.perf_counter()
    basis = forward.eigenbasis(kappa, 520)
    rule = inertia_count(forward.ops.L, forward.ops.M, forward.lam_max)
    system = project(forward.ops, basis)
    lam = basis.lam
    rel_gap = np.zeros(lam.size)
    rel_gap[:-1] = (lam[1:] - lam[:-1]) / lam[1:]      # gap after the first k+1 modes
    gaps = [k for k in range(1, lam.size) if rel_gap[k - 1] > 1e-8]
    k_ref = max(k for k in gaps if k <= 500)

    def signals(K, seq):
        sub = ReducedSystem(lam=system.lam[:K], W=system.W[:, :K, :K], nu0=system.nu0[:K],
                            readout=None if system.readout is None else system.readout[:K],
                            volume=system.volume)
        return propagator(sub, seq).signals()

    ref = {name: signals(k_ref, s) for name, s in seqs.items()}
    s0_ref = {name: float(ref[name][0].real) for name in seqs}   # row 0 is b = 0

    def err(K, name):
        return float(np.max(np.abs(signals(K, seqs[name]) - ref[name])) / s0_ref[name])

    scan = []
    k_min = None
    for K in gaps:
        if K < 20 or K > k_ref:
            continue
        e1 = err(K, "10/60")
        e2 = err(K, "10/20") if e1 <= SIGNAL_TOL else None
        scan.append(dict(K=K, rel_gap=float(rel_gap[K - 1]), err_10_60=e1, err_10_20=e2))
        if e2 is not None and e2 <= SIGNAL_TOL:
            k_min = K
            break
    if k_min is None:
        raise RuntimeError(f"no K <= {k_ref} reaches signal errors <= {SIGNAL_TOL:g}")
    k_wide = next(K for K in gaps if K >= k_min and rel_gap[K - 1] >= WIDE_REL_GAP
                  and err(K, "10/60") <= SIGNAL_TOL and err(K, "10/20") <= SIGNAL_TOL)
    errs = {K: {name: err(K, name) for name in seqs} for K in sorted({k_min, k_wide, 300})}
    out.update(rule_count=int(rule), reference_modes=int(k_ref),
               reference_rel_gap=float(rel_gap[k_ref - 1]),
               rel_gap_at_500=float(rel_gap[499]),
               smallest_K_within_tol=int(k_min), K_wide_gap=int(k_wide),
               rel_gap={str(K): float(rel_gap[K - 1]) for K in errs},
               signal_error_vs_reference={str(K): v for K, v in errs.items()},
               scan_K_ge_240=[s for s in scan if s["K"] >= 240],
               spectrum_seconds=round(time.perf_counter() - t, 2),
               signal_error_definition="max_c |S_K,c - S_ref,c| / S_ref(b=0), per sequence")
    ref_norm = ref["10/60"] / s0_gt            # the reference in the misfit's normalisation

    results, base_grad, fd_probe, fd_grad = [], {}, None, None
    for key in keys:
        name, kchoice, mopts, popts = PAPER_VARIANTS[key]
        K = k_min if kchoice == "min" else k_wide
        if popts == "ncv":
            popts = {"spinverse_eps_ncv": str(2 * K + 16), "spinverse_eps_mpd": str(K + 8)}
        set_petsc_options(popts)
        try:
            misfit = case.misfit([i1060], num_modes=K, **mopts)
            probe = Probe(misfit, kappa)
            _, _, rec_obj = best_of(probe, "cost", repeats)
            J2, grad, rec_grad = best_of(probe, "cost_and_gradient", repeats)
            sig = probe.signals(kappa)[0]
        finally:
            clear_petsc_options(popts)
        e = float(np.max(np.abs(sig - ref_norm)) * s0_gt / s0_ref["10/60"])
        rec = dict(key=key, name=name, K=K, misfit_options=mopts, petsc=popts,
                   adjoint_rtol=misfit.adjoint_rtol, taylor_tol=misfit.taylor_tol,
                   objective=J2, J=rec_obj, J_and_gradient=rec_grad,
                   ratio_wall=round(rec_grad["wall"] / rec_obj["wall"], 3),
                   signal_error_10_60=e, signals_within_tol=bool(e <= SIGNAL_TOL),
                   seconds_target=PAPER_SECONDS_TARGET,
                   wall_target_met=bool(rec_grad["wall"] < PAPER_SECONDS_TARGET),
                   cpu_target_met=bool(rec_grad["cpu_min"] < PAPER_SECONDS_TARGET))
        rec["met"] = rec["signals_within_tol"] and rec["wall_target_met"]
        rec["met_on_cpu_time"] = rec["signals_within_tol"] and rec["cpu_target_met"]
        if K not in base_grad:       # the first variant at this K (defaults when selected)
            base_grad[K] = grad
            rec["gradient_rel_change_vs_defaults"] = 0.0
        else:
            g0 = base_grad[K]
            rec["gradient_rel_change_vs_defaults"] = float(np.linalg.norm(grad - g0)
                                                           / np.linalg.norm(g0))
        if fd_probe is None or key == "defaults":
            fd_probe, fd_grad, fd_key = probe, grad, key
        results.append(rec)
    out["variants"] = results
    # part 3: central differences with the library defaults at K_wide (if run)
    out["finite_differences"] = fd_check(fd_probe, fd_grad,
                                         pick_faces(phantom, count=fd_faces))
    out["finite_differences"]["variant"] = fd_key
    out["finite_differences"]["adjoint_wall_J_and_gradient"] = next(
        r["J_and_gradient"]["wall"] for r in results if r["key"] == fd_key)
    case.destroy()
    return out


# -------------------------------------------------------------------------------------------
# driver
# -------------------------------------------------------------------------------------------

def run_worker(args: list[str], ranks: int, timeout: int, env) -> tuple[dict | None, str]:
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    cmd = ["timeout", str(timeout), mpiexec, "-n", str(ranks), sys.executable, __file__] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return None, f"exit {proc.returncode}: {proc.stderr[-600:]}"
    return json.loads(line[0][7:]), ""


def fmt_stages(s: dict) -> str:
    return " ".join(f"{s[k]:6.2f}" for k in PHASES)


STAGE_HDR = " ".join(f"{h:>6}" for h in ("eig", "proj", "prop", "vjp", "adj", "sens"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[4, 8, 12])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--fd-sizes", type=int, nargs="*", default=[4],
                   help="sizes (1 rank) with a finite-difference check in part 1")
    p.add_argument("--fd-faces", type=int, default=FD_FACES,
                   help="faces of each finite-difference check (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats (best kept) at n = 4; one fewer at n <= 8, one above")
    p.add_argument("--cap", type=int, default=K_CAP,
                   help="part 1: mode cap (K = the rule at kappa, capped, at a gap)")
    p.add_argument("--no-paper", action="store_true", help="skip parts 2 and 3")
    p.add_argument("--paper-variants", nargs="+", choices=list(PAPER_VARIANTS),
                   default=list(PAPER_VARIANTS), help="part 2 settings to time (default: all)")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--out", help="JSON file (default benchmarks/results/gradient.json; a "
                                 "worker writes one only when given)")
    p.add_argument("--worker", choices=["scaling", "paper"],
                   help="run one configuration in this (MPI) process and print RESULT {json}")
    p.add_argument("--n", type=int, default=4, help="--worker scaling: cubes per side")
    p.add_argument("--fd", action="store_true", help="--worker scaling: add the FD check")
    a = p.parse_args()
    if a.worker:
        if a.worker == "scaling":
            res = worker_scaling(a.n, a.repeats, a.fd, a.cap, a.fd_faces)
        else:
            res = worker_paper(a.repeats, a.paper_variants, a.fd_faces)
        return report_worker(res, a.out)
    if driver_refused_under_mpiexec("--worker"):
        return 2
    out_path = Path(a.out) if a.out else HERE / "results" / "gradient.json"

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    report = dict(
        description=__doc__.split("\n\n")[0],
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                     blas_threads_per_rank=1, loadavg_before=list(load0)),
        targets=dict(ratio_J_and_gradient_over_J=RATIO_TARGET,
                     ratio_growth_loglog_slope_max=GROWTH_TOL,
                     paper_start_J_and_gradient_seconds_one_core=PAPER_SECONDS_TARGET,
                     signal_tolerance=SIGNAL_TOL),
        arguments={k: v for k, v in vars(a).items() if k not in ("worker", "n", "fd")},
        notes=("times: best wall of the repeats (shared machine), CPU summed over ranks of the "
               "same call; every call recomputes the eigenbasis (empty forward cache, checked "
               "with the misfit's counters); stages: the misfit's counters.timings per phase "
               "(rank 0), other = the rest of the call; linear solves: eigen = PETSc MatSolve "
               "calls of the eigen-solve (incl. inertia-repair solves), adjoint = the misfit's "
               "counters.linear_solves (right-hand sides through the MUMPS preconditioner); "
               "petsc_events: count and seconds of PETSc log events per call (rank 0)"),
        scaling=[])

    # part 1
    print("Part 1: J vs J + gradient (one sequence 10/60, 180 measurements, kappa = perturbed "
          "ground truth)")
    hdr = (f"{'n':>3} {'rk':>2} {'faces':>6} {'dofs':>6} {'K':>4} {'J s':>7} {'J+g s':>7} "
           f"{'ratio':>5} {'rCPU':>5} {'cpuJ':>7} {'cpuJ+g':>7} {'eigLS':>6} {'adjLS':>6} "
           f"{'CGit':>4} | {STAGE_HDR} | {'r1e-6':>5} | target")
    print(hdr, flush=True)
    for n in a.sizes:
        for r in a.ranks:
            reps = max(1, a.repeats - (n > 4) - (n > 8))
            args = ["--worker", "scaling", "--n", str(n), "--repeats", str(reps),
                    "--cap", str(a.cap), "--fd-faces", str(a.fd_faces)]
            if n in a.fd_sizes and r == 1:
                args.append("--fd")
            res, msg = run_worker(args, r, a.timeout, env)
            if res is None:
                print(f"{n:>3} {r:>2} FAILED ({msg})", flush=True)
                report["scaling"].append(dict(n=n, ranks=r, failed=True, message=msg))
                continue
            res["ratio_target_met"] = bool(res["ratio_wall"] <= RATIO_TARGET)
            res["ratio_target_met_cpu"] = bool(res["ratio_cpu"] <= RATIO_TARGET)
            report["scaling"].append(res)
            jo, jg = res["J"], res["J_and_gradient"]
            print(f"{n:>3} {r:>2} {res['faces']:>6} {res['dofs']:>6} {res['modes']:>4} "
                  f"{jo['wall']:>7.2f} {jg['wall']:>7.2f} {res['ratio_wall']:>5.2f} "
                  f"{res['ratio_cpu']:>5.2f} "
                  f"{jo['cpu_all_ranks']:>7.2f} {jg['cpu_all_ranks']:>7.2f} "
                  f"{jg['eigen_linear_solves']:>6} {jg['adjoint_linear_solves']:>6} "
                  f"{jg['adjoint_cg_iterations']:>4} | {fmt_stages(jg['stages'])} | "
                  f"{res['adjoint_rtol_1e-6']['ratio_wall']:>5.2f} | "
                  f"ratio <= {RATIO_TARGET:g} wall/cpu: "
                  f"{'met' if res['ratio_target_met'] else 'MISSED'}/"
                  f"{'met' if res['ratio_target_met_cpu'] else 'MISSED'}",
                  flush=True)
    import numpy as np

    growth = {}
    for r in a.ranks:
        for key in ("ratio_wall", "ratio_cpu"):
            pts = [(x["faces"], x[key]) for x in report["scaling"]
                   if x.get("ranks") == r and not x.get("failed")]
            if len(pts) >= 2:
                slope = float(np.polyfit(*np.log(np.array(pts)).T, 1)[0])
                growth[f"{r} ranks, {key}"] = dict(loglog_slope=round(slope, 3),
                                                   met=bool(slope <= GROWTH_TOL))
    report["ratio_growth_in_faces"] = growth
    ok = [x for x in report["scaling"] if not x.get("failed")]
    report["ratio_target_met_all"] = bool(ok) and all(x["ratio_target_met"] for x in ok) \
        and len(ok) == len(report["scaling"])
    report["ratio_target_met_all_cpu"] = bool(ok) and all(x["ratio_target_met_cpu"] for x in ok) \
        and len(ok) == len(report["scaling"])
    if a.sizes:
        print("(ratio: best wall J+g / best wall J; rCPU: the same in CPU seconds summed over "
              "ranks; eigLS/adjLS: linear solves of the eigen-solve / the adjoint; CGit: "
              "adjoint block-CG iterations; stages: seconds per phase of the J+g call, from "
              "the misfit's counters.timings)")
        print("(r1e-6: wall ratio (J + adjoint part timed with the forward cached) / J with "
              "adjoint_rtol = 1e-6)")
        print(f"ratio growth with the number of faces (log-log slope, target <= {GROWTH_TOL}): "
              f"{growth}")
        print("FD extrapolated to all faces (2 F x J wall) vs adjoint J+g wall:")
    for x in ok:
        print(f"   n {x['n']:>2} ranks {x['ranks']}: FD ~ "
              f"{x['fd_extrapolated_wall_all_faces']:.0f} s"
              f" ({x['faces']} faces) vs adjoint {x['J_and_gradient']['wall']:.2f} s")
        if "finite_differences" in x:
            fdr = x["finite_differences"]
            print(f"      FD on {len(fdr['faces'])} faces: {fdr['wall_checked_faces']:.1f} s, "
                  f"per face {fdr['wall_per_face']:.2f} s -> all {fdr['num_faces']} faces "
                  f"{fdr['extrapolated_wall_all_faces']:.0f} s; agreement: rel (norm) "
                  f"{fdr['rel_error_norm']:.2e}, max per face {fdr['rel_error_max_per_face']:.2e}")

    # parts 2 and 3
    if not a.no_paper:
        print("\nPart 2: paper start (n = 4, kappa = 1 um/ms), one core, stage 1 (10/60, 180 "
              "measurements)")
        res, msg = run_worker(["--worker", "paper", "--repeats", str(a.repeats),
                               "--fd-faces", str(a.fd_faces), "--paper-variants",
                               *a.paper_variants], 1, a.timeout, env)
        if res is None:
            print(f"FAILED ({msg})")
            report["paper_start"] = dict(failed=True, message=msg)
        else:
            report["paper_start"] = res
            print(f"rule count (l = 2 um): {res['rule_count']}; reference: {res['reference_modes']}"
                  f" modes (gap at or below 500; relative gap at 500: {res['rel_gap_at_500']:.1e})")
            print(f"smallest K within {SIGNAL_TOL:g} for 10/60 and 10/20: "
                  f"{res['smallest_K_within_tol']}; K at a wide gap (>= {WIDE_REL_GAP:g}): "
                  f"{res['K_wide_gap']}")
            for K, e in res["signal_error_vs_reference"].items():
                print(f"   K = {K:>3} (rel gap {res['rel_gap'][K]:.1e}): " +
                      ", ".join(f"{k} {v:.2e}" for k, v in e.items()))
            print(f"{'variant':<50} {'K':>4} {'J s':>6} {'J+g s':>6} {'cpu':>6} {'CGit':>4} "
                  f"{'sig err':>8} {'dgrad':>8} | {STAGE_HDR} | < {PAPER_SECONDS_TARGET:g} s "
                  f"wall/cpu")
            for v in res["variants"]:
                jg = v["J_and_gradient"]
                print(f"{v['name']:<50} {v['K']:>4} {v['J']['wall']:>6.2f} {jg['wall']:>6.2f} "
                      f"{jg['cpu_min']:>6.2f} {jg['adjoint_cg_iterations']:>4} "
                      f"{v['signal_error_10_60']:>8.1e} "
                      f"{v['gradient_rel_change_vs_defaults']:>8.1e} | {fmt_stages(jg['stages'])}"
                      f" | {'met' if v['met'] else 'MISSED'}/"
                      f"{'met' if v['met_on_cpu_time'] else 'MISSED'}")
            fdr = res["finite_differences"]
            print(f"\nPart 3: central FD (log kappa, step {fdr['step_log_kappa']:g}) on "
                  f"{len(fdr['faces'])} faces at the paper start ({fdr['variant']}): "
                  f"{fdr['wall_checked_faces']:.1f} s ({fdr['wall_per_face']:.2f} s per face) "
                  f"-> all {fdr['num_faces']} faces ~ {fdr['extrapolated_wall_all_faces']:.0f} s "
                  f"vs adjoint J+g {fdr['adjoint_wall_J_and_gradient']:.2f} s; FD vs adjoint: "
                  f"rel (norm) {fdr['rel_error_norm']:.2e}, max per face "
                  f"{fdr['rel_error_max_per_face']:.2e}")
            report["paper_target_met_defaults"] = next(
                (v["met"] for v in res["variants"] if v["key"] == "defaults"), None)
            report["paper_target_met_library_variants"] = [
                v["name"] for v in res["variants"] if v["met"]]
            report["paper_target_met_on_cpu_time_library_variants"] = [
                v["name"] for v in res["variants"] if v["met_on_cpu_time"]]
            print("(J+g cpu: the smallest CPU time of the repeats; dgrad: relative change of "
                  "the gradient against the first variant at the same K; verdict: wall / CPU)")
    paper = report.get("paper_start", {})
    ran = "variants" in paper
    report["summary"] = dict(
        ratio_le_3_every_size_wall=report["ratio_target_met_all"],
        ratio_le_3_every_size_cpu=report["ratio_target_met_all_cpu"],
        ratio_no_growth=({k: v["met"] for k, v in growth.items()}),
        paper_start_under_2s_library_defaults=report.get("paper_target_met_defaults"),
        paper_start_under_2s_library_any_setting=bool(
            report.get("paper_target_met_library_variants")) if ran else None,
        paper_start_under_2s_library_any_setting_cpu=bool(
            report.get("paper_target_met_on_cpu_time_library_variants")) if ran else None,
        smallest_K_within_signal_tol=paper.get("smallest_K_within_tol"),
        fd_vs_adjoint_rel_error_paper_start=paper.get("finite_differences", {}).get(
            "rel_error_norm"))
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    report["total_wall_seconds"] = round(time.perf_counter() - t_start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path} ({report['total_wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
