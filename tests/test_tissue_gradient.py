"""The gradient of the misfit with respect to each tetrahedron's D and 1/T2 (the compartment
parameters), from the same adjoint as the kappa gradient (`ReducedMisfit.tissue_gradient`,
`fem.sensitivity.CellSensitivity`).

Reference: second-order Taylor remainders |J(p + h d) - J(p) - h g.d| in a seeded random
per-tetrahedron direction d (so every cell's entry counts, not only the compartment sums), for
the eigenbasis model at a fixed mode count and for the frozen (Galerkin) basis. Runs serially
and under mpiexec -n 2 (the gradient is replicated; the direction is the same on every rank).
"""

import numpy as np
import pytest

from spinverse_fem.config import parse_config
from spinverse_fem.inverse.case import Case

TEXT = """
[grid]
kind = "box"
lower_um = [0.0, 0.0, 0.0]
upper_um = [10.0, 4.0, 4.0]
cells = [10, 2, 2]
[geometry]
kind = "plane"
axis = "x"
position_um = 4.0
[permeability]
barrier_um_per_ms = 0.1
open_um_per_ms = 100.0
outer = "neumann"
[eigen]
length_scale_um = 2.0
[[compartment]]
name = "left"
region = "inside"
diffusivity_um2_per_ms = 1.0
t2_ms = 40.0
[[compartment]]
name = "right"
region = "outside"
diffusivity_um2_per_ms = 2.5
t2_ms = 100.0
[[sequence]]
type = "pgse"
delta_ms = 5.0
Delta_ms = 20.0
b_s_per_mm2 = [0.0, 1000.0, 2000.0, 3000.0]
directions = [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]
"""


def taylor_rates(J, g, x, d, h0=1e-2, halvings=2):
    J0 = J(x)
    slope = float(g @ d)
    rem = []
    for i in range(halvings + 1):
        h = h0 / 2**i
        rem.append(abs(J(x + h * d) - J0 - h * slope))
    return np.log2(np.array(rem[:-1]) / np.array(rem[1:])), rem, slope


@pytest.fixture(scope="module")
def case():
    from mpi4py import MPI

    return Case(MPI.COMM_WORLD, parse_config(TEXT, source="tissue.toml"))


@pytest.mark.parametrize("basis", ["eigen", "frozen"])
@pytest.mark.parametrize("which", ["diffusivity", "relaxation"])
def test_tissue_gradient_taylor(case, basis, which):
    """Reference: Taylor remainders in a random per-tetrahedron direction of D (um^2/ms) or of
    1/T2 (1/ms), away from the truth (D and 1/T2 scaled by 0.8 / 1.3, the start kappa): second
    order (rates >= 1.9), the eigenbasis model at a fixed mode count."""
    ph = case.phantom
    D0 = 0.8 * np.asarray(ph.diffusivity)
    r0 = 1.3 * np.asarray(ph.relaxation)
    kappa = case.start_kappa()
    mis = case.misfit(basis=basis)
    mis.set_tissue(D0, r0)
    mis.freeze_modes(kappa) if basis == "eigen" else mis.refresh(kappa)
    rng = np.random.default_rng(7)
    T = ph.grid.num_tets
    d = rng.uniform(-1.0, 1.0, T) * (D0 if which == "diffusivity" else r0)

    def J(p):
        if which == "diffusivity":
            mis.set_tissue(p, r0)
        else:
            mis.set_tissue(D0, p)
        return mis.cost(kappa)

    x = D0 if which == "diffusivity" else r0
    mis.set_tissue(D0, r0)
    gD, gr = mis.tissue_gradient(kappa)
    g = gD if which == "diffusivity" else gr
    rates, rem, slope = taylor_rates(J, g, x, d)
    print(f"{basis} {which}: slope {slope:.4g}, remainders {rem}, rates {rates}")
    assert abs(slope) > 1e-8
    assert np.all(rates >= 1.9), (rates, rem)
