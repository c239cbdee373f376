"""Completeness of the eigenbasis: Sylvester inertia counts and large degenerate clusters."""

import warnings

import numpy as np
import pytest
import scipy.linalg
from mpi4py import MPI

from spinverse_fem.fem.face_space import create_face_space
from spinverse_fem.fem.operators import BlochTorreyOperators
from spinverse_fem.forward.eigenbasis import inertia_count, solve_eigenbasis
from spinverse_fem.meshes.box import box_grid


def box_operators(comm, cells=(4, 2, 2)):
    g = box_grid((0.0, 0.0, 0.0), (8.0, 4.0, 4.0), cells)
    space = create_face_space(comm, g.points, g.tets)
    return BlochTorreyOperators(space, 2.0, outer="neumann"), g


def test_inertia_count_matches_dense_spectrum(comm):
    """Reference: scipy eigvalsh of the dense pencil; the number of negative pivots of
    L - tau M equals the number of eigenvalues below tau, for several tau."""
    ops, g = box_operators(comm, (2, 1, 1))
    rng = np.random.default_rng(0)
    ops.set_kappa(rng.uniform(0.05, 5.0, ops.space.num_faces))
    counts = [inertia_count(ops.L, ops.M, tau) for tau in (0.05, 0.5, 2.0, 8.0)]
    if comm.size == 1:
        n = ops.L.getSize()[0]
        L = ops.L.getValues(range(n), range(n))
        M = ops.M.getValues(range(n), range(n))
        lam = scipy.linalg.eigvalsh(0.5 * (L + L.T), 0.5 * (M + M.T))
        assert counts == [int(np.sum(lam < t)) for t in (0.05, 0.5, 2.0, 8.0)]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_sealed_cells_give_complete_zero_cluster(comm, monkeypatch):
    """Reference: with kappa = 0 on every face each of the T tetrahedra is a sealed compartment,
    so exactly T eigenvalues are 0 (constants per cell). Krylov-Schur tends to drop members of
    such a cluster; the inertia check must make the returned basis complete (repair) or fail."""
    import spinverse_fem.forward.eigenbasis as eb

    solves = []
    original = eb._solve_eps

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        solves.append(int(np.sum(np.abs(out[0]) < 1e-8)))
        return out

    monkeypatch.setattr(eb, "_solve_eps", counting)
    ops, g = box_operators(comm)
    T = g.num_tets
    ops.set_kappa(np.zeros(ops.space.num_faces))
    basis = solve_eigenbasis(ops.L, ops.M, num_modes=T + 4, lam_max=1.0)
    # measured: the first Krylov-Schur solve returns 92 of the 96 zeros; deflation repairs it
    if solves[0] < T:
        assert len(solves) >= 2
    zeros = int(np.sum(np.abs(basis.lam) < 1e-8))
    assert zeros == T
    assert basis.num_modes == T + 4
    assert np.all(basis.lam[T:] > 1e-3)


# -- the eigen-solver methods: block Krylov-Schur and spectrum slicing against Krylov-Schur ---

NEW_METHODS = ("block", "slicing", "block_slicing")


def torus_operators(comm):
    """The paper's torus on the 4 x 4 x 4 bcc grid at its ground-truth kappa (2 304 dofs; the
    cubic symmetry makes many eigenvalues double or triple)."""
    from pathlib import Path

    from spinverse_fem.config import load_config
    from spinverse_fem.forward.model import ForwardModel
    from spinverse_fem.geometry.phantom import build_phantom

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "paper_torus.toml")
    phantom = build_phantom(cfg)
    model = ForwardModel(comm, phantom, cfg.physics, cfg.eigen)
    model.ops.set_kappa(phantom.kappa)
    return model


def m_sin_angle(phi_ref, phi, M, comm):
    """sin of the largest M-principal angle between span(phi_ref) and span(phi) (both
    M-orthonormal, same width): the M-norm of the part of phi outside span(phi_ref)."""
    from spinverse_fem.forward.eigenbasis import gram

    C = gram(phi_ref, M, phi, comm)
    R = phi - phi_ref @ C
    G = gram(R, M, R, comm)
    return float(np.sqrt(max(np.linalg.eigvalsh(0.5 * (G + G.T)).max(), 0.0)))


def assert_same_basis(ref, basis, L, M, comm):
    from spinverse_fem.forward.eigenbasis import gram

    assert basis.num_modes == ref.num_modes
    assert basis.cutoff_count == ref.cutoff_count
    # relative, with a floor for the zero eigenvalue of the closed (Neumann) box
    rel = np.abs(basis.lam - ref.lam) / np.maximum(np.abs(ref.lam), 1e-3 * ref.lam[-1])
    assert rel.max() < 1e-9, rel.max()
    G = gram(basis.phi, M, basis.phi, comm)
    assert np.abs(G - np.eye(basis.num_modes)).max() < 1e-10
    assert m_sin_angle(ref.phi, basis.phi, M, comm) < 1e-7
    # the completeness guarantee, checked independently of the solver's own check
    tau = 0.5 * (basis.lam[-1] + basis.extra_lam[0])
    assert inertia_count(L, M, tau) == basis.num_modes


@pytest.mark.parametrize("method", NEW_METHODS)
def test_methods_agree_with_krylovschur(comm, method):
    """Reference: the default method (SLEPc Krylov-Schur, one vector at a time). On the box grid
    with random kappa (a generic spectrum) and on the torus grid at its ground truth (double
    and triple eigenvalues), with the cutoff rule (uncapped and capped) and a fixed count:
    the same count, eigenvalues to 1e-9 relative, the same invariant subspace (largest
    M-principal angle below 1e-7), M-orthonormal to 1e-10, and an independent inertia count
    between the last kept and the first extra eigenvalue equal to the count."""
    ops, _ = box_operators(comm, (4, 2, 2))
    rng = np.random.default_rng(3)
    ops.set_kappa(rng.uniform(0.05, 5.0, ops.space.num_faces))
    model = torus_operators(comm)
    cases = [(ops.L, ops.M, dict(lam_max=6.0, max_modes=500)),
             (ops.L, ops.M, dict(lam_max=6.0, max_modes=30)),
             (model.ops.L, model.ops.M, dict(lam_max=model.lam_max, max_modes=500)),
             (model.ops.L, model.ops.M, dict(lam_max=model.lam_max, max_modes=60))]
    for L, M, kw in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # the capped cases say so
            ref = solve_eigenbasis(L, M, method="krylovschur", **kw)
            basis = solve_eigenbasis(L, M, method=method, **kw)
        assert basis.info["method"] == method
        assert_same_basis(ref, basis, L, M, comm)
        # a fixed count, at the selected (gapped) cut
        fixed_ref = solve_eigenbasis(L, M, method="krylovschur", num_modes=ref.num_modes,
                                     lam_max=kw["lam_max"])
        fixed = solve_eigenbasis(L, M, method=method, num_modes=ref.num_modes,
                                 lam_max=kw["lam_max"])
        assert_same_basis(fixed_ref, fixed, L, M, comm)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_complete_the_zero_cluster(comm, method):
    """Reference: kappa = 0 makes each of the T tetrahedra a sealed compartment, T eigenvalues
    exactly 0. The block method finds at most a block width of them per Krylov space and must
    repair by deflation (with a block as wide as the deficit). SLEPc's slicing hangs or stops
    on such a cluster (measured: no result after 600 s with 40 eigenvalues per shift; an
    inertia error at a shift on the cluster with two partitions), so a near-zero cluster of
    more than half the wanted count sends the slicing method to the block method."""
    ops, g = box_operators(comm)
    T = g.num_tets
    ops.set_kappa(np.zeros(ops.space.num_faces))
    basis = solve_eigenbasis(ops.L, ops.M, num_modes=T + 4, lam_max=1.0, method=method)
    if method == "slicing":
        assert "fallback" in basis.info
    assert int(np.sum(np.abs(basis.lam) < 1e-8)) == T
    assert basis.num_modes == T + 4
    assert np.all(basis.lam[T:] > 1e-3)


def torus_with_block_option(comm, method: str, key: str, value):
    """(Krylov-Schur reference, `method`'s basis with -spinverse_bks_<key> value, L, M) on the
    torus grid at its ground truth, the rule capped at 200 modes."""
    from petsc4py import PETSc

    model = torus_operators(comm)
    L, M = model.ops.L, model.ops.M
    opts = PETSc.Options("spinverse_bks_")
    opts[key] = value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ref = solve_eigenbasis(L, M, method="krylovschur", lam_max=model.lam_max,
                                   max_modes=200)
            basis = solve_eigenbasis(L, M, method=method, lam_max=model.lam_max,
                                     max_modes=200)
    finally:
        opts.delValue(key)
    return ref, basis, L, M


def test_block_slicing_with_many_slices_agrees_with_krylovschur(comm):
    """Reference: Krylov-Schur, as above, on the torus grid at its ground truth (double and
    triple eigenvalues, so slice boundaries fall between close pairs) with 5 slices forced
    (-spinverse_bks_slices; the spectrum's gap above the membrane-bound modes makes the
    boundaries move by inertia counts): every slice yields exactly its inertia count, and the
    union is the same basis."""
    ref, basis, L, M = torus_with_block_option(comm, "block_slicing", "slices", 5)
    info = basis.info["block_slicing"]
    assert basis.info["method"] == "block_slicing" and info["slices"] >= 4
    counts = [x["count"] for x in info["per_slice"]]
    assert all(x["found"] == x["count"] > 0 for x in info["per_slice"])
    assert max(counts) <= 1.5 * sum(counts) / 5 + 1, counts
    assert_same_basis(ref, basis, L, M, comm)


def test_block_sketch_skips_full_passes_and_agrees_with_krylovschur(comm):
    """Reference: Krylov-Schur, as above, on the torus grid at its ground truth. With
    -spinverse_bks_sketch 32 the block method skips the full Gram-Schmidt pass of the blocks
    whose coefficients a 32-column random sketch of the basis shows below 1e-12 (some must be
    skipped here) and still returns the same basis to the tolerances above."""
    ref, basis, L, M = torus_with_block_option(comm, "block", "sketch", 32)
    phases = basis.info["phases"]
    print(f"full passes {phases['orth_passes']:.0f}, skipped {phases['orth_skipped']:.0f}")
    assert phases["orth_skipped"] >= 1
    assert_same_basis(ref, basis, L, M, comm)


@pytest.mark.parametrize("lock", (1, 0))
def test_block_restarts_with_and_without_locking_agree_with_krylovschur(comm, lock):
    """Reference: Krylov-Schur, as above, on the torus grid at its ground truth (double and
    triple eigenvalues; 87 pairs with the margin). A basis of at most 150 columns forces
    several thick restarts; with locking (the default) the pairs converged at a restart are
    frozen and leave the Rayleigh-Ritz problem, without it every kept Ritz vector is
    recombined. Both return the same basis to the tolerances above."""
    from petsc4py import PETSc

    opts = PETSc.Options("spinverse_bks_")
    opts["lock"] = lock
    try:
        ref, basis, L, M = torus_with_block_option(comm, "block", "ncv", 150)
    finally:
        opts.delValue("lock")
    info = basis.info
    print(f"restarts {info['restarts']}, locked {info['locked']}, solves {info['solves']}")
    assert info["restarts"] >= 2
    assert (info["locked"] > 0) if lock else (info["locked"] == 0)
    assert_same_basis(ref, basis, L, M, comm)


def test_method_from_petsc_option(comm):
    """-spinverse_eigen_method selects the method when the argument is not given; an unknown
    name is refused with the known ones."""
    from petsc4py import PETSc

    ops, _ = box_operators(comm, (2, 1, 1))
    ops.set_kappa(np.full(ops.space.num_faces, 1.0))
    opts = PETSc.Options("spinverse_")
    try:
        opts["eigen_method"] = "block"
        assert solve_eigenbasis(ops.L, ops.M, num_modes=10).info["method"] == "block"
        opts["eigen_method"] = "nosuch"
        with pytest.raises(ValueError, match="krylovschur, block, slicing, block_slicing"):
            solve_eigenbasis(ops.L, ops.M, num_modes=10)
    finally:
        opts.delValue("eigen_method")
    assert solve_eigenbasis(ops.L, ops.M, num_modes=10).info["method"] == "krylovschur"


def test_block_solves_redundant_and_distributed_agree(comm):
    """Reference: MUMPS' distributed MatMatSolve. The block method's default on several ranks
    (each rank factorises the whole matrix and solves a share of the columns) must give the
    same (L - sigma M)^{-1} B to round-off, for a block with fewer columns than ranks too."""
    from spinverse_fem.forward.block_krylov import ShiftInvert

    ops, _ = box_operators(comm, (4, 2, 2))
    ops.set_kappa(np.random.default_rng(5).uniform(0.05, 5.0, ops.space.num_faces))
    n_loc = ops.L.getLocalSize()[0]
    for k in (1, 7):
        B = np.random.default_rng(11 + comm.rank).standard_normal((n_loc, k))
        X = {}
        for redundant in (False, True):
            op = ShiftInvert(ops.L, ops.M, -0.01, definite=True, redundant=redundant)
            X[redundant] = op.solve(B)
            op.destroy()
        scale = comm.allreduce(float(np.abs(X[False]).max()), op=MPI.MAX)
        err = comm.allreduce(float(np.abs(X[True] - X[False]).max()), op=MPI.MAX)
        assert err < 1e-12 * scale


def test_block_product_matches_petsc(comm):
    """Reference: PETSc's MatMatMult (`apply_block`). The block method's mass product is a
    SciPy CSR product of each rank's rows when the matrix couples no rows across ranks (the DG
    mass matrix, cell-local on any number of ranks) and falls back to PETSc otherwise (the
    stiffness on several ranks, whose faces join cells of different ranks)."""
    from spinverse_fem.forward.block_krylov import BlockProduct, apply_block

    ops, _ = box_operators(comm, (4, 2, 2))
    ops.set_kappa(np.random.default_rng(5).uniform(0.05, 5.0, ops.space.num_faces))
    X = np.random.default_rng(13 + comm.rank).standard_normal((ops.M.getLocalSize()[0], 9))
    prod_m, prod_l = BlockProduct(ops.M), BlockProduct(ops.L)
    assert prod_m.csr is not None
    assert (prod_l.csr is not None) == (comm.size == 1)
    for A, prod in ((ops.M, prod_m), (ops.L, prod_l)):
        ref = apply_block(A, X)
        scale = comm.allreduce(float(np.abs(ref).max()), op=MPI.MAX)
        err = comm.allreduce(float(np.abs(prod(X) - ref).max()), op=MPI.MAX)
        assert err < 1e-14 * scale


@pytest.mark.parametrize("method", ("krylovschur", "block"))
def test_initial_space_gives_the_same_basis(comm, method):
    """A start space (the basis at a kappa 5 % away, as in an inversion step) changes the
    work, not the result: same count, eigenvalues and subspace as a start from scratch."""
    ops, _ = box_operators(comm, (4, 2, 2))
    rng = np.random.default_rng(3)
    kappa = rng.uniform(0.05, 5.0, ops.space.num_faces)
    ops.set_kappa(kappa)
    old = solve_eigenbasis(ops.L, ops.M, lam_max=6.0, method=method)
    ops.set_kappa(kappa * np.exp(0.05 * rng.standard_normal(kappa.size)))
    cold = solve_eigenbasis(ops.L, ops.M, lam_max=6.0, method=method)
    warm = solve_eigenbasis(ops.L, ops.M, lam_max=6.0, method=method,
                            initial_space=np.hstack([old.phi, old.extra_phi]))
    assert_same_basis(cold, warm, ops.L, ops.M, comm)
