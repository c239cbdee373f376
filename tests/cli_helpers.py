"""Running the command-line tools from tests: a fixed environment and a wall-clock limit."""

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run_cli(args, timeout=300, mpi=0):
    """`spinverse ARGS` (under `mpiexec -n MPI` when mpi > 0), killed after `timeout` s so that
    an MPI deadlock fails the test instead of hanging it."""
    cmd = [str(BIN / "spinverse"), *map(str, args)]
    if mpi:
        cmd = [str(BIN / "mpiexec"), "-n", str(mpi), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run(["timeout", str(timeout), *cmd], capture_output=True, text=True,
                          env=env)
