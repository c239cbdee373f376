"""Concentric multilayer spheres and cylinders on conforming gmsh meshes (meshes/conforming.py,
shipped under meshes/data/): compartments by volume tag ([[compartment]]) with their own D and
T2, each interface a [[membrane]] with its own permeability.

Reference: tests/references/multilayer.py (1-D radial matrix formalism written from the
equations, itself checked against Bessel roots and the known limits in test_references.py).
The errors come from the polygonal interfaces and P1 on a tetrahedral mesh, so they are stated
at two mesh sizes with the observed order against the mean element size h = (V / N)^(1/3).
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

DATA = Path(__file__).resolve().parents[1] / "meshes" / "data"
DELTA, BIG_DELTA = 5.0, 20.0
B_VALUES = [0.0, 500.0, 1000.0, 2000.0, 4000.0]


def config(mesh: str, D, T2, kappa, open_kappa: float = 1.0e5, rho=None) -> str:
    rho = (1.0,) * len(D) if rho is None else rho
    comps = "".join(f'[[compartment]]\nname = "layer{i + 1}"\ntag = {i + 1}\n'
                    f"diffusivity_um2_per_ms = {d}\nt2_ms = {t}\nspin_density = {r}\n"
                    for i, (d, t, r) in enumerate(zip(D, T2, rho)))
    mems = "".join(f'[[membrane]]\nname = "interface{i + 1}"\ntag = {101 + i}\n'
                   f"kappa_um_per_ms = {k}\n" for i, k in enumerate(kappa))
    return f"""
[grid]
kind = "file"
path = "{DATA / mesh}"
[geometry]
kind = "file_tags"
[permeability]
open_um_per_ms = {open_kappa}
[eigen]
length_scale_um = 1.5
{comps}{mems}
[[sequence]]
type = "pgse"
delta_ms = {DELTA}
Delta_ms = {BIG_DELTA}
b_s_per_mm2 = {B_VALUES}
directions = [[1.0, 0.0, 0.0]]
"""


def simulate(comm, text):
    cfg = parse_config(text, source="multilayer.toml")
    problem = build_phantom(cfg)
    model = ForwardModel(comm, problem, cfg.physics, cfg.eigen)
    _, system = model.reduce(problem.kappa)
    s = model.normalised_signals(system, cfg.sequences)[0]
    h = (problem.grid.volumes().sum() / problem.grid.num_tets) ** (1.0 / 3.0)
    return cfg, s, h


def errors_and_order(comm, meshes, layers: Layers):
    errors, sizes, ref = [], [], None
    for mesh in meshes:
        cfg, s, h = simulate(comm, config(mesh, layers.D, layers.T2, layers.kappa,
                                          rho=layers.rho))
        if ref is None:
            q = cfg.sequences[0].q_per_um_ms()
            ref = pgse_signal(layers, DELTA, BIG_DELTA, q, modes=40)
        errors.append(float(np.max(np.abs(s - ref))))
        sizes.append(h)
    order = np.log(errors[0] / errors[-1]) / np.log(sizes[0] / sizes[-1])
    return errors, sizes, order


def test_two_layer_sphere_converges_to_the_radial_reference(comm):
    """Reference: multilayer sphere, radii 3 / 5 um, D 1.0 / 2.5 um^2/ms, T2 40 / 100 ms,
    interface kappa 0.05 um/ms, PGSE 5/20 ms up to b = 4000 s/mm^2: max |S/S0 - ref| 0.021 on
    786 tets (h 0.86 um) and 7.5e-3 on 3 132 (h 0.55 um), observed order 2.3 (>= 1.8)."""
    layers = Layers(radii=(3.0, 5.0), D=(1.0, 2.5), kappa=(0.05,), T2=(40.0, 100.0), dim=3)
    errors, sizes, order = errors_and_order(
        comm, ["sphere_2layers_h2.msh", "sphere_2layers_h1.msh"], layers)
    print(f"two-layer sphere: errors {errors}, h {sizes}, order {order:.2f}")
    assert errors[-1] <= 0.01
    assert order >= 1.8


def test_two_layer_sphere_with_spin_density_converges(comm):
    """Reference: the two-layer sphere above with spin densities 1.0 / 0.4 (inner / outer
    layer; the radial reference starts from rho per layer and reads out the integral of m):
    max |S/S0 - ref| 1.9e-2 -> 6.7e-3, order 2.3 (>= 1.8). rho's own effect, S(rho) - S(1), is
    0.036 in the reference and matches the finite-element one to 7.2e-4 on h1 (<= 10 %
    asserted: the mesh errors largely cancel in the difference). Serial only
    (test_spin_density covers 2 ranks)."""
    if comm.size > 1:
        pytest.skip("checked serially; test_spin_density covers 2 ranks")
    common = dict(radii=(3.0, 5.0), D=(1.0, 2.5), kappa=(0.05,), T2=(40.0, 100.0), dim=3)
    layers = Layers(rho=(1.0, 0.4), **common)
    errors, sizes, order = errors_and_order(
        comm, ["sphere_2layers_h2.msh", "sphere_2layers_h1.msh"], layers)
    mesh = "sphere_2layers_h1.msh"
    cfg, s_rho, _ = simulate(comm, config(mesh, layers.D, layers.T2, layers.kappa,
                                          rho=layers.rho))
    _, s_one, _ = simulate(comm, config(mesh, layers.D, layers.T2, layers.kappa))
    q = cfg.sequences[0].q_per_um_ms()
    ref_effect = (pgse_signal(layers, DELTA, BIG_DELTA, q, modes=40)
                  - pgse_signal(Layers(**common), DELTA, BIG_DELTA, q, modes=40))
    effect = float(np.max(np.abs(ref_effect)))
    diff = float(np.max(np.abs((s_rho - s_one) - ref_effect)))
    print(f"two-layer sphere with rho: errors {errors}, h {sizes}, order {order:.2f}, "
          f"effect of rho {effect:.3g}, its error {diff:.3g}")
    assert errors[-1] <= 0.01
    assert order >= 1.8
    assert diff <= 0.1 * effect


def test_three_layer_cylinder_converges_to_the_radial_reference(comm):
    """Reference: multilayer cylinder (disk, gradient perpendicular to the axis), radii 2 / 3.5 /
    5 um, D 1 / 2 / 3 um^2/ms, T2 40 / 80 / 100 ms, interface kappa 0.05 / 0.2 um/ms: max
    error 7.0e-3 on 1 011 tets (h 0.54 um) and 3.7e-3 on 1 949 (h 0.43 um), observed order
    >= 1.8 (measured 3.0; 1.5e-3 on a 6 000-tet mesh, not shipped, continues at 2.4)."""
    layers = Layers(radii=(2.0, 3.5, 5.0), D=(1.0, 2.0, 3.0), kappa=(0.05, 0.2),
                    T2=(40.0, 80.0, 100.0), dim=2)
    errors, sizes, order = errors_and_order(
        comm, ["cylinder_3layers_h2.msh", "cylinder_3layers_h1.msh"], layers)
    print(f"three-layer cylinder: errors {errors}, h {sizes}, order {order:.2f}")
    assert errors[-1] <= 5e-3
    assert order >= 1.8


@pytest.mark.parametrize("D, kappa, tol", [
    ((1.0, 2.0, 3.0), (0.05, 0.2), 0.012),   # measured 0.0101
    ((2.0, 2.0, 2.0), (0.5, 0.5), 0.012),    # equal D, more permeable interfaces
])
def test_three_layer_sphere_matches_the_radial_reference(comm, D, kappa, tol):
    """Reference: multilayer sphere, radii 2 / 3.5 / 5 um, T2 40 / 80 / 100 ms, on the h = 1 um
    mesh (2 765 tets): max |S/S0 - ref| below the stated tolerance (the two-layer sphere's
    error at this size is 7.5e-3). Serial only: the two convergence tests above run the same
    model on 2 ranks."""
    if comm.size > 1:
        pytest.skip("checked serially; the convergence tests cover 2 ranks")
    layers = Layers(radii=(2.0, 3.5, 5.0), D=D, kappa=kappa, T2=(40.0, 80.0, 100.0), dim=3)
    cfg, s, _ = simulate(comm, config("sphere_3layers_h1.msh", D, layers.T2, kappa))
    ref = pgse_signal(layers, DELTA, BIG_DELTA, cfg.sequences[0].q_per_um_ms(), modes=40)
    err = float(np.max(np.abs(s - ref)))
    print(f"three-layer sphere D {D} kappa {kappa}: max error {err:.3g}")
    assert err <= tol


def test_membranes_have_their_own_permeability():
    """Reference: the mesh's own tags: each interface's faces carry its [[membrane]] kappa,
    every other face open_um_per_ms, and the ground-truth membrane is their union."""
    cfg = parse_config(config("sphere_3layers_h1.msh", (1, 2, 3), (40, 80, 100), (0.05, 0.2)))
    ph = build_phantom(cfg)
    grid = ph.grid
    for tag, k in ((101, 0.05), (102, 0.2)):
        ids = ph.faces.lookup(grid.membrane_triangles[grid.membrane_tags == tag])
        assert np.all(ids >= 0) and np.all(ph.kappa[ids] == k)
        assert len(ids) == {101: 154, 102: 384}[tag]   # gmsh's counts for the shipped mesh
    assert ph.membrane.sum() == 154 + 384
    assert np.all(ph.kappa[~ph.membrane] == 1.0e5)


def test_unit_um_scales_the_mesh():
    """Reference: the same mesh read with unit_um = 1000 (a file in mm) has 1000^3 the volume."""
    text = config("cylinder_3layers_h2.msh", (1, 2, 3), (40, 80, 100), (0.05, 0.2))
    base = build_phantom(parse_config(text)).grid.volumes().sum()
    scaled = build_phantom(parse_config(text.replace(
        'kind = "file"\n', 'kind = "file"\nunit_um = 1000.0\n'))).grid.volumes().sum()
    assert scaled == pytest.approx(base * 1e9, rel=1e-12)


GOOD = config("sphere_3layers_h1.msh", (1, 2, 3), (40, 80, 100), (0.05, 0.2))


@pytest.mark.parametrize("text, field, fragment", [
    (GOOD.replace("tag = 102", "tag = 107"), "membrane[1].tag", "no triangles tagged 107"),
    (GOOD.replace("tag = 102", "tag = 101"), "membrane[1].tag", "already"),
    (GOOD.replace("open_um_per_ms = 1", "barrier_um_per_ms = 0.1\nopen_um_per_ms = 1"),
     "permeability.barrier_um_per_ms", "per membrane"),
    (GOOD.replace('kind = "file_tags"', 'kind = "none"'), "geometry.kind", "file_tags"),
    (GOOD.replace('kind = "file"\n', 'kind = "file"\nmembrane_tag = 101\n'),
     "grid.membrane_tag", "[[membrane]]"),
    (GOOD.replace("kappa_um_per_ms = 0.2", "kappa_um_per_ms = -0.2"),
     "membrane[1].kappa_um_per_ms", ">= 0"),
    (GOOD.replace("tag = 3\n", "tag = 4\n"), "compartment[2].tag", "no tetrahedron"),
    (GOOD.replace('kind = "file"\n', 'kind = "file"\nunit_um = 0.0\n'), "grid.unit_um", "> 0"),
])
def test_bad_membranes_are_refused(text, field, fragment):
    """Reference: docs/compartments.md: one InputError naming the table and field."""
    with pytest.raises(InputError) as info:
        build_phantom(parse_config(text, source="m.toml"))
    assert info.value.field == field, str(info.value)
    assert fragment in str(info.value), str(info.value)
