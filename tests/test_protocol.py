"""Gradient sequences: waveform maths, Fibonacci directions, Camino and FSL readers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad

from spinverse_fem.config.protocol import (
    Sequence,
    fibonacci_directions,
    read_camino_scheme,
    read_fsl,
    write_camino_scheme,
)
from spinverse_fem.errors import InputError

GAMMA = 2.6751525e8  # rad/s/T, Camino's value, restated as the test's reference

# -- Fibonacci lattice --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 30, 500])
def test_fibonacci_unit_and_lattice_heights(n):
    """Unit vectors; heights equal the lattice definition z_i = 1 - (2i+1)/n."""
    d = fibonacci_directions(n)
    assert d.shape == (n, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-14)
    np.testing.assert_allclose(d[:, 2], 1.0 - (2.0 * np.arange(n) + 1.0) / n, atol=1e-14)


def test_fibonacci_azimuth_steps_by_golden_angle():
    """Consecutive azimuths differ by pi (3 - sqrt 5) modulo 2 pi."""
    d = fibonacci_directions(40)
    step = np.diff(np.unwrap(np.arctan2(d[:, 1], d[:, 0])))
    golden = math.pi * (3 - math.sqrt(5))
    np.testing.assert_allclose(np.mod(step - golden + math.pi, 2 * math.pi) - math.pi, 0.0,
                               atol=1e-12)


@pytest.mark.parametrize("n", [30, 200])
def test_fibonacci_well_spread(n):
    """Against the equal-area spacing sqrt(4 pi / n): nearest-neighbour angles lie in
    [0.7, 1.2] x spacing, no point of a dense random cloud is farther than 0.9 x spacing
    from a direction (covering radius), and the mean vector is below 1/n."""
    d = fibonacci_directions(n)
    spacing = math.sqrt(4 * math.pi / n)
    c = np.clip(d @ d.T, -1, 1)
    np.fill_diagonal(c, -1)
    nn = np.arccos(c.max(axis=1))
    assert nn.max() < 1.2 * spacing
    assert nn.min() > 0.7 * spacing
    p = np.random.default_rng(1).normal(size=(20000, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    assert np.arccos(np.clip((p @ d.T).max(axis=1), -1, 1)).max() < 0.9 * spacing
    assert np.linalg.norm(d.mean(axis=0)) < 1.0 / n


def test_fibonacci_rejects_bad_count():
    """n must be a positive integer."""
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            fibonacci_directions(bad)


# -- b-factor and q -----------------------------------------------------------------------------


@pytest.mark.parametrize("delta, Delta", [(5.0, 6.0), (10.0, 20.0), (10.0, 60.0), (3.0, 3.0)])
def test_pgse_b_factor_closed_form(delta, Delta):
    """Stejskal-Tanner: int F^2 = delta^2 (Delta - delta/3)."""
    s = Sequence.pgse(delta, Delta, [0.0, 1000.0], [[0, 0, 1]])
    assert s.b_factor_ms3 == pytest.approx(delta**2 * (Delta - delta / 3), rel=1e-14)
    assert s.echo_time_ms == pytest.approx(Delta + delta)
    assert (s.delta_ms, s.Delta_ms) == pytest.approx((delta, Delta))


def _quadrature_b_factor(segments):
    """Independent: F is piecewise linear through its breakpoint values; integrate F^2 with quad."""
    dur = np.array([d for d, _ in segments])
    amp = np.array([a for _, a in segments])
    t = np.concatenate([[0.0], np.cumsum(dur)])
    F = np.concatenate([[0.0], np.cumsum(dur * amp)])
    val, _ = quad(lambda s: np.interp(s, t, F) ** 2, 0.0, t[-1], points=t[1:-1], limit=200,
                  epsabs=0, epsrel=1e-12)
    return val


@pytest.mark.parametrize(
    "segments",
    [
        [(5.0, 1.0), (15.0, 0.0), (5.0, -1.0)],
        [(2.0, 1.0), (2.0, -1.0), (2.0, 1.0), (2.0, -1.0)],  # oscillating (OGSE-like)
        [(3.0, 0.5), (1.0, -1.0), (4.0, 0.25), (2.0, -0.75), (0.5, 0.0)],
        [(1.0, 1.0), (0.0, 0.3), (1.0, -1.0)],  # a zero-length segment
    ],
)
def test_b_factor_against_quadrature(segments):
    """Exact piecewise formula equals adaptive quadrature of F(t)^2."""
    s = Sequence.waveform(segments, [0.0, 100.0], [[1, 0, 0]])
    assert s.b_factor_ms3 == pytest.approx(_quadrature_b_factor(segments), rel=1e-10)


def test_b_factor_scales_with_time_cubed():
    """Stretching time by c multiplies int F^2 by c^3 (dimensional analysis)."""
    seg = [(2.0, 1.0), (1.0, -0.5), (3.0, -0.5)]
    s1 = Sequence.waveform(seg, [0.0], [[1, 0, 0]])
    s2 = Sequence.waveform([(2.5 * d, a) for d, a in seg], [0.0], [[1, 0, 0]])
    assert s2.b_factor_ms3 == pytest.approx(2.5**3 * s1.b_factor_ms3, rel=1e-13)


def test_q_round_trip_to_b():
    """q^2 b_factor, converted to s/mm^2 (1 ms/um^2 = 1000 s/mm^2), gives back b."""
    b = np.array([0.0, 1.0, 500.0, 1000.0, 5000.0])
    for s in (
        Sequence.pgse(10.0, 60.0, b, [[0, 1, 0]]),
        Sequence.waveform([(2.0, 1.0), (2.0, -1.0), (2.0, 1.0), (2.0, -1.0)], b, [[0, 1, 0]]),
    ):
        q = s.q_per_um_ms()
        np.testing.assert_allclose(q**2 * s.b_factor_ms3 * 1e3, b, rtol=1e-13, atol=0)


def test_q_matches_si_gradient_strength():
    """q = gamma G in SI (rad/(s m)) times 1e-9 is q in 1/(um ms); G from the SI
    Stejskal-Tanner formula b = gamma^2 G^2 delta^2 (Delta - delta/3)."""
    delta_s, Delta_s, b_si = 0.010, 0.060, 1000.0 * 1e6  # s, s, s/m^2
    G = math.sqrt(b_si / (GAMMA**2 * delta_s**2 * (Delta_s - delta_s / 3)))
    s = Sequence.pgse(10.0, 60.0, [1000.0], [[1, 0, 0]])
    assert s.q_per_um_ms()[0] == pytest.approx(GAMMA * G * 1e-9, rel=1e-12)


def test_measurement_order_b_outer_direction_inner():
    """Row ib * ndir + idir holds (b[ib], direction[idir])."""
    b = [0.0, 1000.0, 3000.0]
    d = fibonacci_directions(4)
    s = Sequence.pgse(10.0, 20.0, b, d)
    assert s.num_measurements == 12
    for ib in range(3):
        for idir in range(4):
            assert s.b_s_per_mm2[ib * 4 + idir] == b[ib]
            np.testing.assert_array_equal(s.directions[ib * 4 + idir], d[idir])


def test_amplitude_and_pgse_recognition():
    """f(t) of a PGSE: +1 during the first pulse, 0 between, -1 during the second, 0 after TE;
    a waveform written in PGSE form is recognised, others give delta = Delta = None."""
    s = Sequence.pgse(10.0, 60.0, [0.0], [[1, 0, 0]])
    t = np.array([-1.0, 0.0, 9.99, 10.0, 59.99, 60.0, 69.99, 70.0, 80.0])
    np.testing.assert_array_equal(s.amplitude(t), [0, 1, 1, 0, 0, -1, -1, 0, 0])
    np.testing.assert_array_equal(s.breakpoints_ms, [0.0, 10.0, 60.0, 70.0])
    w = Sequence.waveform([(10.0, 1.0), (50.0, 0.0), (10.0, -1.0)], [0.0], [[1, 0, 0]])
    assert w.is_pgse and (w.delta_ms, w.Delta_ms) == (10.0, 60.0)
    o = Sequence.waveform([(2.0, 1.0), (4.0, -1.0), (2.0, 1.0)], [0.0], [[1, 0, 0]])
    assert not o.is_pgse and o.delta_ms is None and o.Delta_ms is None
    assert o.echo_time_ms == 8.0


def test_arrays_are_read_only():
    """A frozen sequence cannot be changed through its arrays."""
    s = Sequence.pgse(5.0, 6.0, [0.0, 1000.0], [[1, 0, 0]])
    with pytest.raises(ValueError):
        s.b_s_per_mm2[0] = 7.0
    with pytest.raises(ValueError):
        s.directions[0, 0] = 0.0


# -- validation ---------------------------------------------------------------------------------


def _raises(field, fn, *args, **kw):
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    assert str(info.value).startswith("cfg.toml: "), str(info.value)
    assert field in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize(
    "args, field",
    [
        ((0.0, 10.0, [0.0], [[1, 0, 0]]), "seq.delta_ms"),
        ((-1.0, 10.0, [0.0], [[1, 0, 0]]), "seq.delta_ms"),
        ((12.0, 10.0, [0.0], [[1, 0, 0]]), "seq.delta_ms"),
        ((float("nan"), 10.0, [0.0], [[1, 0, 0]]), "seq.delta_ms"),
        ((5.0, float("inf"), [0.0], [[1, 0, 0]]), "seq.Delta_ms"),
        ((5.0, 10.0, [0.0, -5.0], [[1, 0, 0]]), "seq.b_s_per_mm2[1]"),
        ((5.0, 10.0, [0.0, float("nan")], [[1, 0, 0]]), "seq.b_s_per_mm2[1]"),
        ((5.0, 10.0, [0.0, 1000.0], [[1, 0, 0], [1, 1, 0]]), "seq.directions[1]"),
        ((5.0, 10.0, [1000.0], [[0, 0, 0]]), "seq.directions[0]"),
        ((5.0, 10.0, [1000.0], [[1, 0]]), "seq.directions"),
        ((5.0, 10.0, [], [[1, 0, 0]]), "seq.b_s_per_mm2"),
    ],
)
def test_pgse_validation(args, field):
    """Each invalid PGSE input raises InputError naming source and field."""
    _raises(field, Sequence.pgse, *args, source="cfg.toml", prefix="seq.")


def test_zero_direction_allowed_only_for_b0():
    """A zero direction is fine when every b is 0 (and in a per-row b = 0 measurement)."""
    Sequence.pgse(5.0, 10.0, [0.0], [[0, 0, 0]])
    s = Sequence("x", ((1.0, 1.0), (1.0, -1.0)), np.array([0.0, 10.0]),
                 np.array([[0, 0, 0], [0, 0, 1.0]]))
    assert s.num_measurements == 2


@pytest.mark.parametrize(
    "segments, field, text",
    [
        ([(5.0, 1.0), (5.0, -0.5)], "seq.segments", "not refocused"),
        ([(5.0, 1.5), (5.0, -1.5)], "seq.segments[0]", "[-1, 1]"),
        ([(-1.0, 1.0), (1.0, -1.0)], "seq.segments[0]", ">= 0"),
        ([(0.0, 1.0)], "seq.segments", "> 0 ms"),
        ([(1.0, float("nan")), (1.0, -1.0)], "seq.segments", "finite"),
        ([(1.0, 0.0), (1.0, 0.0)], "seq.segments", "zero"),
    ],
)
def test_waveform_validation(segments, field, text):
    """Invalid waveforms raise InputError naming the field and the reason."""
    err = _raises(field, Sequence.waveform, segments, [0.0, 100.0], [[1, 0, 0]], source="cfg.toml",
                  prefix="seq.")
    assert text in err.message


# -- Camino -------------------------------------------------------------------------------------


def test_camino_round_trip(tmp_path):
    """write then read gives the same sequences (names, timing, b, directions)."""
    seqs = [
        Sequence.pgse(10.0, 60.0, [0.0, 1000.0, 5000.0], fibonacci_directions(7)),
        Sequence.pgse(5.0, 6.0, [0.0, 2000.0], [[0, 0, 1], [0.6, 0.8, 0]]),
    ]
    path = tmp_path / "p.scheme"
    write_camino_scheme(path, seqs)
    back = read_camino_scheme(path)
    assert [s.name for s in back] == ["10/60", "5/6"]
    for a, b in zip(seqs, back):
        assert (b.delta_ms, b.Delta_ms) == pytest.approx((a.delta_ms, a.Delta_ms), rel=1e-14)
        np.testing.assert_allclose(b.b_s_per_mm2, a.b_s_per_mm2, rtol=1e-13, atol=1e-9)
        np.testing.assert_allclose(b.directions, a.directions, atol=1e-15)


def test_camino_si_units_grouping_and_order(tmp_path):
    """Hand-written scheme: b from gamma^2 G^2 delta^2 (Delta - delta/3) in SI, converted
    to s/mm^2 (x 1e-6); rows grouped by (delta, Delta) in first-appearance order, file order
    kept inside a group; |G| = 0 gives b = 0; 6-digit directions are renormalised."""
    text = """# a comment
VERSION: STEJSKALTANNER
0 0 0 0 0.03 0.01 0.05
1 0 0 0.05 0.03 0.01 0.05
0 0 0 0 0.06 0.02 0.09
0.577350 0.577350 0.577350 0.04 0.03 0.01 0.05
0 1 0 0.02 0.06 0.02 0.09
"""
    path = tmp_path / "hand.scheme"
    path.write_text(text)
    a, b = read_camino_scheme(path)
    assert (a.name, a.delta_ms, a.Delta_ms) == ("10/30", 10.0, 30.0)
    assert (b.name, b.delta_ms, b.Delta_ms) == ("20/60", 20.0, 60.0)
    # By hand: 2.6751525e8^2 = 7.156441e16; x 0.05^2 x 0.01^2 x (0.03 - 0.01/3) = 4.7710e8 s/m^2.
    assert a.b_s_per_mm2[1] == pytest.approx(477.10, rel=1e-4)
    expected_a = [0.0] + [GAMMA**2 * g**2 * 0.01**2 * (0.03 - 0.01 / 3) * 1e-6
                          for g in (0.05, 0.04)]
    np.testing.assert_allclose(a.b_s_per_mm2, expected_a, rtol=1e-13)
    np.testing.assert_allclose(b.b_s_per_mm2,
                               [0.0, GAMMA**2 * 0.02**2 * 0.02**2 * (0.06 - 0.02 / 3) * 1e-6],
                               rtol=1e-13)
    np.testing.assert_allclose(a.directions[2], np.ones(3) / math.sqrt(3), atol=1e-15)
    np.testing.assert_array_equal(a.directions[0], [0, 0, 0])


@pytest.mark.parametrize(
    "body, field",
    [
        ("VERSION: BVECTOR\n1 0 0 1\n", "line 1"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.05 0.03 0.01\n", "line 2"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.05 0.03 0.01 0.05\n1 1 0 0.05 0.03 0.01 0.05\n",
         "line 3"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.05 0.01 0.03 0.05\n", "line 2"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.05 0.03 0.01 0.02\n", "line 2"),
        ("VERSION: STEJSKALTANNER\n1 0 0 -0.05 0.03 0.01 0.05\n", "line 2"),
        ("VERSION: STEJSKALTANNER\n1 0 0 x 0.03 0.01 0.05\n", "line 2"),
        ("VERSION: STEJSKALTANNER\n", "no measurement rows"),
        ("", "missing header"),
    ],
)
def test_camino_errors(tmp_path, body, field):
    """Malformed schemes raise InputError naming the file and the line."""
    path = tmp_path / "bad.scheme"
    path.write_text(body)
    with pytest.raises(InputError) as info:
        read_camino_scheme(path)
    assert str(info.value).startswith(str(path)) and field in str(info.value)


@pytest.mark.parametrize("data, line", [
    (b"VERSION: STEJSKALTANNER\n\xff\xfe\x00\x01\n", "line 2"),
    ("# Schema f\u00fcr Camino\nVERSION: STEJSKALTANNER\n".encode("latin-1"), "line 1"),
    (b"VERSION: STEJSKALTANNER\n1 0 0 0.05 0.03 0.01 0.05\x00\n", "line 2"),
])
def test_camino_file_that_is_not_text(tmp_path, data, line):
    """A binary or Latin-1 scheme: InputError naming the file and line, not UnicodeDecodeError."""
    path = tmp_path / "bin.scheme"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        read_camino_scheme(path)
    assert str(info.value).startswith(f"{path}: {line}: ")
    assert "UTF-8" in str(info.value) or "NUL" in str(info.value)


def test_fsl_file_that_is_binary(tmp_path):
    bvals, bvecs = tmp_path / "b.bval", tmp_path / "b.bvec"
    bvals.write_bytes(b"\x00\xff\x10")
    bvecs.write_text("1 0 0\n")
    with pytest.raises(InputError, match="not UTF-8") as info:
        read_fsl(bvals, bvecs, 10.0, 20.0)
    assert info.value.source == str(bvals)


def test_camino_writer_refuses_non_pgse(tmp_path):
    """STEJSKALTANNER describes PGSE only."""
    w = Sequence.waveform([(2.0, 1.0), (4.0, -1.0), (2.0, 1.0)], [0.0], [[1, 0, 0]])
    with pytest.raises(ValueError):
        write_camino_scheme(tmp_path / "w.scheme", [w])


# -- FSL ----------------------------------------------------------------------------------------


def _fsl_files(tmp_path, b, dirs, transpose):
    bv, bd = tmp_path / "dwi.bval", tmp_path / "dwi.bvec"
    bv.write_text(" ".join(f"{x:g}" for x in b) + "\n")
    rows = np.asarray(dirs).T if transpose else np.asarray(dirs)
    bd.write_text("\n".join(" ".join(f"{x:.6f}" for x in r) for r in rows) + "\n")
    return bv, bd


@pytest.mark.parametrize("transpose", [True, False], ids=["3xN", "Nx3"])
def test_fsl_both_orientations(tmp_path, transpose):
    """bvecs as 3 x N (FSL) or N x 3 give the same measurements; 6-digit vectors renormalised."""
    b = [0, 1000, 1000, 2000, 2000]
    d = np.vstack([[0, 0, 0], fibonacci_directions(4)])
    bv, bd = _fsl_files(tmp_path, b, d, transpose)
    s = read_fsl(bv, bd, 10.0, 60.0)
    assert s.name == "10/60" and (s.delta_ms, s.Delta_ms) == (10.0, 60.0)
    np.testing.assert_array_equal(s.b_s_per_mm2, b)
    np.testing.assert_allclose(s.directions, d, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(s.directions[1:], axis=1), 1.0, atol=1e-15)


def test_fsl_three_measurements_use_fsl_orientation(tmp_path):
    """With N = 3 the 3 x 3 table is read as FSL's 3 rows x N (column i is direction i)."""
    d = np.array([[0, 0, 1.0], [0.6, 0.8, 0], [1.0, 0, 0]])
    bv, bd = _fsl_files(tmp_path, [1000, 1000, 1000], d, transpose=True)
    np.testing.assert_allclose(read_fsl(bv, bd, 5.0, 6.0).directions, d, atol=1e-12)


def test_fsl_count_mismatch_names_both_files(tmp_path):
    """5 b-values and 4 directions: the error names bvals and bvecs files."""
    bv, bd = _fsl_files(tmp_path, [0, 1000, 1000, 1000, 1000], fibonacci_directions(4), True)
    with pytest.raises(InputError) as info:
        read_fsl(bv, bd, 10.0, 60.0)
    assert str(bv) in str(info.value) and str(bd) in str(info.value)


@pytest.mark.parametrize(
    "b, dirs, which",
    [
        ([0, -1000], [[1, 0, 0], [0, 1, 0]], "bval"),
        ([0, 1000], [[1, 0, 0], [0, 0.5, 0]], "bvec"),
        ([0, 1000], [[1, 0, 0], [0, 0, 0]], "bvec"),
    ],
)
def test_fsl_value_errors(tmp_path, b, dirs, which):
    """Negative b or a non-unit direction raises InputError naming the offending file."""
    bv, bd = _fsl_files(tmp_path, b, dirs, True)
    with pytest.raises(InputError) as info:
        read_fsl(bv, bd, 10.0, 60.0)
    assert str(info.value).startswith(str(bv if which == "bval" else bd))
