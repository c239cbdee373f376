"""Tissue compartments ([[compartment]]): per-compartment diffusivity and T2 in the forward model.

References: tests/references/multilayer.py (planar layers, dim 1: a 1-D radial-FE matrix
formalism written from the equations, checked against the Bessel/transcendental references in
test_references.py) for a box split by a plane membrane into two compartments with different
D and T2, at two mesh sizes with the observed order; the single-compartment model when both
compartments are equal; the configuration's own statement for the errors.
Runs serially and under mpiexec -n 2.
"""

from pathlib import Path

import numpy as np
import pytest
from references.multilayer import Layers, pgse_signal

from spinverse_fem.config import parse_config
from spinverse_fem.errors import InputError
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.geometry.phantom import build_phantom

ROOT = Path(__file__).resolve().parents[1]
B_VALUES = [0.0, 500.0, 1000.0, 2000.0]


def config(cells: int, compartments: str, physics: str = "", barrier: float = 0.1) -> str:
    return f"""
[grid]
kind = "box"
lower_um = [0.0, 0.0, 0.0]
upper_um = [10.0, 2.0, 2.0]
cells = [{cells}, 1, 1]
[geometry]
kind = "plane"
axis = "x"
position_um = 4.0
[permeability]
barrier_um_per_ms = {barrier}
open_um_per_ms = 1.0e5
outer = "neumann"
{physics}
[eigen]
length_scale_um = 1.0
{compartments}
[[sequence]]
type = "pgse"
delta_ms = 5.0
Delta_ms = 20.0
b_s_per_mm2 = {B_VALUES}
directions = [[1.0, 0.0, 0.0]]
"""


TWO = """
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
"""


def simulate(comm, text):
    cfg = parse_config(text)
    problem = build_phantom(cfg)
    model = ForwardModel(comm, problem, cfg.physics, cfg.eigen)
    _, system = model.reduce(problem.kappa)
    return cfg, problem, model.normalised_signals(system, cfg.sequences)[0]


def test_two_compartments_match_the_planar_multilayer_reference(comm):
    """Reference: multilayer planar layers (x < 4: D 1.0, T2 40 ms; x > 4: D 2.5, T2 100 ms;
    kappa 0.1 um/ms at x = 4), S/S0 with S0 the b = 0 signal (relaxation included): max error
    <= 1e-4 on 40 cells along x (measured 2.9e-5) and decreasing at order >= 1.5 from 20 to 40
    cells (measured 2.25)."""
    ref = None
    errors = []
    for n in (20, 40):
        cfg, problem, s = simulate(comm, config(n, TWO))
        assert problem.compartment is not None
        assert np.array_equal(np.unique(problem.diffusivity), [1.0, 2.5])
        if ref is None:
            q = cfg.sequences[0].q_per_um_ms()
            ref = pgse_signal(Layers(radii=(4.0, 10.0), D=(1.0, 2.5), kappa=(0.1,),
                                     T2=(40.0, 100.0), dim=1), 5.0, 20.0, q, modes=80)
        errors.append(float(np.max(np.abs(s - ref))))
    rate = np.log2(errors[0] / errors[1])
    print(f"two compartments: max |S/S0 - ref| = {errors}, observed order {rate:.2f}")
    assert errors[-1] <= 1e-4
    assert rate >= 1.5


def test_equal_compartments_equal_the_physics_model(comm):
    """Reference: the same grid with [physics] D 2.0, T2 60 ms and no compartments: two equal
    compartments give the same signals to round-off (1e-10)."""
    same = TWO.replace("1.0\nt2_ms = 40.0", "2.0\nt2_ms = 60.0").replace(
        "2.5\nt2_ms = 100.0", "2.0\nt2_ms = 60.0")
    _, _, s_comp = simulate(comm, config(20, same))
    _, _, s_phys = simulate(comm, config(
        20, "", "[physics]\ndiffusivity_um2_per_ms = 2.0\nt2_ms = 60.0"))
    np.testing.assert_allclose(s_comp, s_phys, rtol=0, atol=1e-10)


@pytest.mark.parametrize("text, field, fragment", [
    (config(10, TWO.split("[[compartment]]\nname = \"right\"")[0]), "compartment",
     'region = "outside"'),
    (config(10, TWO, "[physics]\ndiffusivity_um2_per_ms = 2.0"),
     "physics.diffusivity_um2_per_ms", "per compartment"),
    (config(10, TWO.replace('region = "inside"', "tag = 1")), "compartment[0].tag",
     "file grid"),
    (config(10, TWO.replace('region = "outside"', 'region = "inside"')), "compartment[1].region",
     "already"),
    (config(10, TWO.replace('region = "inside"', 'region = "middle"')),
     "compartment[0].region", "one of"),
])
def test_bad_compartments_are_refused(text, field, fragment):
    """Reference: the messages promised in docs/units_and_files.md: one InputError naming the
    table and field."""
    with pytest.raises(InputError) as info:
        cfg = parse_config(text, source="c.toml")
        build_phantom(cfg)
    assert info.value.field == field, str(info.value)
    assert fragment in str(info.value), str(info.value)


def test_file_grid_compartments_by_volume_tag(comm, tmp_path):
    """Reference: the shipped gmsh cube (one physical volume, tag 3): a compartment with tag 3
    covers every tetrahedron; tag 5 is refused naming the tags present."""
    msh = ROOT / "meshes" / "data" / "cube_membrane.msh"
    grid = (f'[grid]\nkind = "file"\npath = "{msh}"\nmembrane_tag = 2\n'
            '[geometry]\nkind = "file_tags"\n')
    rest = config(10, "").split("[permeability]", 1)[1]
    comp = '[[compartment]]\nname = "all"\ntag = {tag}\ndiffusivity_um2_per_ms = 1.5\n'
    cfg = parse_config(grid + "[permeability]" + rest + comp.format(tag=3))
    ph = build_phantom(cfg)
    assert np.all(ph.compartment == 0) and np.all(ph.diffusivity == 1.5)
    with pytest.raises(InputError, match=r"compartment\[0\]\.tag: no tetrahedron .* tagged 5 "
                                         r"\(volume tags present: \[3\]\)"):
        build_phantom(parse_config(grid + "[permeability]" + rest + comp.format(tag=5)))
