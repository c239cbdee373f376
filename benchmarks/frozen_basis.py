"""Frozen (Galerkin) basis against the eigenbasis of every iterate, along a real inversion path.

Issue 14, item 1. The path: the log10 kappa of every iteration of the default run
(`examples/paper_torus.toml`, 600 Adam iterations, three stages of 200; saved by
`experiments/reproducibility.py` as experiments/results/reproducibility/1rank.npz). At each
refresh point i0 (--starts) the mode count K is chosen by the [eigen] rule at kappa_{i0} (as
the driver does at a refresh) and the basis is frozen there; for s = 0 .. --steps the two models
of the stage (its sequences, the stages' solver settings `driver.MODEL_OPTIONS`) are evaluated
at kappa_{i0 + s}:

- eigen: `ReducedMisfit` with the same K (eigen-solve + complement solves, the reference);
- frozen: `FrozenBasisMisfit` refreshed at kappa_{i0} (no solve after the refresh).

Per point: the step ||x_{i0+s} - x_{i0}||_inf (log10 kappa), the misfit's relative difference
|J_f - J_e| / J_e, the largest difference of the normalised signals max |S_f/S0 - S_e/S0|
against the largest residual max |S_e/S0 - T|, the cosine between the two gradients (active
faces, the parameter x = log10 kappa: what Adam sees) and ||g_f - g_e|| / ||g_e||, and the wall
time of one objective + gradient evaluation of each (ratio frozen / eigen, same process, same
point: the machine is shared).

Measured (one rank, 150 s, a run_inversion.py on the other core; 12 refresh points x 11
iterates): at the refresh point J and S agree to round-off and the gradients to a cosine of
0.9995 (median; min 0.986: the frozen gradient leaves out the eigenvectors' rotation out of
the subspace). One iteration later the median |dJ|/J is 8.6e-4 (max 4.6e-2), five later 5.7e-3
(max 0.40, gradient cosine down to 0.17), ten later 8.7e-2 (max 1.85, cosine -0.64): in the
peak-learning-rate phase faces move 0.2-0.6 in log10 kappa within a few iterations. An
evaluation + gradient of the frozen model takes 0.25-0.35 of the eigenbasis model's at
K ~ 110. Hence `basis_refresh_step` (refresh when a face moved > 0.1): docs/frozen_basis.md.

Run (one process, OMP_NUM_THREADS=1; ~3 min):

    OMP_NUM_THREADS=1 timeout 3600 python benchmarks/frozen_basis.py

Writes benchmarks/results/frozen_basis.json (every point) and frozen_basis.png (the errors
against the steps since the refresh).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from harness import machine_info, pyplot, write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples" / "paper_torus.toml"))
    p.add_argument("--path", default=str(ROOT / "experiments" / "results" / "reproducibility"
                                         / "1rank.npz"))
    p.add_argument("--starts", type=int, nargs="+",
                   default=[0, 40, 100, 160, 200, 240, 300, 360, 400, 440, 500, 560])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(HERE / "results" / "frozen_basis.json"))
    a = p.parse_args()

    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI

    from spinverse_fem.config import load_config
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.inverse.driver import MODEL_OPTIONS
    from spinverse_fem.inverse.frozen_basis import FrozenBasisMisfit
    from spinverse_fem.inverse.misfit import ReducedMisfit

    comm = MPI.COMM_WORLD
    cfg = load_config(a.config)
    case = Case(comm, cfg)
    path = np.load(a.path)["log10_kappa"]
    per_stage = cfg.inversion.iterations_per_stage
    rows = []
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    t_all = time.perf_counter()
    for i0 in a.starts:
        si = min(i0 // per_stage, len(case.stages) - 1)
        stage = case.stages[si]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            K = case.num_modes_at(10.0 ** path[i0])
        seqs = [cfg.sequences[i] for i in stage.sequences]
        tg = case.targets
        common = dict(weight=cfg.inversion.misfit_weight,
                      normalisation=cfg.inversion.normalisation,
                      s0_reference=None if tg.s0 is None else [tg.s0[i] for i in stage.sequences],
                      num_modes=K, **MODEL_OPTIONS)
        targets = [tg.signals[i] for i in stage.sequences]
        eigen = ReducedMisfit(case.forward, seqs, targets, **common)
        frozen = FrozenBasisMisfit(case.forward, seqs, targets, **common)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t0 = time.perf_counter()
            frozen.refresh(10.0 ** path[i0])
            refresh_s = time.perf_counter() - t0
        active = case.params.active
        for s in range(a.steps + 1):
            i = i0 + s
            if i >= path.shape[0]:
                break
            kappa = 10.0 ** path[i]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t0 = time.perf_counter()
                je, ge = eigen.cost_and_gradient(kappa)
                te = time.perf_counter() - t0
                t0 = time.perf_counter()
                jf, gf = frozen.cost_and_gradient(kappa)
                tf = time.perf_counter() - t0
            se = np.concatenate(eigen.signals(kappa))
            sf = np.concatenate(frozen.signals(kappa))
            tcat = np.concatenate(targets)
            # the gradient in x = log10 kappa on the active faces (what the optimiser sees)
            xe = (ge * kappa * np.log(10.0))[active]
            xf = (gf * kappa * np.log(10.0))[active]
            row = dict(start=i0, stage=si + 1, steps=s, modes=K,
                       step_inf=float(np.max(np.abs(path[i] - path[i0]))),
                       misfit_eigen=float(je), misfit_frozen=float(jf),
                       misfit_rel_diff=float(abs(jf - je) / je),
                       signal_max_diff=float(np.max(np.abs(sf - se))),
                       residual_max=float(np.max(np.abs(se - tcat))),
                       gradient_cosine=float(xe @ xf / (np.linalg.norm(xe) * np.linalg.norm(xf))),
                       gradient_rel_diff=float(np.linalg.norm(xf - xe) / np.linalg.norm(xe)),
                       seconds_eigen=round(te, 4), seconds_frozen=round(tf, 4),
                       time_ratio=round(tf / te, 4), refresh_seconds=round(refresh_s, 4))
            rows.append(row)
            say(f"start {i0:3d} (stage {si + 1}, K = {K:3d}) +{s:2d}: step {row['step_inf']:.3f}"
                f"  dJ/J {row['misfit_rel_diff']:.2e}  dS {row['signal_max_diff']:.2e} "
                f"(residual {row['residual_max']:.2e})  cos {row['gradient_cosine']:.5f}  "
                f"dg {row['gradient_rel_diff']:.2e}  time {tf:.2f} / {te:.2f} s", flush=True)
    summary = {}
    for s in range(a.steps + 1):
        sel = [r for r in rows if r["steps"] == s]
        if not sel:
            continue
        summary[str(s)] = dict(
            points=len(sel),
            misfit_rel_diff_median=float(np.median([r["misfit_rel_diff"] for r in sel])),
            misfit_rel_diff_max=max(r["misfit_rel_diff"] for r in sel),
            signal_max_diff_max=max(r["signal_max_diff"] for r in sel),
            gradient_cosine_min=min(r["gradient_cosine"] for r in sel),
            gradient_cosine_median=float(np.median([r["gradient_cosine"] for r in sel])),
            gradient_rel_diff_median=float(np.median([r["gradient_rel_diff"] for r in sel])),
            time_ratio_median=float(np.median([r["time_ratio"] for r in sel])))
    report = dict(description=__doc__.split("\n\n")[0], config=str(Path(a.config).name),
                  path=str(Path(a.path).relative_to(ROOT)) if Path(a.path).is_relative_to(ROOT)
                  else a.path,
                  machine=machine_info(comm.size),
                  seconds=round(time.perf_counter() - t_all, 1),
                  summary_by_steps_since_refresh=summary, points=rows)
    write_report(comm, a.out, report, plot, rows)
    return 0


def plot(rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for i0 in sorted({r["start"] for r in rows}):
        sel = [r for r in rows if r["start"] == i0 and r["steps"] > 0]
        s = [r["steps"] for r in sel]
        lab = f"from it {i0}"
        ax[0].semilogy(s, [r["misfit_rel_diff"] for r in sel], "o-", ms=3, label=lab)
        ax[1].semilogy(s, [r["signal_max_diff"] for r in sel], "o-", ms=3)
        ax[2].semilogy(s, [max(1.0 - r["gradient_cosine"], 1e-16) for r in sel], "o-", ms=3)
    ax[0].set_ylabel("|J_frozen - J_eigen| / J_eigen")
    ax[1].set_ylabel("max |S_frozen - S_eigen| (S/S0)")
    ax[2].set_ylabel("1 - cos(g_frozen, g_eigen)")
    for a_ in ax:
        a_.set_xlabel("iterations since the refresh")
        a_.grid(alpha=0.3)
    ax[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Frozen basis vs the eigenbasis of every iterate (default torus run's path)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
