"""Eigen-solve benchmark (issue 14, item 2): K modes of the Bloch-Torrey pencil on refined grids.

Setting (as benchmarks/forward.py): the paper's torus on the bcc grid of the 26.7 um box with n
cubes per side (a = 80/3/n um), D = 2 um^2/ms, ground-truth kappa (0.01 um/ms membrane, 100
um/ms elsewhere, robin outer faces), the cutoff rule l = 2 um capped at K modes
(`solve_eigenbasis(L, M, lam_max, max_modes=K)`). n = 12: 19 008 tets, 76 032 dofs, 676
eigenvalues below the cutoff, so K = 500 is capped. Targets: 500 modes at n = 12 from scratch
<= 30 s on one rank, >= 1.7x from one to two ranks.

Methods (`solve_eigenbasis(method=...)`, also -spinverse_eigen_method), each a "variant" here
(name=method[:option=value,...], the options go into the PETSc database for that run):
- krylovschur: SLEPc Krylov-Schur, one vector at a time, shift-and-invert (MUMPS Cholesky),
  mpd = min(max(nev, 32), 256), ncv = nev + mpd (the default; tuned variants via
  spinverse_eps_mpd / spinverse_eps_ncv).
- block: block Krylov-Schur (forward/block_krylov.py), p vectors per MUMPS MatMatSolve,
  Lanczos recurrence plus one full block Gram-Schmidt pass, thick restart (spinverse_bks_block,
  spinverse_bks_ncv).
- slicing: SLEPc spectrum slicing on [sigma, b) (forward/spectrum_slicing.py), b from inertia
  counts, one partition per rank (spinverse_eps_krylovschur_partitions, _nev).
- block_slicing: [sigma, b) cut into slices of ~128 pairs by inertia counts, each solved by
  the block method at its midpoint, whole slices divided over the ranks
  (forward/block_slicing.py; spinverse_bks_slices).
Every method ends with the same Sylvester inertia check; the run checks each variant against
the first one (eigenvalues, largest M-principal angle of the kept subspace).

Breakdown per variant (seconds, max over ranks): wall time of `solve_eigenbasis` and the CPU
time of the busiest rank (under load the CPU time is the closer estimate of the unloaded wall
time; it still includes the slowdown from shared memory bandwidth), PETSc/SLEPc
log events (EPSSolve, MatCholFctrSym/Num = factorisations incl. the inertia counts, MatSolve
= single-vector solves, MatMatSolve = block solves, BVOrthogonalizeV / BVDotVec / BVMultVec =
Gram-Schmidt of Krylov-Schur, BVMultInPlace = its restarts, DSSolve = its Rayleigh-Ritz), the
inertia counts (number, seconds) and the block method's own phases (solve, orth_gemm,
rayleigh_ritz, restart, ritz_vectors). Ratios are within one run (same process, same load).

Measured: see the "findings" entry of the JSON (benchmarks/results/eigensolve.json), written
with the load average before and after every run; a run is only timed when the 1-minute load
is below --max-load (default 0.6) unless --force.

How to run (the driver is serial and starts `mpiexec -n P python benchmarks/eigensolve.py
--worker ...` itself, OMP_NUM_THREADS=1, under `timeout`):

    python benchmarks/eigensolve.py --n 12 --modes 500 --ranks 1 2 \\
        --variants krylovschur block slicing [--out benchmarks/results/eigensolve.json]
    # small check under any load, results kept out of benchmarks/results/:
    python benchmarks/eigensolve.py --n 4 --modes 60 --ranks 1 --force --out /tmp/e.json
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

from harness import driver_refused_under_mpiexec, wait_for_quiet

HERE = Path(__file__).resolve().parent
TARGETS = dict(n=12, modes=500, one_rank_seconds=30.0, two_rank_speedup=1.7)
EVENTS = ["EPSSolve", "MatCholFctrSym", "MatCholFctrNum", "MatSolve", "MatMatSolve",
          "BVOrthogonalizeV", "BVDotVec", "BVMultVec", "BVMultInPlace", "DSSolve", "MatMult"]
DEFAULT_VARIANTS = ["krylovschur", "block", "slicing", "block_slicing"]


def parse_variant(text: str) -> tuple[str, str, dict]:
    """'name=method:opt=val,opt=val' | 'method' -> (name, method, options)."""
    head, _, opts = text.partition(":")
    name, method = head.split("=", 1) if "=" in head else (text, head)
    options = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    return name, method, options


def build(comm, n: int, modes: int):
    from spinverse_fem.config import load_config
    from spinverse_fem.forward.model import ForwardModel
    from spinverse_fem.geometry.phantom import build_phantom

    cfg = load_config(HERE.parent / "examples" / "paper_torus.toml")
    cfg = dataclasses.replace(
        cfg, grid=dataclasses.replace(cfg.grid, cubes=n, cube_um=80.0 / 3.0 / n),
        eigen=dataclasses.replace(cfg.eigen, max_modes=modes))
    phantom = build_phantom(cfg)
    model = ForwardModel(comm, phantom, cfg.physics, cfg.eigen)
    model.ops.set_kappa(phantom.kappa)
    return cfg, phantom, model


def worker(n: int, modes: int, variants: list[str]) -> dict:
    import warnings

    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI
    from petsc4py import PETSc

    PETSc.Log.begin()
    from spinverse_fem.forward.eigenbasis import gram, solve_eigenbasis

    comm = MPI.COMM_WORLD
    cfg, phantom, model = build(comm, n, modes)
    L, M = model.ops.L, model.ops.M

    def events():
        out = {}
        for e in EVENTS:
            info = PETSc.Log.Event(e).getPerfInfo()
            out[e] = (int(info["count"]), float(info["time"]))
        return out

    runs = []
    ref = None
    opts = PETSc.Options()
    for text in variants:
        name, method, options = parse_variant(text)
        for k, v in options.items():
            opts[k] = v
        e0 = events()
        load0 = os.getloadavg()[0]
        comm.Barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            basis = solve_eigenbasis(L, M, lam_max=model.lam_max, max_modes=modes,
                                     tol=cfg.eigen.tolerance, method=method)
        cpu = comm.allreduce(time.process_time() - c0, op=MPI.MAX)
        comm.Barrier()
        wall = time.perf_counter() - t0
        e1 = events()
        for k in options:
            opts.delValue(k)
        ev = {}
        for e in EVENTS:
            c = e1[e][0] - e0[e][0]
            if c:
                ev[e] = dict(count=c, seconds=round(comm.allreduce(e1[e][1] - e0[e][1],
                                                                   op=MPI.MAX), 3))
        info = basis.info
        run = dict(variant=name, method=info.get("method", method), options=options,
                   seconds=round(wall, 3), cpu_seconds_max_rank=round(cpu, 3),
                   modes=int(basis.num_modes),
                   cutoff_count=int(basis.cutoff_count), computed=int(basis.num_modes +
                                                                       basis.extra_lam.size),
                   inertia_counts=int(info.get("inertia_counts", 0)),
                   phases={k: round(float(v), 3) for k, v in info.get("seconds", {}).items()},
                   events=ev, load_1min_before=round(load0, 2),
                   load_1min_after=round(os.getloadavg()[0], 2))
        for key in ("solves", "restarts", "locked", "repaired", "fallback"):
            if key in info:
                run[key] = info[key]
        if "phases" in info:
            run["block_phases"] = {k: round(float(v), 3) for k, v in info["phases"].items()}
        if "block_slicing" in info:
            bs = info["block_slicing"]
            run["block_slicing"] = dict(slices=bs["slices"],
                                        counts=[x["count"] for x in bs["per_slice"]],
                                        phases={k: round(v, 3) for k, v in bs["phases"].items()})
        if "slicing" in info:
            run["slicing"] = dict(shifts=len(info["slicing"]["shifts"]),
                                  partitions=info["slicing"]["partitions"],
                                  interval=[round(float(x), 6) for x in info["interval"]])
        G = gram(basis.phi, M, basis.phi, comm)
        run["orthonormality"] = float(np.abs(G - np.eye(basis.num_modes)).max())
        if ref is None:
            ref = basis
        else:
            k = min(ref.num_modes, basis.num_modes)
            lam_ref = ref.lam[:k]
            run["max_rel_eig_diff"] = float(np.max(np.abs(basis.lam[:k] - lam_ref) /
                                                   np.maximum(np.abs(lam_ref),
                                                              1e-3 * lam_ref[-1])))
            C = gram(ref.phi[:, :k], M, basis.phi[:, :k], comm)
            R = basis.phi[:, :k] - ref.phi[:, :k] @ C
            G = gram(R, M, R, comm)
            run["max_sin_angle"] = float(np.sqrt(max(np.linalg.eigvalsh(0.5 * (G + G.T)).max(),
                                                     0.0)))
            run["same_count"] = bool(basis.num_modes == ref.num_modes)
        runs.append(run)
        if comm.rank == 0:
            print("VARIANT " + json.dumps(run), flush=True)
    # ratios within this run, against the default method when it ran
    base = next((r for r in runs if r["variant"] == "krylovschur"), runs[0])["seconds"]
    for r in runs:
        r["speedup_vs_krylovschur"] = round(base / r["seconds"], 3)
    return dict(n=n, ranks=comm.size, tets=int(phantom.grid.num_tets),
                dofs=int(model.space.num_dofs_global), lam_max=float(model.lam_max),
                modes_cap=modes, runs=runs)


def warm_worker(n: int, modes: int, methods: list[str], steps: int, step: float) -> dict:
    """Item 1 of the issue: a sequence of kappas as in an inversion (kappa multiplied by
    exp(step * N(0, 1)) per face and step, fixed seed), each solved from scratch and from the
    previous basis (`initial_space`); the number of solves (load-independent) and the times."""
    import warnings

    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI
    from petsc4py import PETSc

    PETSc.Log.begin()
    from spinverse_fem.forward.eigenbasis import solve_eigenbasis

    comm = MPI.COMM_WORLD
    cfg, phantom, model = build(comm, n, modes)
    L, M = model.ops.L, model.ops.M
    rng = np.random.default_rng(2024)
    kappas = [np.asarray(phantom.kappa, dtype=float)]
    for _ in range(steps):
        kappas.append(kappas[-1] * np.exp(step * rng.standard_normal(kappas[-1].size)))

    def solves():   # single-vector solves of Krylov-Schur (the block method counts its own)
        return int(PETSc.Log.Event("MatSolve").getPerfInfo()["count"])

    rows = []
    for method in methods:
        prev = None
        for i, kappa in enumerate(kappas):
            model.ops.set_kappa(kappa)
            for start in ("scratch", "previous basis"):
                if start == "previous basis" and prev is None:
                    continue
                init = prev if start == "previous basis" else None
                s0 = solves()
                comm.Barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    b = solve_eigenbasis(L, M, lam_max=model.lam_max, max_modes=modes,
                                         tol=cfg.eigen.tolerance, method=method,
                                         initial_space=init)
                cpu = comm.allreduce(time.process_time() - c0, op=MPI.MAX)
                wall = time.perf_counter() - t0
                nsolve = b.info.get("solves", solves() - s0)
                rows.append(dict(method=method, step=i, start=start, solves=int(nsolve),
                                 restarts=b.info.get("restarts"), modes=int(b.num_modes),
                                 seconds=round(wall, 3), cpu_seconds_max_rank=round(cpu, 3),
                                 load_1min=round(os.getloadavg()[0], 2)))
                if comm.rank == 0:
                    print("WARM " + json.dumps(rows[-1]), flush=True)
            prev = np.hstack([b.phi, b.extra_phi])
    return dict(n=n, ranks=comm.size, modes_cap=modes, steps=steps, step=step, rows=rows)


def print_table(res: dict) -> None:
    print(f"n = {res['n']} ({res['tets']} tets, {res['dofs']} dofs), {res['ranks']} rank(s), "
          f"cap {res['modes_cap']} modes")
    print(f"  {'variant':<24} {'s':>8} {'cpu s':>7} {'x':>6} {'K':>4} {'fact':>6} {'solve1':>7} "
          f"{'solveB':>7} {'orth':>7} {'RR':>6} {'inertia':>8} {'load':>10}  check")
    for r in res["runs"]:
        ev = r["events"]

        def sec(*names):
            return sum(ev.get(x, {}).get("seconds", 0.0) for x in names)
        bp = r.get("block_phases", {})
        orth = sec("BVOrthogonalizeV") or (bp.get("orth_gemm", 0) + bp.get("orth_block", 0) +
                                            bp.get("orth_matmult", 0))
        rr = sec("DSSolve") or bp.get("rayleigh_ritz", 0.0)
        check = ""
        if "max_rel_eig_diff" in r:
            check = f"dlam {r['max_rel_eig_diff']:.1e} sin {r['max_sin_angle']:.1e}"
        print(f"  {r['variant']:<24} {r['seconds']:>8.2f} {r['cpu_seconds_max_rank']:>7.2f} "
              f"{r['speedup_vs_krylovschur']:>6.2f} "
              f"{r['modes']:>4} {sec('MatCholFctrSym', 'MatCholFctrNum'):>6.2f} "
              f"{sec('MatSolve'):>7.2f} {sec('MatMatSolve'):>7.2f} {orth:>7.2f} {rr:>6.2f} "
              f"{r['phases'].get('inertia', 0.0):>8.2f} "
              f"{r['load_1min_before']:>4.1f}->{r['load_1min_after']:<4.1f}  {check}",
              flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--modes", type=int, default=500)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="name=method:option=value,... or just a method")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--max-load", type=float, default=0.6,
                   help="time a rank count only when the 1-minute load is below this")
    p.add_argument("--wait", type=int, default=0, help="seconds to wait for a low load")
    p.add_argument("--force", action="store_true", help="time whatever the load")
    p.add_argument("--out", help="JSON (default benchmarks/results/eigensolve.json)")
    p.add_argument("--worker", action="store_true", help="run in this (MPI) process")
    p.add_argument("--warm-steps", type=int, default=0,
                   help="item 1: a sequence of this many kappa steps, scratch vs previous basis "
                        "(methods from --variants, plain method names)")
    p.add_argument("--warm-step", type=float, default=0.05,
                   help="per-face log-normal kappa step (0.05: about 5 %%)")
    a = p.parse_args()
    if a.worker and a.warm_steps:
        res = warm_worker(a.n, a.modes, a.variants, a.warm_steps, a.warm_step)
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.worker:
        res = worker(a.n, a.modes, a.variants)
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print("RESULT " + json.dumps(res), flush=True)
        return 0
    if driver_refused_under_mpiexec("--worker"):
        return 2
    out_path = Path(a.out) if a.out else HERE / "results" / "eigensolve.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    results = []
    for r in a.ranks:
        ok, load = wait_for_quiet(a.max_load, a.wait, a.force)
        if not ok:
            print(f"{r} rank(s): not timed, 1-minute load {load[0]:.2f} >= {a.max_load}")
            results.append(dict(ranks=r, unmeasured=True, loadavg=list(load),
                                reason=f"1-minute load {load[0]:.2f} >= {a.max_load}"))
            continue
        cmd = ["timeout", str(a.timeout), mpiexec, "-n", str(r), sys.executable, __file__,
               "--worker", "--n", str(a.n), "--modes", str(a.modes), "--variants", *a.variants]
        if a.warm_steps:
            cmd += ["--warm-steps", str(a.warm_steps), "--warm-step", str(a.warm_step)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{r} rank(s) FAILED (exit {proc.returncode}): {proc.stderr[-800:]}")
            results.append(dict(ranks=r, failed=True, exit=proc.returncode,
                                stderr=proc.stderr[-800:]))
            continue
        res = json.loads(line[0][7:])
        res["loadavg_before"], res["loadavg_after"] = list(load), list(os.getloadavg())
        results.append(res)
        if a.warm_steps:
            for row in res["rows"]:
                print(f"  {row['method']:<12} step {row['step']} {row['start']:<15} solves "
                      f"{row['solves']:>6} wall {row['seconds']:>8.2f} s cpu "
                      f"{row['cpu_seconds_max_rank']:>8.2f} s load {row['load_1min']}")
        else:
            print_table(res)
    # the two targets, from the measured runs
    summary = {}
    by_rank = {x["ranks"]: x for x in results if "runs" in x}
    if a.n == TARGETS["n"] and a.modes == TARGETS["modes"]:
        for name in {r["variant"] for x in by_rank.values() for r in x["runs"]}:
            one = next((r for r in by_rank.get(1, {}).get("runs", []) if r["variant"] == name),
                       None)
            two = next((r for r in by_rank.get(2, {}).get("runs", []) if r["variant"] == name),
                       None)
            s = {}
            if one:
                s["one_rank_seconds"] = one["seconds"]
                s["one_rank_target_met"] = one["seconds"] <= TARGETS["one_rank_seconds"]
            if one and two:
                s["two_rank_speedup"] = round(one["seconds"] / two["seconds"], 3)
                s["speedup_target_met"] = s["two_rank_speedup"] >= TARGETS["two_rank_speedup"]
            summary[name] = s
    if a.warm_steps:
        out_path = Path(a.out) if a.out else HERE / "results" / "eigensolve_warm.json"
    report = dict(description=__doc__.split("\n\n")[0],
                  machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                               blas_threads_per_rank=1),
                  targets=TARGETS, n=a.n, modes=a.modes, variants=a.variants,
                  results=results, summary=summary)
    if out_path.exists():
        try:   # keep the findings written by hand
            old = json.loads(out_path.read_text())
            if "findings" in old:
                report["findings"] = old["findings"]
        except (OSError, ValueError):
            pass
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
