"""Scaling study (issue 14, item 5): one inversion iteration on 1..P ranks, per phase.

What one iteration is: the first curriculum stage of examples/paper_torus.toml (sequence
10/60 ms, 180 measurements) on the bcc grid of the 26.7 um box with n cubes per side, the
objective + adjoint gradient + geometric priors at kappa = ground truth x exp(0.3 N(0, 1))
(seeded, every face), with the mode count chosen by the [eigen] rule at that kappa (capped at
--modes) and the eigen-solver --method. The targets are zero signals with S0 = 1 (the cost of
an evaluation does not depend on the data), so no ground-truth simulation is timed.

Strong scaling: every n in --sizes on every P in --ranks. Weak scaling (--weak n0): n_P =
round(n0 P^(1/3)) on P ranks, so the tetrahedra per rank stay about fixed.

Phases (seconds, wall on rank 0 unless stated): setup_grid (phantom: grid, faces, shapes),
setup_operators (broken-P1 space, forms, mass and face matrices), then within the iteration:
assembly (L(kappa), timed
once more after the iteration), factorisation (MUMPS Cholesky incl. inertia counts: PETSc events
MatCholFctrSym/Num, max over ranks), eigen_solve (the rest of the eigen phase), projection,
exponentials (propagation + its vector-Jacobian product), adjoint_solves (complement CG),
sensitivity (face-form assembly of the gradient), priors (continuity + manifold and their
gradients), other. Peak memory: the high-water resident set size of every rank (MB).

How to run (the driver is serial and starts `mpiexec -n P python benchmarks/scaling.py
--worker ...` itself with one BLAS thread per rank, under `timeout`; any P works on a
cluster, where `--launcher "srun -n {P}"` replaces mpiexec):

    python benchmarks/scaling.py --sizes 4 8 12 --ranks 1 2 [--weak 8] [--modes 500]
        [--method block] [--out benchmarks/results/scaling.json]
    # smallest check, results kept out of benchmarks/results/:
    python benchmarks/scaling.py --sizes 4 --ranks 1 2 --modes 60 --force --out /tmp/s.json

Output: the JSON (per run: phases, peak memory per rank, load average before/after) and a
figure beside it (.png): wall time per phase for every (n, P), and strong-scaling speedup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from harness import driver_refused_under_mpiexec, report_worker, wait_for_quiet

HERE = Path(__file__).resolve().parent
PHASES = ("assembly", "factorisation", "eigen_solve", "projection", "exponentials",
          "adjoint_solves", "sensitivity", "priors", "other")


def worker(n: int, modes: int, method: str, seed: int, basis: str = "eigen",
           refresh_every: int = 10) -> dict:
    import resource
    import warnings

    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI
    from petsc4py import PETSc

    PETSc.Log.begin()
    from spinverse_fem.config import load_config
    from spinverse_fem.forward.model import ForwardModel
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.inverse.case import Case, Targets

    comm = MPI.COMM_WORLD
    PETSc.Options()["spinverse_eigen_method"] = method
    cfg = load_config(HERE.parent / "examples" / "paper_torus.toml")
    cfg = dataclasses.replace(
        cfg, grid=dataclasses.replace(cfg.grid, cubes=n, cube_um=80.0 / 3.0 / n),
        eigen=dataclasses.replace(cfg.eigen, max_modes=modes),
        inversion=dataclasses.replace(cfg.inversion, basis=basis))
    setup = {}
    comm.Barrier()
    t0 = time.perf_counter()
    phantom = build_phantom(cfg)
    comm.Barrier()
    setup["setup_grid"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ForwardModel(comm, phantom, cfg.physics, cfg.eigen)
    comm.Barrier()
    setup["setup_operators"] = time.perf_counter() - t0
    # the Case builds its own phantom and model (timed above once, outside the iteration)
    zeros = [np.zeros(s.num_measurements, dtype=complex) for s in cfg.sequences]
    case = Case(comm, cfg, targets=Targets(zeros, [1.0] * len(zeros), "zeros (benchmark)"))
    rng = np.random.default_rng(seed)
    kappa = np.asarray(phantom.kappa, float) * np.exp(0.3 * rng.standard_normal(
        phantom.faces.num_faces))
    kappa = np.clip(kappa, cfg.inversion.kappa_min_um_per_ms, cfg.inversion.kappa_max_um_per_ms)
    x = np.log10(kappa[case.params.active])
    model = case.stage_model(0, None, x)
    model.update_prior_weights(x, case.stages[0].manifold_weight)
    refresh = None
    if basis == "frozen":
        # the basis of an earlier iterate (a typical Adam step, 0.02 in log10 kappa, away):
        # the iteration below is one of those between refreshes
        x_old = x + 0.02 * np.random.default_rng(seed + 1).standard_normal(x.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            comm.Barrier()
            t0 = time.perf_counter()
            model.refresh_basis(x_old)
            comm.Barrier()
            refresh = time.perf_counter() - t0

    def event(name):
        info = PETSc.Log.Event(name).getPerfInfo()
        return float(info["time"])

    fact_events = ("MatCholFctrSym", "MatCholFctrNum")
    c = model.counters
    t_before = dict(c.timings)
    f0 = sum(event(e) for e in fact_events)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        comm.Barrier()
        w0 = time.perf_counter()
        value, grad = model.cost_and_gradient(x)
        comm.Barrier()
        wall = time.perf_counter() - w0
    fact = comm.allreduce(sum(event(e) for e in fact_events) - f0, op=MPI.MAX)
    comm.Barrier()
    t0 = time.perf_counter()        # L(kappa) again, as inside the eigen phase
    case.forward.ops.set_kappa(kappa)
    comm.Barrier()
    assembly = time.perf_counter() - t0
    d = {k: c.timings.get(k, 0.0) - t_before.get(k, 0.0) for k in c.timings}
    t0 = time.perf_counter()
    xf = case.params.full_log10(x)
    case.priors.continuity(xf, model.continuity_w)
    case.priors.manifold(xf)
    priors = time.perf_counter() - t0
    phases = dict(assembly=assembly, factorisation=fact,
                  eigen_solve=max(d.get("eigen", 0.0) - fact - assembly, 0.0),
                  projection=d.get("projection", 0.0),
                  exponentials=d.get("propagation", 0.0) + d.get("propagation_vjp", 0.0),
                  adjoint_solves=d.get("adjoint_solve", 0.0),
                  sensitivity=d.get("sensitivity", 0.0), priors=priors)
    phases["other"] = max(wall + priors - sum(phases.values()), 0.0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cut = model.misfit.last_cut
    extra = {}
    if refresh is not None:
        extra = dict(basis="frozen", refresh_seconds=round(refresh, 3),
                     refresh_every=refresh_every,
                     amortised_iteration_seconds=round(wall + priors + refresh / refresh_every,
                                                       3))
    return dict(**extra, n=n, ranks=comm.size, method=method, tets=int(phantom.grid.num_tets),
                faces=int(phantom.faces.num_faces),
                dofs=int(case.forward.space.num_dofs_global),
                modes=int(cut.modes) if cut else None, modes_cap=modes,
                objective=float(value), gradient_norm=float(np.linalg.norm(grad)),
                iteration_seconds=round(wall + priors, 3),
                setup={k: round(v, 3) for k, v in setup.items()},
                phases={k: round(v, 3) for k, v in phases.items()},
                peak_rss_mb_per_rank=[round(v, 1) for v in comm.allgather(peak_mb)])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spinverse_fem.io.atomic import save_figure_atomic

    runs = [r for r in report["results"] if "phases" in r]
    if not runs:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"n={r['n']}\nP={r['ranks']}" + ("\nweak" if r.get("kind") == "weak" else "")
              for r in runs]
    bottom = [0.0] * len(runs)
    for ph in PHASES:
        vals = [r["phases"].get(ph, 0.0) for r in runs]
        ax.bar(labels, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("seconds per iteration (wall)")
    ax.set_title("one iteration: objective + gradient + priors")
    ax.legend(fontsize=7)
    for n in sorted({r["n"] for r in runs if r.get("kind") == "strong"}):
        rs = sorted((r for r in runs if r["n"] == n and r.get("kind") == "strong"),
                    key=lambda r: r["ranks"])
        if rs and rs[0]["ranks"] == 1:
            bx.plot([r["ranks"] for r in rs],
                    [rs[0]["iteration_seconds"] / r["iteration_seconds"] for r in rs],
                    "o-", label=f"n = {n}")
    ps = sorted({r["ranks"] for r in runs})
    bx.plot(ps, ps, "k:", label="ideal")
    bx.set_xlabel("ranks P")
    bx.set_ylabel("speedup over 1 rank")
    bx.set_title("strong scaling")
    bx.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[4, 8, 12])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--weak", type=int, default=None, help="weak scaling from n0 on 1 rank")
    p.add_argument("--modes", type=int, default=500, help="cap on the mode count")
    p.add_argument("--method", default="block", help="krylovschur | block | slicing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--basis", default="eigen", choices=["eigen", "frozen"],
                   help="the stage model's basis (inversion.basis); frozen: the iteration "
                        "between refreshes, the refresh timed apart")
    p.add_argument("--refresh-every", type=int, default=10)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--max-load", type=float, default=0.6)
    p.add_argument("--wait", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--launcher", default=None,
                   help='e.g. "srun -n {P}" (default: this Python\'s mpiexec -n {P})')
    p.add_argument("--out", help="JSON (default benchmarks/results/scaling.json)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--n", type=int)
    a = p.parse_args()
    if a.worker:
        return report_worker(worker(a.n, a.modes, a.method, a.seed, a.basis, a.refresh_every),
                             None)
    if driver_refused_under_mpiexec("--worker --n N"):
        return 2
    plan = [("strong", n, r) for n in a.sizes for r in a.ranks]
    if a.weak:
        plan += [("weak", round(a.weak * r ** (1.0 / 3.0)), r) for r in a.ranks]
    out = Path(a.out) if a.out else HERE / "results" / "scaling.json"
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for kind, n, r in plan:
        ok, load = wait_for_quiet(a.max_load, a.wait, a.force)
        if not ok:
            print(f"n = {n}, {r} rank(s): not timed, 1-minute load {load[0]:.2f}")
            results.append(dict(kind=kind, n=n, ranks=r, unmeasured=True, loadavg=list(load)))
            continue
        launch = (shlex.split(a.launcher.format(P=r)) if a.launcher else
                  [str(Path(sys.executable).parent / "mpiexec"), "-n", str(r)])
        cmd = ["timeout", str(a.timeout), *launch, sys.executable, __file__, "--worker",
               "--n", str(n), "--modes", str(a.modes), "--method", a.method,
               "--seed", str(a.seed), "--basis", a.basis,
               "--refresh-every", str(a.refresh_every)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"n = {n}, {r} rank(s) FAILED (exit {proc.returncode}): "
                  f"{proc.stderr[-800:]}")
            results.append(dict(kind=kind, n=n, ranks=r, failed=True,
                                stderr=proc.stderr[-800:]))
            continue
        res = json.loads(line[0][7:])
        res.update(kind=kind, loadavg_before=list(load), loadavg_after=list(os.getloadavg()))
        results.append(res)
        ph = "  ".join(f"{k} {v:.2f}" for k, v in res["phases"].items() if v >= 0.005)
        fr = (f" (+ refresh {res['refresh_seconds']:.2f} s every {res['refresh_every']}: "
              f"{res['amortised_iteration_seconds']:.2f} s amortised)" if "refresh_seconds" in res
              else "")
        print(f"{kind:<6} n = {n:>2} ({res['tets']} tets, {res['dofs']} dofs, K = "
              f"{res['modes']}) P = {r}: {res['iteration_seconds']:.2f} s{fr}  [{ph}]  peak "
              f"{max(res['peak_rss_mb_per_rank']):.0f} MB/rank  load {load[0]:.2f}",
              flush=True)
    for res in results:
        one = next((x for x in results if x.get("kind") == res.get("kind") == "strong"
                    and x.get("n") == res.get("n") and x.get("ranks") == 1 and "phases" in x),
                   None)
        if one and "phases" in res:
            res["speedup_vs_1_rank"] = round(one["iteration_seconds"] /
                                             res["iteration_seconds"], 3)
    report = dict(description=__doc__.split("\n\n")[0],
                  machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                               blas_threads_per_rank=1),
                  modes_cap=a.modes, method=a.method, basis=a.basis, results=results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
