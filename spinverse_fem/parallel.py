"""The MPI world and rank-0 progress output: the only place the package touches them."""

from __future__ import annotations


def world():
    """MPI.COMM_WORLD (imports dolfinx_solver first: it must precede petsc4py and mpi4py)."""
    import dolfinx_solver  # noqa: F401
    from mpi4py import MPI

    return MPI.COMM_WORLD


def say(comm, *args) -> None:
    """Print on rank 0 only, flushed so that long runs show their progress."""
    if comm.rank == 0:
        print(*args, flush=True)
