"""TOML configuration: sections, defaults, path resolution, validation errors, curriculum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spinverse_fem.config import GeometryConfig, Stage, load_config, parse_config
from spinverse_fem.config.protocol import Sequence, fibonacci_directions
from spinverse_fem.errors import InputError
from spinverse_fem.inverse.curriculum import stages

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE = """\
[grid]
kind = "box"
lower_um = [0.0, 0.0, 0.0]
upper_um = [10.0, 10.0, 10.0]
cells = [4, 4, 4]

[geometry]
kind = "sphere"
radius_um = 3.0

[permeability]
barrier_um_per_ms = 0.1
open_um_per_ms = 100.0

[physics]
diffusivity_um2_per_ms = 2.0

[[sequence]]
type = "pgse"
name = "long"
delta_ms = 10.0
Delta_ms = 60.0
b_s_per_mm2 = [0.0, 1000.0]
directions = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]

[[sequence]]
type = "pgse"
name = "short"
delta_ms = 10.0
Delta_ms = 20.0
b_s_per_mm2 = [0.0, 1000.0]
fibonacci = 3
"""


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _variant(old, new):
    assert old in BASE, old
    return BASE.replace(old, new, 1)


# -- the examples -------------------------------------------------------------------------------


def test_plane_box_example():
    """examples/plane_box.toml: every value as written in the file."""
    path = EXAMPLES / "plane_box.toml"
    c = load_config(path)
    assert c.text == path.read_text() and c.source == str(path)
    g = c.grid
    assert (g.kind, g.lower_um, g.upper_um, g.cells) == ("box", (0, 0, 0), (10, 10, 10), (20, 4, 4))
    assert c.geometry == GeometryConfig("plane", axis=(1.0, 0.0, 0.0), position_um=4.0)
    p = c.permeability
    assert (p.barrier_um_per_ms, p.open_um_per_ms, p.outer) == (0.1, 1.0e4, "neumann")
    assert c.physics.diffusivity_um2_per_ms == 2.0 and c.physics.t2_ms is None
    assert c.eigen.length_scale_um == 1.0
    (s,) = c.sequences
    assert (s.delta_ms, s.Delta_ms, s.num_measurements) == (5.0, 20.0, 12)
    np.testing.assert_array_equal(s.b_s_per_mm2, np.repeat([0.0, 500.0, 1000.0, 2000.0], 3))
    np.testing.assert_array_equal(s.directions[-1], [0.6, 0.8, 0.0])
    assert c.target is None


def test_paper_torus_example():
    """examples/paper_torus.toml holds the paper set-up (paper_setup.md): BCC 4 cubes of 20/3 um,
    torus R 10 r 6 about z, kappa 0.01 / 100 um/ms with Robin outer faces, D = 2, l = 2 um,
    PGSE 5/6, 10/20, 10/60 ms with b = 0..5000 step 1000 and 30 Fibonacci directions."""
    c = load_config(EXAMPLES / "paper_torus.toml")
    assert (c.grid.kind, c.grid.cubes, c.grid.center_um) == ("bcc", 4, (0, 0, 0))
    assert c.grid.cube_um == pytest.approx(20 / 3, rel=1e-7)
    geo = c.geometry
    assert (geo.kind, geo.center_um, geo.axis) == ("torus", (0, 0, 0), (0, 0, 1))
    assert (geo.major_radius_um, geo.minor_radius_um) == (10.0, 6.0)
    p = c.permeability
    assert (p.barrier_um_per_ms, p.open_um_per_ms, p.outer) == (0.01, 100.0, "robin")
    assert (c.physics.diffusivity_um2_per_ms, c.eigen.length_scale_um,
            c.eigen.max_modes) == (2.0, 2.0, 120)
    assert [s.name for s in c.sequences] == ["5/6", "10/20", "10/60"]
    for s, (d, D) in zip(c.sequences, [(5, 6), (10, 20), (10, 60)]):
        assert (s.delta_ms, s.Delta_ms) == (d, D)
        np.testing.assert_array_equal(s.b_s_per_mm2, np.repeat(np.arange(0, 5001, 1000.0), 30))
        np.testing.assert_array_equal(s.directions[:30], fibonacci_directions(30))
    # long_to_short: 10/60, 10/20, then 5/6 ms (the paper's staged preset stops after 10/20);
    # manifold weight 4 (the paper's 2 leaves BadEdge at 11 % on this example)
    assert stages(c) == tuple(Stage((i,), 200, 2.0, 4.0) for i in (2, 1, 0))


@pytest.mark.parametrize("name", ["paper_torus_camino.toml", "paper_torus_fsl.toml"])
def test_file_protocol_examples_match_paper_torus(name):
    """The Camino and FSL examples describe the same measurements as paper_torus.toml
    (to the precision of the files: repr doubles for Camino, 10 digits for FSL)."""
    ref = load_config(EXAMPLES / "paper_torus.toml").sequences
    got = load_config(EXAMPLES / name).sequences
    assert [s.name for s in got] == [s.name for s in ref]
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b.segments, a.segments, rtol=1e-12)
        np.testing.assert_allclose(b.b_s_per_mm2, a.b_s_per_mm2, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(b.directions, a.directions, atol=1e-9)


# -- sections and defaults ----------------------------------------------------------------------


def test_defaults_follow_the_paper():
    """Omitted sections take the documented defaults (paper_setup.md for [inversion])."""
    c = parse_config(BASE)
    assert c.eigen.length_scale_um == 2.0 and c.eigen.max_modes == 500 and c.eigen.num_modes is None
    assert c.eigen.tolerance == 1e-10 and c.full_order.time_step_ms == 0.05
    assert c.permeability.outer == "neumann"
    inv = c.inversion
    assert (inv.kappa_min_um_per_ms, inv.kappa_max_um_per_ms,
            inv.start_um_per_ms) == (0.01, 100.0, 1.0)
    assert (inv.threshold_um_per_ms, inv.misfit_weight,
            inv.normalisation) == (1.0, 100.0, "reference")
    assert (inv.iterations_per_stage, inv.continuity_weight, inv.manifold_weight) == (200, 2.0, 2.0)
    assert (inv.adam_lr, inv.adam_warmup, inv.adam_final_lr_factor,
            inv.clip_grad_norm, inv.adam_eps) == (0.6, 50, 0.1, 1.0, 1e-8)
    assert (inv.optimizer, inv.curriculum, inv.checkpoint_every) == ("blmvm", "staged", 10)


def test_sequence_entries_become_sequences():
    """pgse with explicit directions and with fibonacci = N; measurement order b outer."""
    c = parse_config(BASE)
    long_, short = c.sequences
    assert long_.name == "long" and long_.num_measurements == 4
    np.testing.assert_array_equal(long_.directions[2:], [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(short.directions[3:], fibonacci_directions(3))
    assert c.sequence_index("short") == 1


def test_waveform_sequence():
    """type = "waveform" keeps the segments and gets b_factor from them."""
    text = BASE + """
[[sequence]]
type = "waveform"
name = "ogse"
segments = [[2.0, 1.0], [2.0, -1.0], [2.0, 1.0], [2.0, -1.0]]
b_s_per_mm2 = [0.0, 100.0]
fibonacci = 2
"""
    s = parse_config(text).sequences[2]
    assert s.segments == ((2.0, 1.0), (2.0, -1.0), (2.0, 1.0), (2.0, -1.0))
    # F is a triangle wave of height 2 over four 2 ms ramps: int F^2 = 4 * (2^2 * 2 / 3).
    assert s.b_factor_ms3 == pytest.approx(32 / 3)
    assert s.delta_ms is None


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    """A camino file and a grid file named relative to the config are found from any cwd;
    a camino file with several timings gives several sequences, prefixed by `name`."""
    sub = tmp_path / "cfg"
    sub.mkdir()
    from spinverse_fem.config.protocol import write_camino_scheme

    write_camino_scheme(
        sub / "two.scheme",
        [Sequence.pgse(10.0, 60.0, [0.0, 1000.0], [[0, 0, 1]]),
         Sequence.pgse(5.0, 6.0, [500.0], [[1, 0, 0]])],
    )
    (sub / "grid.msh").write_text("not read by the config")
    text = BASE.split("[[sequence]]")[0].replace(
        'kind = "box"\nlower_um = [0.0, 0.0, 0.0]\nupper_um = [10.0, 10.0, 10.0]\n'
        'cells = [4, 4, 4]',
        'kind = "file"\npath = "grid.msh"\nmembrane_tag = 7',
    ).replace(SPHERE, 'kind = "file_tags"')
    text += ('[[sequence]]\ntype = "camino"\nname = "cam"\nfile = "two.scheme"\n\n'
             '[target]\nfile = "out/signals.h5"\nnoise_snr = 50.0\nseed = 3\n')
    path = _write(sub, text)
    monkeypatch.chdir(tmp_path)
    c = load_config(Path("cfg") / "run.toml")
    assert c.grid.path.resolve() == (sub / "grid.msh").resolve() and c.grid.membrane_tag == 7
    assert [s.name for s in c.sequences] == ["cam 10/60", "cam 5/6"]
    assert c.target.file.resolve() == (sub / "out" / "signals.h5").resolve()
    assert (c.target.noise_snr, c.target.seed, c.target.grid_refinement) == (50.0, 3, None)
    assert c.text == path.read_text()


@pytest.mark.parametrize(
    "section, expected",
    [
        ('kind = "none"', GeometryConfig("none")),
        ('kind = "plane"\naxis = [0.0, 0.6, 0.8]\nposition_um = -1.5',
         GeometryConfig("plane", axis=(0, 0.6, 0.8), position_um=-1.5)),
        (
            'kind = "cylinder"\naxis = "y"\nradius_um = 2.0',
            GeometryConfig("cylinder", center_um=(0, 0, 0), axis=(0, 1, 0), radius_um=2.0),
        ),
        (
            'kind = "cylinder"\ncenter_um = [1.0, 2.0, 3.0]\naxis = "z"\nradius_um = 2.0\n'
            'height_um = 4.0',
            GeometryConfig("cylinder", center_um=(1, 2, 3), axis=(0, 0, 1), radius_um=2.0,
                           height_um=4.0),
        ),
        ('kind = "bent_axon"\nradius_um = 4.5\nsegments = 6\nseed = 11',
         GeometryConfig("bent_axon", radius_um=4.5, segments=6, seed=11)),
        (
            'kind = "bent_axon"\nradius_um = 4.5\n'
            'control_points_um = [[0, 0, -10], [1, 0, 0], [0, 0, 10]]',
            GeometryConfig("bent_axon", radius_um=4.5,
                           control_points_um=((0, 0, -10), (1, 0, 0), (0, 0, 10))),
        ),
        ('kind = "two_axons"\nradius_um = 3.0', GeometryConfig("two_axons", radius_um=3.0, seed=0)),
        (
            'kind = "sphere"\nradius_um = 3.0\ninside_rule = "centroid"',
            GeometryConfig("sphere", center_um=(0, 0, 0), radius_um=3.0, inside_rule="centroid"),
        ),
    ],
)
def test_geometry_kinds(section, expected):
    """Each geometry kind reads its own keys; unused fields stay None."""
    text = _variant('kind = "sphere"\nradius_um = 3.0', section)
    assert parse_config(text).geometry == expected


def test_geometry_paper_file_and_bcc_grid(tmp_path):
    """kind = "paper" needs an existing .npz; bcc centre defaults to the origin."""
    (tmp_path / "gt.npz").write_bytes(b"")
    text = _variant('kind = "sphere"\nradius_um = 3.0', 'kind = "paper"\npath = "gt.npz"').replace(
        'kind = "box"\nlower_um = [0.0, 0.0, 0.0]\nupper_um = [10.0, 10.0, 10.0]\n'
        'cells = [4, 4, 4]',
        'kind = "bcc"\ncubes = 3\ncube_um = 5',
    )
    c = load_config(_write(tmp_path, text))
    assert c.geometry.path == tmp_path / "gt.npz"
    assert (c.grid.cubes, c.grid.cube_um, c.grid.center_um) == (3, 5.0, (0, 0, 0))


# -- validation errors --------------------------------------------------------------------------

GRID_BOX = ('kind = "box"\nlower_um = [0.0, 0.0, 0.0]\nupper_um = [10.0, 10.0, 10.0]\n'
            'cells = [4, 4, 4]')
SPHERE = 'kind = "sphere"\nradius_um = 3.0'
CUBE_MSH = EXAMPLES.parent / "meshes" / "data" / "cube_membrane.msh"

ERROR_CASES = {
    "unknown key": (BASE.replace("[physics]\n", "[physics]\ncolour = 1\n"), "physics.colour",
                    "unknown key"),
    "unknown section": (BASE + "\n[solver]\nx = 1\n", "solver", "unknown section"),
    "key of another kind": (_variant(SPHERE, SPHERE + "\naxis = 'z'"), "geometry.axis",
                            "unknown key for kind 'sphere'"),
    "unknown sequence key": (_variant("fibonacci = 3", "fibonacci = 3\nbvals = 'x'"),
                             "sequence[1].bvals", "unknown key"),
    "negative kappa": (
        _variant("barrier_um_per_ms = 0.1", "barrier_um_per_ms = -1"),
        "permeability.barrier_um_per_ms",
        "must be >= 0, got -1",
    ),
    "zero open kappa": (_variant("open_um_per_ms = 100.0", "open_um_per_ms = 0.0"),
                        "permeability.open_um_per_ms", "> 0"),
    "barrier above open": (
        _variant("barrier_um_per_ms = 0.1", "barrier_um_per_ms = 500.0"),
        "permeability.barrier_um_per_ms",
        "<= open_um_per_ms",
    ),
    "negative D": (
        _variant("diffusivity_um2_per_ms = 2.0", "diffusivity_um2_per_ms = -2.0"),
        "physics.diffusivity_um2_per_ms",
        "> 0",
    ),
    "infinite D": (_variant("diffusivity_um2_per_ms = 2.0", "diffusivity_um2_per_ms = inf"),
                   "physics.diffusivity_um2_per_ms", "finite"),
    "non-unit direction": (
        _variant("[0.0, 1.0, 0.0]]", "[0.0, 1.0, 0.1]]"),
        "sequence[0].directions[1]",
        "unit vector",
    ),
    "negative b": (_variant("b_s_per_mm2 = [0.0, 1000.0]", "b_s_per_mm2 = [0.0, -1000.0]"),
                   "sequence[0].b_s_per_mm2[1]", ">= 0"),
    "delta above Delta": (_variant("Delta_ms = 20.0", "Delta_ms = 5.0"), "sequence[1].delta_ms",
                          "<= Delta_ms"),
    "string for number": (_variant("delta_ms = 10.0", 'delta_ms = "ten"'), "sequence[0].delta_ms",
                          "must be a number"),
    "bool for number": (_variant("radius_um = 3.0", "radius_um = true"), "geometry.radius_um",
                        "must be a number"),
    "float for integer": (_variant("cells = [4, 4, 4]", "cells = [4, 4.0, 4]"), "grid.cells[1]",
                          "must be an integer"),
    "wrong vector length": (_variant("lower_um = [0.0, 0.0, 0.0]", "lower_um = [0.0, 0.0]"),
                            "grid.lower_um", "3 numbers"),
    "inverted box": (_variant("upper_um = [10.0, 10.0, 10.0]", "upper_um = [10.0, -1.0, 10.0]"),
                     "grid.upper_um", "exceed"),
    "bad choice": (
        _variant("open_um_per_ms = 100.0", 'open_um_per_ms = 100.0\nouter = "dirichlet"'),
        "permeability.outer",
        "one of",
    ),
    "missing key": (_variant("barrier_um_per_ms = 0.1\n", ""), "permeability.barrier_um_per_ms",
                    "required"),
    "misspelt section": (BASE.replace("[permeability]", "[permeabilty]"), "permeabilty",
                         "unknown section"),
    "missing section": (
        BASE.replace("[permeability]\nbarrier_um_per_ms = 0.1\nopen_um_per_ms = 100.0\n", ""),
        "permeability",
        "required section",
    ),
    "no sequence": (BASE.split("[[sequence]]")[0], "sequence", "at least one"),
    "sequence not array": (BASE.split("[[sequence]]")[0] + "[sequence]\ntype = 'pgse'\n",
                           "sequence", "array of tables"),
    "directions and fibonacci": (
        _variant("fibonacci = 3", "fibonacci = 3\ndirections = [[1.0, 0.0, 0.0]]"),
        "sequence[1].directions",
        "exactly one",
    ),
    "neither directions nor fibonacci": (_variant("fibonacci = 3\n", ""), "sequence[1].directions",
                                         "exactly one"),
    "duplicate name": (_variant('name = "short"', 'name = "long"'), "sequence[1].name",
                       "duplicate"),
    "cylinder axis non-unit": (
        _variant(SPHERE, 'kind = "cylinder"\naxis = [1.0, 1.0, 0.0]\nradius_um = 2.0'),
        "geometry.axis",
        "unit vector",
    ),
    "axis letter": (_variant(SPHERE, 'kind = "plane"\naxis = "w"\nposition_um = 1.0'),
                    "geometry.axis", "'x', 'y', 'z'"),
    "fat torus": (
        _variant(SPHERE,
                 'kind = "torus"\naxis = "z"\nmajor_radius_um = 3.0\nminor_radius_um = 4.0'),
        "geometry.minor_radius_um",
        "< major_radius_um",
    ),
    "bad inside rule": (_variant(SPHERE, SPHERE + '\ninside_rule = "majority"'),
                        "geometry.inside_rule", "one of"),
    "inside rule on a file": (
        _variant(SPHERE, 'kind = "paper"\npath = "x.npz"\ninside_rule = "centroid"'),
        "geometry.inside_rule",
        "unknown key for kind 'paper'",
    ),
    "file_tags without grid file": (_variant(SPHERE, 'kind = "file_tags"'), "geometry.kind",
                                    "grid.kind = 'file'"),
    "membrane_tag without file_tags": (
        BASE.replace(GRID_BOX, f'kind = "file"\npath = "{CUBE_MSH}"\nmembrane_tag = 2'),
        "grid.membrane_tag", "only with geometry.kind = 'file_tags'"),
    "file_tags without membrane_tag": (
        BASE.replace(GRID_BOX, f'kind = "file"\npath = "{CUBE_MSH}"').replace(
            SPHERE, 'kind = "file_tags"'),
        "grid.membrane_tag", "name its tag"),
    "bent axon both ways": (
        _variant(SPHERE, 'kind = "bent_axon"\nradius_um = 4.0\nsegments = 3\n'
                         'control_points_um = [[0, 0, 0], [0, 0, 1]]'),
        "geometry.segments",
        "not allowed",
    ),
    "missing file": (_variant(GRID_BOX, 'kind = "file"\npath = "nowhere.msh"'), "grid.path",
                     "file not found"),
    "bcc too small": (_variant(GRID_BOX, 'kind = "bcc"\ncubes = 1\ncube_um = 5.0'), "grid.cubes",
                      ">= 2"),
    "num_modes above max": (BASE + "\n[eigen]\nmax_modes = 10\nnum_modes = 20\n", "eigen.num_modes",
                            "<= max_modes"),
    "kappa range inverted": (
        BASE + "\n[inversion]\nkappa_min_um_per_ms = 10.0\nkappa_max_um_per_ms = 1.0\n",
        "inversion.kappa_max_um_per_ms",
        "> kappa_min",
    ),
    "zero adam eps": (BASE + "\n[inversion]\nadam_eps = 0.0\n", "inversion.adam_eps", "> 0"),
    "start outside range": (BASE + "\n[inversion]\nstart_um_per_ms = 1000.0\n",
                            "inversion.start_um_per_ms", "<= 100"),
    "stage without custom": (BASE + "\n[[inversion.stage]]\nsequences = [0]\n", "inversion.stage",
                             "custom"),
    "custom without stage": (BASE + "\n[inversion]\ncurriculum = 'custom'\n", "inversion.stage",
                             "at least one"),
    "stage unknown name": (
        BASE + "\n[inversion]\ncurriculum = 'custom'\n[[inversion.stage]]\n"
               "sequences = ['long', 'medium']\n",
        "inversion.stage[0].sequences[1]",
        "no sequence named 'medium'",
    ),
    "stage index out of range": (
        BASE + "\n[inversion]\ncurriculum = 'custom'\n[[inversion.stage]]\nsequences = [2]\n",
        "inversion.stage[0].sequences[0]",
        "out of range",
    ),
    "stage unknown key": (
        BASE + "\n[inversion]\ncurriculum = 'custom'\n[[inversion.stage]]\n"
               "sequences = [0]\nlr = 1.0\n",
        "inversion.stage[0].lr",
        "unknown key",
    ),
    "negative snr": (BASE + "\n[target]\nnoise_snr = -3.0\n", "target.noise_snr", "> 0"),
    "refinement zero": (BASE + "\n[target]\ngrid_refinement = 0\n", "target.grid_refinement",
                        ">= 1"),
    "non-refocused waveform": (
        BASE + "\n[[sequence]]\ntype = 'waveform'\nsegments = [[1.0, 1.0], [1.0, 0.5]]\n"
               "b_s_per_mm2 = [0.0]\nfibonacci = 1\n",
        "sequence[2].segments",
        "not refocused",
    ),
    # issue 11: what used to end in a traceback, a hang or a huge allocation
    "empty sequence list": ("sequence = []\n" + BASE[:BASE.index("[[sequence]]")], "sequence",
                            "at least one [[sequence]]"),
    "unknown optimiser": (BASE + "\n[inversion]\noptimizer = 'nosuchtao'\n", "inversion.optimizer",
                          "unknown optimiser 'nosuchtao'"),
    "TAO python type": (BASE + "\n[inversion]\noptimizer = 'python'\n", "inversion.optimizer",
                        "unknown optimiser"),
    "kappa 1e300": (BASE.replace("open_um_per_ms = 100.0", "open_um_per_ms = 1e300"),
                    "permeability.open_um_per_ms", "not a physical permeability"),
    "kappa_max 1e300": (BASE + "\n[inversion]\nkappa_max_um_per_ms = 1e300\n",
                        "inversion.kappa_max_um_per_ms", "at most 1e+06 um/ms"),
    "fibonacci 1e7": (_variant("fibonacci = 3", "fibonacci = 10000000"), "sequence[1].fibonacci",
                      "10000000 measurements in one sequence; at most 100000"),
    "b x directions": (_variant("fibonacci = 3", "fibonacci = 60000"), "sequence[1].b_s_per_mm2",
                       "120000 measurements (2 b-values x 60000 directions)"),
    "bcc cubes 1e4": (_variant(GRID_BOX, 'kind = "bcc"\ncubes = 10000\ncube_um = 1.0'),
                      "grid.cubes", "1.2e+13 tetrahedra; at most 2e+06"),
    "box cells huge": (_variant(GRID_BOX, GRID_BOX.replace("[4, 4, 4]", "[200, 200, 200]")),
                       "grid.cells", "4.8e+07 tetrahedra"),
    "eigenbasis too large": (_variant(GRID_BOX, GRID_BOX.replace("[4, 4, 4]", "[66, 66, 66]")),
                             "grid.cells", "GiB for the eigenbasis"),
    "refinement 1000": (BASE + "\n[target]\ngrid_refinement = 1000\n", "target.grid_refinement",
                        "3.84e+11 tetrahedra (the grid refined 1000 times)"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_validation_errors_name_file_and_field(tmp_path, case):
    """Each bad config raises InputError whose text is 'file: field: message'."""
    text, field, fragment = ERROR_CASES[case]
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_config(path)
    err = info.value
    assert str(err).startswith(f"{path}: {field}: "), str(err)
    assert fragment in err.message, str(err)


def test_size_limits_follow_the_estimates():
    """Reference: the exact tet counts of the generators (12 n^2 (n-1), 6 nx ny nz); 1.7 M tets
    pass with 20 modes but not with the default 500 (eigenbasis memory)."""
    from spinverse_fem.config.schema import GridConfig, estimated_tetrahedra
    from spinverse_fem.meshes.bcc import bcc_grid
    from spinverse_fem.meshes.box import box_grid

    assert (estimated_tetrahedra(GridConfig("bcc", cubes=3, cube_um=1.0))
            == bcc_grid(3, 1.0).num_tets)
    assert (estimated_tetrahedra(GridConfig("bcc", cubes=2, cube_um=1.0), 2)
            == bcc_grid(4, 1.0).num_tets)
    box = GridConfig("box", lower_um=(0, 0, 0), upper_um=(1, 1, 1), cells=(3, 2, 1))
    assert estimated_tetrahedra(box, 2) == box_grid((0, 0, 0), (1, 1, 1), (6, 4, 2)).num_tets
    big = _variant(GRID_BOX, GRID_BOX.replace("[4, 4, 4]", "[66, 66, 66]"))
    assert parse_config(big + "\n[eigen]\nmax_modes = 20\n").grid.cells == (66, 66, 66)


def test_optimiser_names():
    for name in ("adam", "Adam", "blmvm", "bqnls", "lmvm"):
        assert parse_config(
            BASE + f"\n[inversion]\noptimizer = '{name}'\n").inversion.optimizer == name


def test_files_the_config_reads_are_recorded(tmp_path):
    """Reference: the camino file of the example; outputs are checked against these."""
    cfg = load_config(EXAMPLES / "paper_torus_camino.toml")
    assert [f for f, _ in cfg.input_files] == ["sequence[2].file"]
    assert cfg.input_files[0][1].name == "paper_10_60.scheme"
    cfg = load_config(EXAMPLES / "paper_torus_fsl.toml")
    assert [f for f, _ in cfg.input_files] == ["sequence[2].bvals", "sequence[2].bvecs"]
    assert parse_config(BASE).input_files == ()


@pytest.mark.parametrize("data, words", [
    (BASE.replace("sphere", "sph\u00e8re").encode("latin-1"), "not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", "not UTF-8 text"),
    (BASE.encode() + b"\x00\x00", "contains NUL bytes"),
])
def test_config_that_is_not_text(tmp_path, data, words):
    path = tmp_path / "run.toml"
    path.write_bytes(data)
    with pytest.raises(InputError, match=words) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line ")
    with pytest.raises(InputError, match="not a regular file"):
        load_config(tmp_path)


def test_invalid_toml_and_missing_file(tmp_path):
    """Syntax errors and unreadable files name the file."""
    path = _write(tmp_path, "[grid\nkind = 1")
    with pytest.raises(InputError, match="invalid TOML") as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    with pytest.raises(InputError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_errors_from_scheme_file_name_that_file(tmp_path):
    """A bad line in a referenced Camino file is reported against the scheme file."""
    (tmp_path / "bad.scheme").write_text("VERSION: STEJSKALTANNER\n1 1 0 0.05 0.03 0.01 0.05\n")
    text = BASE + '\n[[sequence]]\ntype = "camino"\nfile = "bad.scheme"\n'
    with pytest.raises(InputError) as info:
        load_config(_write(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 'bad.scheme'}: line 2: ")


# -- curriculum ---------------------------------------------------------------------------------

PAPER_SEQS = "".join(
    f'\n[[sequence]]\ntype = "pgse"\n{name}delta_ms = {d}\nDelta_ms = {D}\n'
    'b_s_per_mm2 = [0.0, 1000.0]\nfibonacci = 2\n'
    for name, d, D in [("", 5.0, 6.0), ("", 10.0, 60.0), ("", 10.0, 20.0)]
)
HEAD = BASE.split("[[sequence]]")[0]


def test_staged_picks_10_60_then_10_20():
    """staged: the 10/60 ms sequence (index 1 here) alone, then 10/20 ms (index 2)."""
    c = parse_config(HEAD + PAPER_SEQS
                     + "\n[inversion]\niterations_per_stage = 7\ncontinuity_weight = 0.5\n")
    assert stages(c) == (Stage((1,), 7, 0.5, 2.0), Stage((2,), 7, 0.5, 2.0))


def test_split_uses_both_jointly():
    """split: the same two sequences together in every stage, as many stages as staged."""
    c = parse_config(HEAD + PAPER_SEQS + "\n[inversion]\ncurriculum = 'split'\n")
    assert stages(c) == (Stage((1, 2), 200, 2.0, 2.0),) * 2


def test_long_to_short_runs_every_sequence_by_diffusion_time():
    """long_to_short: one stage per sequence, Delta - delta/3 decreasing: 10/60 (56.7 ms,
    index 1), 10/20 (16.7 ms, index 2), 5/6 (4.3 ms, index 0)."""
    c = parse_config(HEAD + PAPER_SEQS
                     + "\n[inversion]\ncurriculum = 'long_to_short'\niterations_per_stage = 9\n")
    assert stages(c) == (Stage((1,), 9, 2.0, 2.0), Stage((2,), 9, 2.0, 2.0),
                         Stage((0,), 9, 2.0, 2.0))
    # diffusion time, not Delta, decides: 30/40 (30 ms) comes after 5/32 (30.3 ms)
    seqs = "".join(
        f'\n[[sequence]]\ntype = "pgse"\ndelta_ms = {d}\nDelta_ms = {D}\n'
        'b_s_per_mm2 = [0.0]\nfibonacci = 1\n'
        for d, D in [(30.0, 40.0), (5.0, 32.0)]
    )
    c = parse_config(HEAD + seqs + "\n[inversion]\ncurriculum = 'long_to_short'\n")
    assert [s.sequences for s in stages(c)] == [(1,), (0,)]


def test_cumulative_adds_one_sequence_per_stage_by_diffusion_time():
    """cumulative: the long_to_short order, stage k fitting the first k jointly: {10/60},
    {10/60, 10/20}, all three (indices ascending within a stage)."""
    c = parse_config(HEAD + PAPER_SEQS
                     + "\n[inversion]\ncurriculum = 'cumulative'\niterations_per_stage = 9\n")
    assert [s.sequences for s in stages(c)] == [(1,), (1, 2), (0, 1, 2)]
    assert all(s.iterations == 9 for s in stages(c))


def test_staged_fallback_longest_delta_first():
    """Without 10/60 and 10/20: the two sequences with the longest Delta, longest first
    (BASE's 'long' is 10/60 by timing, so it is found; here timings differ)."""
    seqs = "".join(
        f'\n[[sequence]]\ntype = "pgse"\ndelta_ms = {d}\nDelta_ms = {D}\n'
        'b_s_per_mm2 = [0.0]\nfibonacci = 1\n'
        for d, D in [(5.0, 30.0), (8.0, 25.0), (10.0, 40.0)]
    )
    assert stages(parse_config(HEAD + seqs)) == (Stage((2,), 200, 2.0, 2.0),
                                                 Stage((0,), 200, 2.0, 2.0))
    one = HEAD + ('[[sequence]]\ntype = "pgse"\ndelta_ms = 5.0\nDelta_ms = 30.0\n'
                  'b_s_per_mm2 = [0.0]\nfibonacci = 1\n')
    assert stages(parse_config(one)) == (Stage((0,), 200, 2.0, 2.0),)


def test_staged_finds_paper_timings_under_other_names():
    """BASE names its sequences 'long' (10/60) and 'short' (10/20): found by timing."""
    assert [s.sequences for s in stages(parse_config(BASE))] == [(0,), (1,)]


def test_custom_stages():
    """custom: names or indices, per-stage overrides, the rest from [inversion]."""
    text = BASE + """
[inversion]
curriculum = "custom"
iterations_per_stage = 50
manifold_weight = 1.5
[[inversion.stage]]
sequences = ["short", 0]
[[inversion.stage]]
sequences = [1]
iterations = 30
continuity_weight = 0.0
"""
    c = parse_config(text)
    assert stages(c) == (Stage((1, 0), 50, 2.0, 1.5), Stage((1,), 30, 0.0, 1.5))


def test_inside_rule_centroid_builds_the_centroid_membrane():
    """Reference: the torus inside test (sqrt(x^2 + y^2) - R)^2 + z^2 < r^2 written out here on
    the tet centroids / all 4 vertices, and faces with exactly one inside neighbour counted
    from the face table's cells. The centroid rule must give a different, larger region."""
    from spinverse_fem.geometry.phantom import build_phantom

    base = (EXAMPLES / "paper_torus.toml").read_text()
    rules = {}
    for rule in ("vertices", "centroid"):
        text = base.replace("minor_radius_um = 6.0",
                            f'minor_radius_um = 6.0\ninside_rule = "{rule}"')
        cfg = parse_config(text)
        assert cfg.geometry.inside_rule == rule
        pb = build_phantom(cfg)
        p = pb.grid.points

        def inside(q):
            return (np.hypot(q[..., 0], q[..., 1]) - 10.0) ** 2 + q[..., 2] ** 2 < 36.0

        tets = pb.grid.tets
        ins = inside(p[tets].mean(axis=1)) if rule == "centroid" else inside(p[tets]).all(axis=1)
        cells = pb.faces.cells
        n_inside = ins[cells[:,
                             0]].astype(int) + np.where(cells[:, 1] >= 0, ins[cells[:, 1]], False)
        assert np.array_equal(pb.membrane, n_inside == 1)
        rules[rule] = (int(ins.sum()), int(pb.membrane.sum()))
    assert rules["vertices"] == (64, 88)  # the paper's torus file
    assert rules["centroid"][0] > 64


def test_paper_preset_is_three_lines_away_from_the_default_example():
    """Reference: the paper's setup (shared/docs/paper_setup.md): stages 10/60 ms then 10/20 ms,
    manifold weight 2, Adam (eps 1e-8, PyTorch's). The README says the default example is three
    lines away from it."""
    import re

    text = (EXAMPLES / "paper_torus.toml").read_text()
    text, n1 = re.subn(r'^curriculum = .*$', 'curriculum = "staged"', text, flags=re.M)
    text, n2 = re.subn(r'^manifold_weight = .*$', 'manifold_weight = 2.0', text, flags=re.M)
    text, n3 = re.subn(r'^adam_eps = .*$', 'adam_eps = 1e-8', text, flags=re.M)
    assert (n1, n2, n3) == (1, 1, 1)
    cfg = parse_config(text, base_dir=EXAMPLES)
    assert cfg.inversion.adam_eps == 1e-8
    names = [[cfg.sequences[i].name for i in s.sequences] for s in stages(cfg)]
    assert names == [["10/60"], ["10/20"]]
    assert all(s.manifold_weight == 2.0 and s.continuity_weight == 2.0 for s in stages(cfg))
    assert cfg.inversion.optimizer == "adam" and cfg.inversion.adam_lr == 0.6
