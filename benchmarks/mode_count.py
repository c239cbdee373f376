"""How many modes does a refined grid need? Signals and gradient against the mode count K.

Issue 14, item 3. The paper's torus set-up (`examples/paper_torus.toml`: three PGSE sequences,
D = 2 um^2/ms, robin outer faces) on the bcc grid of the 26.7 um box with n cubes per side.
Targets: simulated on the same grid at the ground truth with --reference modes. At three
permeability fields

- start: kappa = 1 um/ms on every face (the inversion's start),
- mid:   kappa = sqrt(start x truth) (halfway in log10 kappa: membranes half-formed),
- truth: the ground truth (0.01 um/ms on the torus's faces, 100 elsewhere),
- open:  kappa = 10 um/ms on every face (a start above the threshold, for comparison),

the eigenbasis misfit of all three sequences (`ReducedMisfit`, complement-solve adjoint) is
evaluated with the [eigen] rule capped at every K in --modes (the rule places the cut in a
spectral gap at or below the cap: a cut inside a cluster would make the gradient ~ 1 / gap)
and capped at --reference (K_ref), and compared with K_ref: the largest
difference of the normalised signals max |S_K/S0 - S_ref/S0|, the misfit and its difference,
and the cosine between the gradients in x = log10 kappa on the active faces (what the optimiser
sees; meaningless at the truth, where the misfit and its gradient vanish). Also: the number
of eigenvalues below the l = 2 um cutoff (the [eigen] rule's count before its cap) and the
time of one evaluation + gradient.

Run (one process, OMP_NUM_THREADS=1; n = 8 with K_ref = 500 takes ~15 min):

    OMP_NUM_THREADS=1 timeout 7200 python benchmarks/mode_count.py --sizes 4 6 8

Writes benchmarks/results/mode_count.json and mode_count.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

from harness import machine_info, pyplot, write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BOX_UM = 80.0 / 3.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--modes", type=int, nargs="+", default=[40, 80, 120, 200, 300])
    p.add_argument("--reference", type=int, default=500)
    p.add_argument("--points", nargs="+", default=["start", "mid", "truth", "open"])
    p.add_argument("--out", default=str(HERE / "results" / "mode_count.json"))
    a = p.parse_args()

    import dolfinx_solver  # noqa: F401
    import numpy as np
    from mpi4py import MPI

    from spinverse_fem.config import load_config
    from spinverse_fem.inverse.case import Case
    from spinverse_fem.inverse.driver import MODEL_OPTIONS

    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    rows = []
    t_all = time.perf_counter()
    for n in a.sizes:
        cfg = load_config(ROOT / "examples" / "paper_torus.toml")
        cfg = dataclasses.replace(
            cfg, grid=dataclasses.replace(cfg.grid, cubes=n, cube_um=BOX_UM / n),
            eigen=dataclasses.replace(cfg.eigen, max_modes=a.reference))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            case = Case(comm, cfg)
            _ = case.targets
        truth = np.asarray(case.phantom.kappa, float)
        start = case.start_kappa()
        fields = dict(start=start, truth=truth, mid=np.sqrt(start * truth),
                      open=np.full_like(start, 10.0))
        active = case.params.active
        for name in a.points:
            kappa = fields[name]
            ref = None
            # every count by the [eigen] rule capped at K (a cut in a spectral gap: a fixed K
            # inside a cluster of eigenvalues makes the gradient ~ 1 / gap, meaningless); the
            # reference capped at --reference
            for cap in [a.reference] + sorted(a.modes, reverse=True):
                case.forward.eigen = dataclasses.replace(cfg.eigen, max_modes=cap)
                mis = case.misfit(**MODEL_OPTIONS)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    t0 = time.perf_counter()
                    J, g = mis.cost_and_gradient(kappa)
                    sec = time.perf_counter() - t0
                S = np.concatenate(mis.signals(kappa))
                gx = (g * kappa * np.log(10.0))[active]
                basis = mis._state["basis"]
                K = basis.num_modes
                if ref is None:
                    ref = (J, S, gx, basis.cutoff_count, basis.num_modes)
                row = dict(n=n, tets=int(case.phantom.grid.num_tets), point=name, modes=K,
                           cap=cap, rel_gap=float(basis.rel_gap),
                           reference=ref[4], below_cutoff=int(ref[3]),
                           lam_k=float(basis.lam[-1]), misfit=float(J),
                           misfit_diff=float(abs(J - ref[0])),
                           signal_max_diff=float(np.max(np.abs(S - ref[1]))),
                           gradient_cosine=float(gx @ ref[2] / (np.linalg.norm(gx)
                                                                * np.linalg.norm(ref[2]))),
                           seconds=round(sec, 3))
                rows.append(row)
                say(f"n = {n} ({row['tets']} tets) {name:5s} cap {cap:3d}: K = {K:3d} (lambda_K "
                    f"{row['lam_k']:.3g} 1/ms, {row['below_cutoff']} below the cutoff): "
                    f"dS {row['signal_max_diff']:.2e}  J {J:.3e} (dJ {row['misfit_diff']:.1e})  "
                    f"cos {row['gradient_cosine']:.5f}  {sec:.1f} s", flush=True)
    report = dict(description=__doc__.split("\n\n")[0],
                  machine=machine_info(comm.size),
                  seconds=round(time.perf_counter() - t_all, 1), rows=rows)
    write_report(comm, a.out, report, plot, rows)
    return 0


def plot(rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for n in sorted({r["n"] for r in rows}):
        for point, ls in (("start", "o-"), ("mid", "s--"), ("truth", "^:"), ("open", "d-.")):
            sel = sorted((r for r in rows if r["n"] == n and r["point"] == point
                          and r["modes"] != r["reference"]), key=lambda r: r["modes"])
            if not sel:
                continue
            K = [r["modes"] for r in sel]
            ax[0].semilogy(K, [max(r["signal_max_diff"], 1e-16) for r in sel], ls,
                           label=f"n = {n}, {point}")
            ax[1].semilogy(K, [max(1.0 - r["gradient_cosine"], 1e-16) for r in sel], ls)
    ax[0].set_ylabel("max |S_K - S_ref| (S/S0)")
    ax[1].set_ylabel("1 - cos(g_K, g_ref)")
    for a_ in ax:
        a_.set_xlabel("modes K")
        a_.grid(alpha=0.3)
    ax[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Mode count against K_ref = {rows[0]['reference']} (paper torus set-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
