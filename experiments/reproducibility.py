r"""Reproducibility of the main job: the default run (examples/paper_torus.toml, as `make demo`)
on 1 and 2 MPI ranks and with 1 and 2 BLAS threads.

    python -m experiments.reproducibility run --label 1rank
    OMP_NUM_THREADS=1 mpiexec -n 2 python -m experiments.reproducibility run --label 2ranks
    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 \
        python -m experiments.reproducibility run --label 2threads
    python -m experiments.reproducibility report

`run` performs the default inversion in-process (Case + Inversion, the same code path as
`run_inversion.py`) and records log10 kappa at every iteration; it writes
results/reproducibility/<label>.npz (log10 kappa per iteration) and <label>.json (final face
set, metrics, mode counts and re-selections). `report` compares every run with the 1-rank run:
the largest difference in log10 kappa per iteration (plotted, reproducibility.png), whether
the final face sets are identical, and the final metrics (reproducibility.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import RESULTS, atomic_write_text, markdown_table, pyplot, save_figure

OUT = RESULTS / "reproducibility"
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "paper_torus.toml"
REFERENCE = "1rank"


def run(label: str, iterations: int | None) -> None:
    from dataclasses import replace

    from spinverse_fem.config import load_config
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.evaluation.scoring import score
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.inverse.driver import Inversion
    from spinverse_fem.parallel import say, world

    comm = world()
    cfg = load_config(CONFIG)
    if iterations:
        cfg = replace(cfg, inversion=replace(cfg.inversion, iterations_per_stage=iterations))
    case = Case(comm, cfg)
    threshold = cfg.inversion.threshold_um_per_ms
    trace, lines = [], []

    def observe(kappa):
        trace.append(np.log10(kappa))
        return score(case.phantom, kappa, threshold, case.truth)

    def log(s):
        lines.append(s)
        if "re-selected" in s or not s.startswith("  stage") or len(lines) % 50 == 0:
            say(comm, s)

    t0 = time.perf_counter()
    inv = Inversion(case, log=log, observer=observe)
    state = inv.run(inv.initial_state())
    kappa = inv.kappa(state.x)
    metrics = score(case.phantom, kappa, threshold, case.truth)
    faces = np.flatnonzero(extract_interface(kappa, threshold, case.phantom.active))
    summary = dict(label=label, ranks=comm.size,
                   omp_threads=os.environ.get("OMP_NUM_THREADS", "unset"),
                   openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
                   iterations=int(state.global_iteration), modes=[int(m) for m in state.modes],
                   reselections=[s.strip() for s in lines if "re-selected" in s],
                   interface_faces=faces.tolist(), cd_l2=metrics["cd_l2"],
                   bad_edge_pct=metrics["bad_edge_pct"], iou=metrics["iou"],
                   seconds=time.perf_counter() - t0,
                   load_average=list(os.getloadavg()))
    if comm.rank == 0:
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(OUT / f"{label}.npz", log10_kappa=np.array(trace),
                            final=np.log10(kappa))
        atomic_write_text(OUT / f"{label}.json", json.dumps(summary, indent=1) + "\n")
    say(comm, f"{label}: {len(faces)} faces, CD-L2 {metrics['cd_l2']:.6f} um^2, BadEdge "
              f"{metrics['bad_edge_pct']:.4f} %, {summary['seconds']:.0f} s")


def report() -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    if REFERENCE not in runs:
        sys.exit(f"no {REFERENCE} run in {OUT}")
    ref = runs[REFERENCE]
    ref_trace = np.load(OUT / f"{REFERENCE}.npz")["log10_kappa"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    rows = []
    for label, r in runs.items():
        trace = np.load(OUT / f"{label}.npz")["log10_kappa"]
        n = min(len(trace), len(ref_trace))
        diff = np.max(np.abs(trace[:n] - ref_trace[:n]), axis=1)
        if label != REFERENCE:
            ax.semilogy(np.arange(n), np.maximum(diff, 1e-17), label=f"{label} vs {REFERENCE}")
        same = r["interface_faces"] == ref["interface_faces"]
        rows.append([label, r["ranks"], r["omp_threads"], len(r["interface_faces"]),
                     "yes" if same else "no", f"{r['cd_l2']:.6f}", f"{r['bad_edge_pct']:.4f}",
                     f"{abs(r['cd_l2'] - ref['cd_l2']):.1e}", f"{np.max(diff):.1e}",
                     " ".join(map(str, r["modes"])), len(r["reselections"]),
                     f"{r['seconds']:.0f}", f"{r['load_average'][0]:.1f}"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("max |log10 kappa - log10 kappa (1 rank)|")
    ax.set_title("Default run: largest per-face difference from the 1-rank run")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, RESULTS / "reproducibility.png")
    table = markdown_table(
        ["run", "ranks", "OMP threads", "faces", "same face set", "CD-L2 (um^2)", "BadEdge %",
         "|dCD-L2|", "max dlog10 kappa", "modes per stage", "re-selections", "s",
         "load (1 min)"], rows)
    text = ("# Reproducibility of the default run\n\n"
            "`python -m experiments.reproducibility` (see its docstring): the default example "
            "(`make demo`) on 1 and 2 ranks and with 1 and 2 BLAS threads. Differences are "
            "against the 1-rank run; the figure `reproducibility.png` shows the largest "
            "difference in log10 kappa at every iteration.\n\n" + table + "\n")
    atomic_write_text(RESULTS / "reproducibility.md", text)
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--label", required=True)
    r.add_argument("--iterations", type=int, help="per stage (default: the example's)")
    sub.add_parser("report")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.label, args.iterations)
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
