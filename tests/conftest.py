"""Shared test fixtures.

The whole suite runs twice: serially and under `mpiexec -n 2` (see the Makefile). Under MPI
only rank 0 reports; every rank still runs every test so collectives stay matched.
"""

import gc
import os
import sys

import pytest

try:
    from mpi4py import MPI

    _RANK, _SIZE = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
except ImportError:  # pragma: no cover
    MPI, _RANK, _SIZE = None, 0, 1

if _RANK > 0:
    sys.stdout = open(os.devnull, "w")


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture(autouse=True)
def _collect_between_tests():
    yield
    # PETSc objects must be destroyed collectively, in the same order on every rank
    gc.collect()
    if MPI is not None:
        MPI.COMM_WORLD.Barrier()


def pytest_configure(config):
    config.addinivalue_line("markers", "serial_only: skipped under mpiexec (spawns its own ranks)")


def pytest_collection_modifyitems(config, items):
    if _SIZE > 1:
        skip = pytest.mark.skip(reason="serial-only test (runs its own mpiexec or touches files)")
        for item in items:
            if "serial_only" in item.keywords:
                item.add_marker(skip)
