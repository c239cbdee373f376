"""Benchmark of spinverse_fem.forward.propagator (the dense exponential actions) on one core.

Synthetic model: K modes with lam uniform on [0, 4.93] 1/ms; W_i = Phi_i^T diag(x) Phi_i with
Phi_i the K lowest eigenvectors of a random-conductance 1-D Neumann Laplacian on 2K points of
a 27 um box (x in [0, 27] um), nu0 = Phi_0^T M 1. Protocol: PGSE delta/Delta = 10/60 and 10/20
ms, b = 0, 1000, ..., 5000 s/mm^2 (q from b = q^2 delta^2 (Delta - delta/3), b in ms/um^2 =
1e-3 s/mm^2) x 30 Fibonacci directions = 180 measurements.

Measured (seconds, best of `--repeats`, wall and CPU of this process): forward time
(`SequencePropagator(...).signals()`), forward + VJP time and their ratio, forward + VJP with
the full (K, K) generator cotangent (`full_lam=True`, as used by the reduced misfit), and two
per-measurement baselines timed once on `--subset` non-zero-b measurements and extrapolated to
all of them: scipy.sparse.linalg.expm_multiply per column and segment, and scipy.linalg.expm
per measurement (one K x K exponential, the other pulse is its conjugate); speed-ups over
them; the number of Taylor terms x column groups; accuracy of our signals against both
baselines on that subset (max relative error, dimensionless).

How to run: serial only (dense, replicated: it has no MPI part, and under mpiexec every rank
would repeat the same work, so it refuses to run on more than one rank). BLAS is pinned to
one thread.

    python benchmarks/propagator.py [--K 300 500] [--repeats 3] [--subset 10]
                                          [--out benchmarks/results/propagator.json]
    # smallest check (seconds), results kept out of benchmarks/results/:
    python benchmarks/propagator.py --K 300 --repeats 1 --subset 4 --out /tmp/mf.json

Prints a table (CPU seconds) and writes JSON (cases with wall and CPU, machine, notes).
"""

from __future__ import annotations

import os

# one core: must be set before numpy loads its BLAS
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.sparse.linalg  # noqa: E402

from spinverse_fem.forward.propagator import SequencePropagator  # noqa: E402

BOX_UM = 27.0
LAM_MAX = 4.93
B_VALUES = np.arange(6) * 1000.0  # s/mm^2
N_DIR = 30


def synthetic_model(K: int, seed: int = 0):
    """(lam (K,), W (3, K, K), nu0 (K,)) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    N = 2 * K
    h = BOX_UM / N
    x = (np.arange(N) + 0.5) * h
    W, nu0 = [], None
    for i in range(3):
        w = rng.uniform(0.5, 1.5, N - 1)
        A = np.diag(np.r_[w, 0.0] + np.r_[0.0, w]) - np.diag(w, 1) - np.diag(w, -1)
        _, V = np.linalg.eigh(A)
        Phi = V[:, :K]  # Euclidean-orthonormal; M = h I, so Phi_M = Phi / sqrt(h)
        W.append(Phi.T @ (x[:, None] * Phi))
        if i == 0:
            nu0 = np.sqrt(h) * Phi.sum(axis=0)
    lam = np.linspace(0.0, LAM_MAX, K)
    return lam, np.stack(W), nu0


def fibonacci_directions(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - i / n)
    theta = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def pgse_protocol(delta: float, Delta: float):
    """segments, q (n,) in 1/(um ms), directions (n, 3); rows b outer, direction inner."""
    q_b = np.sqrt(1e-3 * B_VALUES / (delta**2 * (Delta - delta / 3.0)))
    q = np.repeat(q_b, N_DIR)
    dirs = np.tile(fibonacci_directions(N_DIR), (B_VALUES.size, 1))
    return [(delta, 1.0), (Delta - delta, 0.0), (delta, -1.0)], q, dirs


def best_of(fn, repeats: int):
    """(best wall s, best CPU s, last result)."""
    wall, cpu, out = np.inf, np.inf, None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, out


def baseline_expm_multiply(lam, W, nu0, segments, qc, g):
    G = np.tensordot(g, W, axes=1)
    x = nu0.astype(complex)
    for dt, f in segments:
        if f == 0.0:
            x = np.exp(-dt * lam) * x
        else:
            x = scipy.sparse.linalg.expm_multiply(-dt * (np.diag(lam) + 1j * qc * f * G), x)
    return nu0 @ x


def baseline_expm(lam, W, nu0, segments, qc, g):
    (d1, f1), (d2, _), (d3, f3) = segments
    G = np.tensordot(g, W, axes=1)
    E1 = scipy.linalg.expm(-d1 * (np.diag(lam) + 1j * qc * f1 * G))
    # E3 = conj(E1) for the antisymmetric PGSE pulse pair
    x = np.conj(E1) @ (np.exp(-d2 * lam) * (E1 @ nu0))
    return nu0 @ x


def run_case(K, delta, Delta, repeats, subset, seed=0):
    lam, W, nu0 = synthetic_model(K, seed)
    segments, q, dirs = pgse_protocol(delta, Delta)
    n = q.size
    rng = np.random.default_rng(1)
    S_bar = rng.standard_normal(n) + 1j * rng.standard_normal(n)

    def forward():
        p = SequencePropagator(lam, W, nu0, segments, q, dirs)
        return p, p.signals()

    def forward_vjp():
        p = SequencePropagator(lam, W, nu0, segments, q, dirs)
        S = p.signals()
        return p, S, p.vjp(S_bar)

    def forward_vjp_full():
        p = SequencePropagator(lam, W, nu0, segments, q, dirs)
        S = p.signals()
        return p, S, p.vjp(S_bar, full_lam=True)

    fw, fc, (prop, S) = best_of(forward, repeats)
    gw, gc, _ = best_of(forward_vjp, repeats)
    lw, lc, _ = best_of(forward_vjp_full, repeats)
    st = prop.stats
    group_terms = int(sum(t * b["shape"][0] for t, b in zip(st["terms"], st["batches"])))

    nz = np.flatnonzero(q > 0)
    pick = nz[np.linspace(0, nz.size - 1, min(subset, nz.size)).astype(int)]
    k_expm = max(2, pick.size // 2)

    def run_mult():
        return np.array([baseline_expm_multiply(lam, W, nu0, segments, q[c], dirs[c])
                         for c in pick])

    def run_expm():
        return np.array([baseline_expm(lam, W, nu0, segments, q[c], dirs[c])
                         for c in pick[:k_expm]])

    mw, mc, ref_mult = best_of(run_mult, 1)
    ew, ec, ref_expm = best_of(run_expm, 1)
    t_mult, t_expm = mc / pick.size, ec / k_expm

    err_expm = float(np.max(np.abs(S[pick[:k_expm]] - ref_expm) / np.abs(ref_expm)))
    err_mult = float(np.max(np.abs(S[pick] - ref_mult) / np.abs(ref_mult)))
    return {
        "K": K,
        "delta_ms": delta,
        "Delta_ms": Delta,
        "n_measurements": n,
        "n_nonzero_q": int(nz.size),
        "q_max_per_um_ms": float(q.max()),
        "time_reversal": st["time_reversal"],
        "batches": [{"shape": b["shape"], "m_s": b["m_s"]} for b in st["batches"]],
        "taylor_terms_x_groups": group_terms,
        "forward_wall_s": fw,
        "forward_cpu_s": fc,
        "forward_vjp_wall_s": gw,
        "forward_vjp_cpu_s": gc,
        "ratio_forward_vjp_over_forward": gw / fw,
        "ratio_forward_vjp_over_forward_cpu": gc / fc,
        "forward_vjp_full_lam_wall_s": lw,
        "forward_vjp_full_lam_cpu_s": lc,
        "baseline_expm_multiply_per_column_cpu_s": t_mult,
        "baseline_expm_multiply_per_column_wall_s": mw / pick.size,
        "baseline_expm_multiply_extrapolated_cpu_s": t_mult * nz.size,
        "baseline_expm_per_measurement_cpu_s": t_expm,
        "baseline_expm_per_measurement_wall_s": ew / k_expm,
        "baseline_expm_extrapolated_cpu_s": t_expm * nz.size,
        "speedup_forward_vs_expm_multiply_cpu": t_mult * nz.size / fc,
        "speedup_forward_vs_expm_cpu": t_expm * nz.size / fc,
        "baseline_subset_size": {"expm_multiply": int(pick.size), "expm": int(k_expm)},
        "max_rel_err_vs_expm": err_expm,
        "max_rel_err_vs_expm_multiply": err_mult,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, nargs="+", default=[300, 500])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subset", type=int, default=10, help="measurements timed per baseline")
    default_out = Path(__file__).resolve().parent / "results" / "propagator.json"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(argv)
    ranks = next((int(os.environ[v]) for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
                  if os.environ.get(v, "").isdigit()), 1)
    if ranks > 1:
        raise SystemExit("propagator.py is a one-core benchmark: run it without mpiexec")

    load_before = os.getloadavg()
    cases = []
    print("CPU seconds, one thread (wall in the JSON)")
    print(f"{'K':>4} {'d/D':>6} {'fwd':>7} {'fwd+vjp':>9} {'ratio':>5} {'+fullL':>7} {'terms':>6}"
          f" {'expm_mult':>11} {'expm':>8} {'x mult':>6} {'x expm':>6} {'err':>8}")
    for K in args.K:
        for delta, Delta in ((10.0, 60.0), (10.0, 20.0)):
            r = run_case(K, delta, Delta, args.repeats, args.subset)
            cases.append(r)
            print(
                f"{K:4d} {delta:g}/{Delta:g}".rjust(11)
                + f" {r['forward_cpu_s']:7.3f} {r['forward_vjp_cpu_s']:9.3f}"
                f" {r['ratio_forward_vjp_over_forward_cpu']:5.2f}"
                f" {r['forward_vjp_full_lam_cpu_s']:7.3f}"
                f" {r['taylor_terms_x_groups']:6d}"
                f" {r['baseline_expm_multiply_extrapolated_cpu_s']:11.2f}"
                f" {r['baseline_expm_extrapolated_cpu_s']:8.2f}"
                f" {r['speedup_forward_vs_expm_multiply_cpu']:6.1f}"
                f" {r['speedup_forward_vs_expm_cpu']:6.1f}"
                f" {max(r['max_rel_err_vs_expm'], r['max_rel_err_vs_expm_multiply']):8.1e}",
                flush=True,
            )
    result = {
        "description": __doc__.split("\n\n")[0],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": 1,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "notes": "times are best of repeats (wall and CPU; the CPU figures are robust to a "
        "shared machine); baselines timed once on a subset of "
        "non-zero-q measurements and extrapolated (q = 0 columns are free in every method); "
        "forward+VJP includes its own forward pass",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
