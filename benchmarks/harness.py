"""What the benchmark scripts share: the driver/worker protocol. A driver (serial) starts
`mpiexec -n r python <script> --worker ...` per rank count; a worker prints `RESULT {json}` on
rank 0 (and writes it to --out when given)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def launched_by_mpiexec() -> int:
    """The size of the MPI job this process belongs to, from the launcher's environment."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def report_worker(res: dict, out: str | None) -> int:
    """Rank 0 prints the worker's result line and writes it to `out` (JSON); returns 0."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(res, indent=2))
    return 0


def driver_refused_under_mpiexec(worker_hint: str) -> bool:
    """True (after saying why) when the serial driver was started under mpiexec."""
    if launched_by_mpiexec() > 1:
        print("the driver runs serially and starts `mpiexec -n r` itself (--ranks); to run one "
              f"configuration under mpiexec use {worker_hint}", file=sys.stderr)
        return True
    return False


def wait_for_quiet(max_load: float, wait_s: int, force: bool) -> tuple[bool, tuple]:
    """Wait up to wait_s seconds for the 1-minute load to fall below max_load; returns
    (time it?, load average). force: time whatever the load."""
    import time

    deadline = time.time() + wait_s
    while os.getloadavg()[0] >= max_load and time.time() < deadline and not force:
        time.sleep(15)
    load = os.getloadavg()
    return force or load[0] < max_load, load



def machine_info(ranks: int) -> dict:
    """What a benchmark's figures depend on besides the code: platform, cores, BLAS threads,
    ranks and the load average when it ended."""
    import platform

    return dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), ranks=ranks,
                loadavg_end=list(os.getloadavg()))


def write_report(comm, out, report: dict, plot, rows) -> None:
    """Rank 0 writes the JSON report to `out` and `plot(rows, <out>.png)` beside it."""
    if comm.rank != 0:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
