"""Tests of the geometric priors (spinverse_fem.inverse.priors) on the paper's n = 4 grid."""

from __future__ import annotations

import glob
import itertools
import math

import numpy as np
import pytest

from spinverse_fem.geometry.topology import build_face_table
from spinverse_fem.inverse.priors import GeometricPriors, manifold_penalty
from spinverse_fem.meshes.paper import paper_meshes_dir

MESH_DIR = str(paper_meshes_dir())
T = 0.1


def _grid():
    files = sorted(glob.glob(f"{MESH_DIR}/*.npz"))
    assert len(files) == 20, f"expected the 20 paper ground truths in {MESH_DIR}"
    d = np.load(files[0])
    return files, d["facets"].T.astype(np.int64), d["elements"].T.astype(np.int64)


FILES, FACES, TETS = _grid()
NF = FACES.shape[0]


def _membrane_mask(path: str) -> np.ndarray:
    table = build_face_table(TETS, 189)
    ids = table.lookup(np.load(path)["boundary_faces"].T)
    assert np.all(ids >= 0)
    # the priors use FACES (the files' column order); map canonical ids back to it
    canon_of_col = table.lookup(FACES)
    mask = np.zeros(NF, dtype=bool)
    mask[np.isin(canon_of_col, ids)] = True
    return mask


# --- naive references: plain python loops straight from the paper's definitions ---------------

def _naive_edges(faces, active):
    """dict sorted vertex pair -> list of active face ids using it."""
    edges: dict[tuple[int, int], list[int]] = {}
    for f in range(len(faces)):
        if not active[f]:
            continue
        a, b, c = (int(v) for v in faces[f])
        for e in ((a, b), (b, c), (a, c)):
            edges.setdefault(tuple(sorted(e)), []).append(f)
    return edges


def _naive_p(xf):
    # paper: sigmoid((-3 - log10 kappa[um/us]) / 0.5), kappa[um/us] = 10**xf / 1000
    log10_k_um_per_us = xf - 3.0
    return 1.0 / (1.0 + math.exp(-(-3.0 - log10_k_um_per_us) / 0.5))


def _naive_pen(k):
    return (-T * math.log(math.exp(-k * k / T) + math.exp(-(k - 2) ** 2 / T))
            + T * math.log(1 + math.exp(-4 / T)))


def _naive_continuity(faces, active, x):
    edges = _naive_edges(faces, active)
    terms, grad = [], np.zeros(len(faces))
    pairs = set()
    for fl in edges.values():
        for i, j in itertools.combinations(sorted(fl), 2):
            pairs.add((i, j))
    for i, j in sorted(pairs):
        w = min(max(1 - abs(_naive_p(x[i]) - _naive_p(x[j])), 0), 1)
        terms.append(w * (x[i] - x[j]) ** 2 / 2)
        grad[i] += w * (x[i] - x[j])
        grad[j] -= w * (x[i] - x[j])
    return sum(terms) / len(terms), grad / len(terms), len(pairs)


def _naive_manifold(faces, active, x):
    edges = _naive_edges(faces, active)
    total, grad = 0.0, np.zeros(len(faces))
    h = 1e-6
    for fl in edges.values():
        k = sum(_naive_p(x[f]) for f in fl)
        total += _naive_pen(k) / len(fl)
        dpen = (_naive_pen(k + h) - _naive_pen(k - h)) / (2 * h)  # central difference in k
        for f in fl:
            p = _naive_p(x[f])
            grad[f] += dpen / len(fl) * (-p * (1 - p) / 0.5)
    return total / len(edges), grad / len(edges)


# --- tests ------------------------------------------------------------------------------------

def test_paper_grid_has_7272_pairs():
    """The paper reports 7272 face pairs sharing an edge on the n = 4 grid (paper_setup.md)."""
    assert GeometricPriors(FACES).num_pairs == 7272


def test_barrier_probability_matches_paper_units():
    """p = 1/2 at 1 um/ms and the paper's formula in um/us, evaluated independently."""
    pri = GeometricPriors(FACES)
    x = np.linspace(-2, 2, NF)
    p = pri.barrier_probability(x)
    ref = np.array([_naive_p(v) for v in x])
    np.testing.assert_allclose(p, ref, rtol=1e-13, atol=1e-15)
    assert pri.barrier_probability(np.zeros(NF))[0] == pytest.approx(0.5)


def test_pen_minima_and_barrier():
    """pen(0) = pen(2) = 0 are its minima and pen(1) = 1 - t log 2 (closed form from the
    definition)."""
    k = np.array([0.0, 2.0, 1.0])
    pen, dpen = manifold_penalty(k, T)
    assert abs(pen[0]) < 1e-14 and abs(pen[1]) < 1e-14
    # pen(1) = -t log(2 e^{-1/t}) + t log(1 + e^{-4/t})
    assert pen[2] == pytest.approx(1 - T * math.log(2) + T * math.log1p(math.exp(-4 / T)),
                                   rel=1e-12)
    assert abs(dpen[0]) < 1e-12 and abs(dpen[1]) < 1e-12 and abs(dpen[2]) < 1e-12
    grid = np.linspace(-1, 4, 2001)
    assert np.all(manifold_penalty(grid, T)[0] >= -1e-14)
    # stable where a naive exp would underflow to log(0)
    big, dbig = manifold_penalty(np.array([50.0]), 0.01)
    assert np.isfinite(big[0]) and np.isfinite(dbig[0])
    assert big[0] == pytest.approx(48.0**2, rel=1e-12)


@pytest.mark.parametrize("which", ["all", "subset"])
def test_against_naive_loops(which):
    """Values and gradients equal a plain-loop implementation of the paper's formulas."""
    rng = np.random.default_rng(1)
    active = np.ones(NF, bool) if which == "all" else rng.random(NF) < 0.7
    x = rng.uniform(-2, 2, NF)
    pri = GeometricPriors(FACES, active)

    val, grad = pri.continuity(x, pri.continuity_weights(x))
    nval, ngrad, npairs = _naive_continuity(FACES, active, x)
    assert pri.num_pairs == npairs
    assert val == pytest.approx(nval, rel=1e-12)
    np.testing.assert_allclose(grad, ngrad, rtol=1e-10, atol=1e-15)

    val, grad = pri.manifold(x)
    nval, ngrad = _naive_manifold(FACES, active, x)
    assert val == pytest.approx(nval, rel=1e-12)
    np.testing.assert_allclose(grad, ngrad, rtol=1e-6, atol=1e-10)
    if which == "subset":
        assert np.all(grad[~active] == 0)
        assert np.all(pri.continuity(x, pri.continuity_weights(x))[1][~active] == 0)


def _taylor_rates(fun, x, d):
    f0, g0 = fun(x)
    # the double well (t = 0.1) bends sharply, so the asymptotic regime needs small steps
    hs = 5e-4 * 0.5 ** np.arange(6)
    r = np.array([abs(fun(x + h * d)[0] - f0 - h * g0 @ d) for h in hs])
    return np.log2(r[:-1] / r[1:]), r


@pytest.mark.parametrize("term", ["continuity", "manifold"])
def test_taylor(term):
    """Taylor test: the first-order remainder with the hand-written gradient decays as h^2."""
    rng = np.random.default_rng(7)
    active = rng.random(NF) < 0.8
    pri = GeometricPriors(FACES, active)
    x = rng.uniform(-2, 2, NF)
    d = rng.standard_normal(NF)
    if term == "continuity":
        w = pri.continuity_weights(x)  # fixed, as in the paper
        rates, r = _taylor_rates(lambda y: pri.continuity(y, w), x, d)
    else:
        rates, r = _taylor_rates(pri.manifold, x, d)
    assert r[0] > 1e-10, "remainder too small to measure a rate"
    assert np.min(rates) >= 1.9, rates


def test_closed_membrane_vs_hole():
    """Ground-truth kappa (0.01 / 100 um/ms) on a closed membrane: near-zero manifold penalty,
    far below the uninformative start (x = 0); punching one hole raises it. In the sharp limit the
    hole costs exactly pen(1) / n_e per edge of the removed face (n_e counted independently)."""
    pri = GeometricPriors(FACES)
    start, _ = pri.manifold(np.zeros(NF))
    edges = _naive_edges(FACES, np.ones(NF, bool))
    pen1 = _naive_pen(1.0)
    for path in (FILES[0], FILES[18], FILES[19]):
        mem = _membrane_mask(path)
        closed, _ = pri.manifold(np.where(mem, -2.0, 2.0))
        hole_mask = mem.copy()
        removed = np.flatnonzero(mem)[0]
        hole_mask[removed] = False
        hole, _ = pri.manifold(np.where(hole_mask, -2.0, 2.0))
        assert closed < 0.01 * start
        assert hole > closed + 0.5 * pen1 / 6 / len(edges)

        sharp_closed, _ = pri.manifold(np.where(mem, -12.0, 12.0))
        sharp_hole, _ = pri.manifold(np.where(hole_mask, -12.0, 12.0))
        a, b, c = (int(v) for v in FACES[removed])
        expect = sum(pen1 / len(edges[tuple(sorted(e))]) for e in ((a, b), (b, c), (a, c)))
        assert sharp_closed < 1e-8
        assert sharp_hole == pytest.approx(expect / len(edges), rel=1e-6)


def test_bad_inputs():
    """Shape and parameter errors are explicit."""
    with pytest.raises(ValueError, match="faces"):
        GeometricPriors(np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="active"):
        GeometricPriors(FACES, np.ones(3, bool))
    with pytest.raises(ValueError, match="temperature"):
        GeometricPriors(FACES, temperature=0.0)
    pri = GeometricPriors(FACES)
    with pytest.raises(ValueError, match="shape"):
        pri.manifold(np.zeros(5))
    with pytest.raises(ValueError, match="w must"):
        pri.continuity(np.zeros(NF), np.ones(3))
    empty = GeometricPriors(FACES, np.zeros(NF, bool))
    assert empty.manifold(np.zeros(NF))[0] == 0.0
    assert empty.continuity(np.zeros(NF), np.zeros(0))[0] == 0.0
