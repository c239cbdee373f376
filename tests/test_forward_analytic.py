"""Forward model against analytic oracles (tests/references, written independently of the package).

Runs serially and under mpiexec -n 2 (the same numbers must come out).
"""

import numpy as np
import pytest
from references.membrane1d import plane_membrane_box_signal
from references.slab import box_pgse_signal, slab_pgse_signal

from spinverse_fem.config import parse_config
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.geometry.phantom import build_phantom

DIRECTIONS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]]
B_VALUES = [0.0, 500.0, 1000.0, 2000.0]


def box_config(cells, upper=(10.0, 10.0, 10.0), geometry='kind = "none"', barrier=0.1,
               open_kappa=1.0e5, length_scale=1.0, directions=DIRECTIONS):
    return f"""
[grid]
kind = "box"
lower_um = [0.0, 0.0, 0.0]
upper_um = [{upper[0]}, {upper[1]}, {upper[2]}]
cells = [{cells[0]}, {cells[1]}, {cells[2]}]
[geometry]
{geometry}
[permeability]
barrier_um_per_ms = {barrier}
open_um_per_ms = {open_kappa}
outer = "neumann"
[physics]
diffusivity_um2_per_ms = 2.0
[eigen]
length_scale_um = {length_scale}
[[sequence]]
type = "pgse"
delta_ms = 5.0
Delta_ms = 20.0
b_s_per_mm2 = {B_VALUES}
directions = {directions}
"""


def simulate(comm, text):
    cfg = parse_config(text)
    problem = build_phantom(cfg)
    model = ForwardModel(comm, problem, cfg.physics, cfg.eigen)
    _, system = model.reduce(problem.kappa)
    return cfg, model.normalised_signals(system, cfg.sequences)[0]


def box_reference(cfg, lengths):
    seq = cfg.sequences[0]
    q = seq.q_per_um_ms()
    return np.array([box_pgse_signal(lengths, 2.0, 5.0, 20.0, qc, g) if qc > 0 else 1.0
                     for qc, g in zip(q, seq.directions)])


def test_impermeable_box_converges_to_slab_series(comm):
    """Reference: product of 1-D slab cosine-series signals (references.slab), box 10 x 8 x 2 um
    with open faces (kappa = 1e5 um/ms); axis and oblique gradients. Error <= 1e-3 on the finest
    grid; observed order of convergence in h (reported, asserted >= 1.5)."""
    lengths = (10.0, 8.0, 2.0)
    errors, hs = [], []
    for n in (5, 10, 20):
        cfg, s = simulate(comm, box_config((n, int(0.8 * n), 1), upper=lengths))
        ref = box_reference(cfg, lengths)
        errors.append(np.max(np.abs(s - ref)))
        hs.append(lengths[0] / n)
    rate = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    print(f"impermeable box: max |S/S0 - ref| = {errors}, observed order {rate:.2f}")
    assert errors[-1] <= 1e-3
    assert rate >= 1.5


def membrane_reference(cfg, kappa, lengths=(10.0, 10.0, 10.0)):
    seq = cfg.sequences[0]
    return np.array([plane_membrane_box_signal(lengths, 0, 4.0, kappa, 2.0, 5.0, 20.0, qc, g)
                     if qc > 0 else 1.0 for qc, g in zip(seq.q_per_um_ms(), seq.directions)])


@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.1, 1.0, 10.0])
def test_plane_membrane_matches_two_compartment_1d(comm, kappa):
    """Reference: independent 1-D two-compartment solution (transcendental eigen-equation,
    references.membrane1d). Box 10 x 2 x 2 um, plane x = 4 um, gradient across the membrane,
    refined along x: error <= 1e-3 on 40 cells and second-order decrease."""
    geometry = 'kind = "plane"\naxis = "x"\nposition_um = 4.0'
    errors = []
    for n in (20, 40):
        cfg, s = simulate(comm, box_config((n, 1, 1), upper=(10.0, 2.0, 2.0), geometry=geometry,
                                           barrier=kappa, directions=[[1.0, 0.0, 0.0]]))
        errors.append(np.max(np.abs(s - membrane_reference(cfg, kappa, (10.0, 2.0, 2.0)))))
    print(f"plane membrane kappa={kappa}: max errors {errors}")
    assert errors[-1] <= 1e-3
    assert errors[0] / errors[-1] >= 3.0


def test_plane_membrane_issue_example_grid(comm):
    """Reference: references.membrane1d x slab factors, on the issue's own example (box 10^3 um,
    cells [20, 4, 4], plane x = 4, kappa = 0.1) with axis and oblique directions. Only 4 cells
    across y and z, so the tolerance is the slab error at h = 2.5 um (test above: ~4e-3 at h=2)."""
    geometry = 'kind = "plane"\naxis = "x"\nposition_um = 4.0'
    cfg, s = simulate(comm, box_config((20, 4, 4), geometry=geometry, barrier=0.1))
    err = np.abs(s - membrane_reference(cfg, 0.1))
    x_rows = np.all(cfg.sequences[0].directions == [1.0, 0.0, 0.0], axis=1)
    assert np.max(err[x_rows]) <= 1e-3   # across the membrane: x is resolved (h = 0.5 um)
    assert np.max(err) <= 5e-3


def test_sealed_membrane_is_volume_weighted_sum(comm):
    """Reference: kappa = 0 splits the box into two sealed slabs; S/S0 = (4/10) S_4 + (6/10) S_6
    from the slab series. The double zero eigenvalue also exercises the inertia check."""
    geometry = 'kind = "plane"\naxis = "x"\nposition_um = 4.0'
    cfg, s = simulate(comm, box_config((20, 1, 1), geometry=geometry, barrier=0.0,
                                       directions=[[1.0, 0.0, 0.0]]))
    q = cfg.sequences[0].q_per_um_ms()
    ref = np.array([0.4 * slab_pgse_signal(4.0, 2.0, 5.0, 20.0, qc)
                    + 0.6 * slab_pgse_signal(6.0, 2.0, 5.0, 20.0, qc) for qc in q])
    assert np.max(np.abs(s - ref)) <= 2e-3


def test_open_membrane_recovers_free_box(comm):
    """Reference: the model itself without a membrane; barrier = open (1e5 um/ms) must give
    the same signals as geometry "none" to round-off (the face field is all that differs)."""
    geometry = 'kind = "plane"\naxis = "x"\nposition_um = 4.0'
    _, s_membrane = simulate(comm, box_config((10, 2, 2), geometry=geometry, barrier=1.0e5))
    _, s_none = simulate(comm, box_config((10, 2, 2)))
    assert np.max(np.abs(s_membrane - s_none)) <= 1e-10
    # and a large but finite barrier converges towards it (error ~ D/(kappa h))
    _, s_1e3 = simulate(comm, box_config((10, 2, 2), geometry=geometry, barrier=1.0e3))
    _, s_1e1 = simulate(comm, box_config((10, 2, 2), geometry=geometry, barrier=1.0e1))
    assert np.max(np.abs(s_1e3 - s_none)) < 0.1 * np.max(np.abs(s_1e1 - s_none))
