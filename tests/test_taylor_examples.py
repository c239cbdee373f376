"""The documented gradient check passes on every shipped example, at its start and along its
inversion path (issue: `spinverse taylor examples/paper_torus.toml` used to fail at the start
because the mode cap cut a near-degenerate pair).

Reference: second-order Taylor remainders of the reduced misfit in a seeded log-kappa direction,
judged on their asymptotic part (`spinverse taylor`, exit 0 iff the rates are >= 1.9). The path
points are kappa files written by tests/data/make_path_kappa.py from short runs of the default
method.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "path_kappa"
EXAMPLES = ("paper_torus", "paper_torus_camino", "paper_torus_fsl", "plane_box")


def _points(name):
    return [None] + sorted(DATA.glob(f"{name}_it*.h5"), key=lambda p: int(p.stem.split("it")[-1]))


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Simulated targets of each example (the forward model on its ground truth)."""
    from mpi4py import MPI

    from spinverse_fem import cli

    comm = MPI.COMM_WORLD
    d = Path(comm.bcast(str(tmp_path_factory.mktemp("targets")) if comm.rank == 0 else None,
                        root=0))
    out = {}
    for name in EXAMPLES:
        out[name] = d / f"{name}.h5"
        assert cli.main(["simulate", str(ROOT / "examples" / f"{name}.toml"), "--out",
                         str(out[name])]) == 0
        comm.Barrier()
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_taylor_passes_at_start_and_along_the_path(name, targets, capsys):
    from mpi4py import MPI

    from spinverse_fem import cli

    if MPI.COMM_WORLD.size > 1 and name != "paper_torus":
        # camino / fsl: the same grid, model and path code as paper_torus (only the protocol
        # is read from a file); plane_box: ~60 s per point on 2 ranks. Checked serially;
        # paper_torus covers the Taylor check on 2 ranks
        pytest.skip("checked serially; paper_torus covers the check on 2 ranks")

    points = _points(name)
    assert len(points) == 4, f"missing path kappa files for {name}: run make_path_kappa.py"
    if name == "plane_box":
        # ~35 s per point (a 234-mode cut among 2 172 eigenvalues below the cutoff): the start
        # (where the cut used to split a pair) and the end of the path; the torus examples
        # check their middle points
        points = [points[0], points[-1]]
    for kappa in points:
        args = ["taylor", str(ROOT / "examples" / f"{name}.toml"), "--target",
                str(targets[name]), "--halvings", "2"]
        if kappa is not None:
            args += ["--kappa", str(kappa)]
        code = cli.main(args)
        text = capsys.readouterr().out
        assert code == 0, f"{name} at {kappa.name if kappa else 'start'}:\n{text[-1500:]}"
