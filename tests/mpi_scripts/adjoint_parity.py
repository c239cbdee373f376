"""Objective and gradient of the reduced misfit on the paper grid; writes JSON (rank 0).
Run by tests/test_adjoint.py on 1 and 2 ranks: `mpiexec -n N python adjoint_parity.py out.json`.

Self-contained (the case is the one of tests/test_adjoint.py, copied here so that this script
imports only the installed package, not a test module): torus of examples/paper_torus.toml with
Robin outer faces, a 10/20 ms PGSE (b = 0, 1000, 3000 s/mm^2, 6 directions) and a piecewise
constant waveform (b = 0, 2000 s/mm^2, 3 directions), targets 0.4, 40 modes, kappa (um/ms) the
truth's times a seeded log-normal perturbation. The test compares 1 rank with 2, both from here.
"""

import json
import sys
from pathlib import Path

import dolfinx_solver  # noqa: F401  (before dolfinx/petsc4py)
import numpy as np
from mpi4py import MPI

from spinverse_fem.config import parse_config
from spinverse_fem.config.protocol import Sequence, fibonacci_directions
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.geometry.phantom import build_phantom
from spinverse_fem.inverse.misfit import ReducedMisfit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SEQ = Sequence.pgse(10.0, 20.0, [0.0, 1000.0, 3000.0], fibonacci_directions(6))
# segments (duration_ms, relative amplitude); the b values (s/mm^2) set the scale
WAVE = Sequence.waveform([(3.0, 1.0), (2.0, -0.5), (4.0, 0.0), (2.0, -1.0), (2.0, 0.5),
                          (1.0, -1.0)], [0.0, 2000.0], fibonacci_directions(3))


def paper_model(comm):
    """(ForwardModel, Problem) of examples/paper_torus.toml (outer faces: Robin)."""
    cfg = parse_config((EXAMPLES / "paper_torus.toml").read_text(), base_dir=EXAMPLES)
    problem = build_phantom(cfg)
    return ForwardModel(comm, problem, cfg.physics, cfg.eigen), problem


def perturbed(problem, seed=0, spread=0.3):
    """The truth's kappa (um/ms) times exp(spread x standard normal), seeded."""
    rng = np.random.default_rng(seed)
    return problem.kappa * np.exp(spread * rng.standard_normal(problem.faces.num_faces))


comm = MPI.COMM_WORLD
model, problem = paper_model(comm)
seqs = [SEQ, WAVE]
misfit = ReducedMisfit(model, seqs, [np.full(s.num_measurements, 0.4) for s in seqs],
                       weight=100.0, normalisation="own", num_modes=40)
value, grad = misfit.cost_and_gradient(perturbed(problem, seed=2))
if comm.rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(dict(value=value, gradient=grad.tolist())))
