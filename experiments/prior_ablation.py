#!/usr/bin/env python
"""Prior ablation over the ground truths (the Spinverse paper's Figure 4 table and plot).

Three configurations, each on every mesh with the paper's staged curriculum (10/60 ms, then
10/20 ms) and Adam: "none" (continuity_weight = manifold_weight = 0), "continuity"
(continuity 2, manifold 0) and "continuity+manifold" (continuity 2, manifold ramp 0 -> 2, the
paper's full model). Meshes: the first --meshes N (default 10) of the data set in list order
(paper files: 000-009, all bent axons).

    python -m experiments.prior_ablation                        # 10 meshes x 3 x 2 x 200 it., ~5 h
    python -m experiments.prior_ablation --meshes 1 --iterations 2 --out /tmp/abl   # smoke test
    mpiexec -n 2 python -m experiments.prior_ablation ...

Resume-friendly: every finished (mesh, configuration) run is saved as
OUT/prior_ablation/<mesh>__<configuration>.json and skipped when present with the same
settings (rerun the same command after a kill; --fresh ignores them). OUT/prior_ablation.md
(final CD-L2 and BadEdge% per mesh and configuration, and means) and OUT/prior_ablation.png
(mean CD-L2 and BadEdge% against iteration per configuration) are rewritten after every run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if not __package__:  # run as a file: experiments.* is importable only when run as a module
    raise SystemExit("run it as a module from the repository root: "
                     f"python -m experiments.{Path(__file__).stem}")

from experiments.common import (  # noqa: E402
    RESULTS,
    add_common_arguments,
    atomic_write_text,
    cached_run,
    check_cache,
    finish_figure,
    fmt,
    fmt_seconds,
    iteration_logger,
    markdown_table,
    mpi_comm,
    pyplot,
    saved_run,
    say,
    settings_from_args,
)
from experiments.dataset import ground_truths  # noqa: E402

# name -> (continuity_weight, manifold_weight); the manifold weight ramps 0 -> value
CONFIGS = {"none": (0.0, 0.0), "continuity": (2.0, 0.0), "continuity+manifold": (2.0, 2.0)}


def _mean(values) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def write_table(path: Path, results: dict, meshes: list[str], configs: list[str], settings,
                ranks: int) -> None:
    """results[(mesh, config)] -> run summary (only finished runs)."""
    header = ["mesh"] + [f"{c}: {m}" for c in configs for m in ("CD-L2", "BadEdge%")]
    rows = []
    for mesh in meshes:
        row = [mesh]
        for c in configs:
            r = results.get((mesh, c))
            row += ([fmt(r["metrics"]["cd_l2"]), fmt(r["metrics"]["bad_edge_pct"], 1)]
                    if r else ["...", "..."])
        rows.append(row)
    mean_row = ["**mean**"]
    for c in configs:
        done = [results[(m, c)] for m in meshes if (m, c) in results]
        mean_row += [f"**{fmt(_mean([r['metrics']['cd_l2'] for r in done]))}**",
                     f"**{fmt(_mean([r['metrics']['bad_edge_pct'] for r in done]), 1)}**"]
    rows.append(mean_row)
    summary = []
    for c in configs:
        done = [results[(m, c)] for m in meshes if (m, c) in results]
        cw, mw = CONFIGS[c]
        summary.append([
            c, f"{cw:g} / {mw:g}", f"{len(done)}/{len(meshes)}",
            fmt(_mean([r["metrics"]["cd_l2"] for r in done])),
            fmt(_mean([r["metrics"]["bad_edge_pct"] for r in done]), 1),
            fmt(_mean([r["metrics"]["open_pct"] for r in done]), 1),
            fmt(_mean([r["metrics"]["branch_pct"] for r in done]), 1),
            fmt(_mean([r["metrics"]["iou"] for r in done])),
            sum(bool(r["metrics"].get("empty_prediction")) for r in done),
            f"{_mean([r['misfit_joint'] for r in done]):.3e}" if done else "-",
            fmt_seconds(sum(r["seconds"] for r in done))])
    s = settings
    text = (
        "# Prior ablation (final CD-L2 in um^2 and BadEdge% per mesh)\n\n"
        f"Written by `experiments/prior_ablation.py`: staged curriculum (10/60 ms, then 10/20 "
        f"ms), {s.optimizer}, {s.iterations} iterations per stage, inversion eigenbasis <= "
        f"{s.max_modes} modes, targets simulated with <= {s.reference_max_modes} modes, "
        f"{s.directions} directions x 6 b values, noiseless; {ranks} MPI rank(s). Metrics of "
        "the interface (kappa < 1 um/ms) at the final kappa; \"...\" = not run yet.\n\n"
        + markdown_table(header, rows)
        + "\n## Means per configuration\n\n"
        + markdown_table(["configuration", "continuity / manifold weight", "runs",
                          "mean CD-L2", "mean BadEdge%", "mean Open%", "mean Branch%",
                          "mean face IoU", "empty predictions", "mean joint misfit",
                          "total time"], summary)
        + "\nEmpty predictions score CD-L2 = 0 by the paper's convention (counted above). "
          "Joint misfit: 100 x mean |S/S0_ref - T|^2 over 10/60 + 10/20 ms at the final kappa."
          "\n\n" + verdict(results, meshes)
        + "\n![mean history](prior_ablation.png)\n")
    atomic_write_text(path, text)


def verdict(results: dict, meshes: list[str]) -> str:
    """The issue's check, on the meshes run with every configuration being compared: the full
    method must have lower mean CD-L2 and BadEdge% than no priors."""
    lines = ["## Verdict\n"]
    for other in ("none", "continuity"):
        paired = [m for m in meshes
                  if (m, other) in results and (m, "continuity+manifold") in results]
        if not paired:
            continue
        means = {}
        for c in (other, "continuity+manifold"):
            means[c] = [_mean([results[(m, c)]["metrics"][k] for m in paired])
                        for k in ("cd_l2", "bad_edge_pct")]
        wins = sum(results[(m, "continuity+manifold")]["metrics"]["cd_l2"]
                   < results[(m, other)]["metrics"]["cd_l2"] for m in paired)
        better = all(f < o for f, o in zip(means["continuity+manifold"], means[other]))
        lines.append(
            f"- continuity+manifold vs {other} on the {len(paired)} mesh(es) run with both: mean "
            f"CD-L2 {means['continuity+manifold'][0]:.3f} vs {means[other][0]:.3f} um^2, mean "
            f"BadEdge {means['continuity+manifold'][1]:.1f} vs {means[other][1]:.1f} %; lower "
            f"CD-L2 on {wins}/{len(paired)} meshes. **The full method "
            f"{'is' if better else 'is NOT'} better on both means.**")
    return "\n".join(lines) + "\n"


def mean_history(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean of history[key] over runs on a common iteration grid (hold between records)."""
    n = max(int(max(r["history"]["iteration"])) for r in runs)
    grid = np.arange(n + 1, dtype=float)
    vals = []
    for r in runs:
        it = np.asarray(r["history"]["iteration"], dtype=float)
        y = np.asarray(r["history"][key], dtype=float)
        ok = np.isfinite(y)
        idx = np.clip(np.searchsorted(it[ok], grid, side="right") - 1, 0, ok.sum() - 1)
        vals.append(y[ok][idx])
    return grid, np.mean(vals, axis=0)


def plot(path: Path, results: dict, meshes: list[str], configs: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11.0, 4.2))
    switch = None
    for c, color in zip(configs, ("C7", "C0", "C3")):
        runs = [results[(m, c)] for m in meshes if (m, c) in results]
        if not runs:
            continue
        for a, key in zip(ax, ("cd_l2", "bad_edge_pct")):
            x, y = mean_history(runs, key)
            a.plot(x, y, color=color, label=f"{c} ({len(runs)} meshes)")
        st = np.asarray(runs[0]["history"]["stage"])
        j = np.flatnonzero(np.diff(st))
        if j.size:
            switch = runs[0]["history"]["iteration"][j[0] + 1]
    for a, label in zip(ax, ("mean CD-L2 (um$^2$)", "mean BadEdge (%)")):
        if switch is not None:
            a.axvline(switch - 0.5, color="k", ls=":", lw=0.8)
        a.set_xlabel("iteration (dotted: 10/60 -> 10/20 ms)")
        a.set_ylabel(label)
    finish_figure(plt, fig, ax, f"Prior ablation: mean over {len(meshes)} mesh(es)", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, RESULTS)
    p.add_argument("--meshes", type=int, default=10,
                   help="number of meshes, the first N of the data set in list order (default 10)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to run (default: all three)")
    p.add_argument("--skip", type=int, default=0,
                   help="run only from the (N+1)-th of those meshes on, to share a long ablation "
                        "between processes; the table still lists every saved run")
    p.add_argument("--fresh", action="store_true", help="ignore saved runs in OUT/prior_ablation")
    args = p.parse_args(argv)
    settings = settings_from_args(args)
    comm = mpi_comm()
    out = Path(args.out)
    gts = ground_truths(args.source)
    if not 1 <= args.meshes <= len(gts):
        raise SystemExit(f"--meshes must be in 1..{len(gts)}")
    gts = gts[:args.meshes]
    meshes = [gt.name for gt in gts]
    configs = list(args.configs)

    def config_for(gt, c):
        cw, mw = CONFIGS[c]
        return gt.config_text(settings, curriculum="staged", continuity_weight=cw,
                              manifold_weight=mw)

    def run_path(gt, c):
        return out / "prior_ablation" / f"{gt.name}__{c}.json"

    def table_results():
        """This invocation's runs plus every matching saved run (all three configurations)."""
        table = dict(results)
        for gt in gts:
            for c in CONFIGS:
                if (gt.name, c) not in table:
                    r = saved_run(run_path(gt, c), config_for(gt, c), settings, quiet=True)
                    if r is not None:
                        table[(gt.name, c)] = r
        return table

    gts = gts[args.skip:]
    if args.check_cache:
        return check_cache(comm, [(f"{gt.name} {c}", run_path(gt, c), config_for(gt, c))
                                  for gt in gts for c in configs], settings)
    total = len(gts) * len(configs)
    say(comm, f"prior ablation: {len(gts)} mesh(es) ({args.source} data set) x "
              f"{len(configs)} configuration(s), {settings.iterations} iterations per stage, "
              f"{settings.optimizer}, {comm.size} rank(s)")
    results = {}
    k = 0
    for gt in gts:
        for c in configs:
            k += 1
            cw, mw = CONFIGS[c]
            say(comm, f"[{k}/{total}] {gt.name}, {c} (continuity {cw:g}, manifold {mw:g})")
            r = cached_run(comm, run_path(gt, c), config_for(gt, c), settings,
                           f"{gt.name} {c}",
                           log=iteration_logger(comm, args.log_every, f"[{k}/{total}] "),
                           resume=not args.fresh)
            results[(gt.name, c)] = r
            m = r["metrics"]
            say(comm, f"  -> CD-L2 {m['cd_l2']:.3f} um^2, BadEdge {m['bad_edge_pct']:.1f}%, "
                      f"IoU {m['iou']:.3f}, {fmt_seconds(r['seconds'])}")
            if comm.rank == 0:
                table = table_results()
                shown = [c for c in CONFIGS if any((m, c) in table for m in meshes)]
                write_table(out / "prior_ablation.md", table, meshes, shown, settings, comm.size)
                plot(out / "prior_ablation.png", table, meshes, shown)
    if comm.rank == 0:
        table = table_results()
        for c in configs:
            done = [table[(m, c)] for m in meshes if (m, c) in table]
            print(f"{c:>20}: mean CD-L2 {_mean([r['metrics']['cd_l2'] for r in done]):.3f} um^2,"
                  f" mean BadEdge {_mean([r['metrics']['bad_edge_pct'] for r in done]):.1f}%",
                  flush=True)
        print(f"wrote {out / 'prior_ablation.md'} and {out / 'prior_ablation.png'}", flush=True)
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
