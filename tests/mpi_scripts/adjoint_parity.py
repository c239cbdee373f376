"""Objective and gradient of the reduced misfit on the paper grid; writes JSON (rank 0).
Run by tests/test_adjoint.py on 1 and 2 ranks: `mpiexec -n N python adjoint_parity.py out.json`."""

import json
import sys
from pathlib import Path

import dolfinx_solver  # noqa: F401
import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_adjoint import SEQ, WAVE, paper_model, perturbed  # noqa: E402

from spinverse_fem.inverse.misfit import SignalMisfit  # noqa: E402

comm = MPI.COMM_WORLD
model, problem = paper_model(comm)
seqs = [SEQ, WAVE]
misfit = SignalMisfit(model, seqs, [np.full(s.num_measurements, 0.4) for s in seqs],
                      weight=100.0, normalisation="own", num_modes=40)
value, grad = misfit.objective_and_gradient(perturbed(problem, seed=2))
if comm.rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(dict(value=value, gradient=grad.tolist())))
