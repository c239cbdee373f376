"""Make the kappa files of tests/test_taylor_examples.py: three points along a short inversion
of every example configuration (the default method, its first iterations).

    python tests/data/make_path_kappa.py [NAME ...]     (about 3 minutes on one core)

Each point is written as a kappa file (`spinverse_fem.io.kappa`): <config>_it<N>.h5 holds kappa
after N optimiser iterations. Rerun when the examples or the inversion change.
"""

from dataclasses import replace
from pathlib import Path

from spinverse_fem.config import load_config
from spinverse_fem.evaluation.scoring import score
from spinverse_fem.inverse.case import Case
from spinverse_fem.inverse.driver import Inversion
from spinverse_fem.io.kappa import write_kappa
from spinverse_fem.parallel import say, world

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "path_kappa"
EXAMPLES = ("paper_torus", "paper_torus_camino", "paper_torus_fsl", "plane_box")
#: after these many iterations (10 per stage: 3 stages for paper_torus, 2 for the staged
#: camino / fsl variants, 1 for the box)
POINTS = {"paper_torus": (5, 15, 25), "paper_torus_camino": (5, 12, 18),
          "paper_torus_fsl": (5, 12, 18), "plane_box": (3, 6, 9)}


def main(names=EXAMPLES) -> None:
    comm = world()
    for name in names:
        cfg = load_config(ROOT / "examples" / f"{name}.toml")
        cfg = replace(cfg, inversion=replace(cfg.inversion, iterations_per_stage=10,
                                             checkpoint_every=1))
        case = Case(comm, cfg)
        inv = Inversion(case, log=lambda s: None,
                        observer=lambda k: score(case.phantom, k, 1.0, case.truth))
        ph = case.phantom

        def checkpoint(st, name=name):
            if st.global_iteration in POINTS[name] and st.stage_iteration > 0:
                path = OUT / f"{name}_it{st.global_iteration}.h5"
                if comm.rank == 0:
                    write_kappa(path, inv.kappa(st.x), ph.faces.faces, ph.grid.points,
                                attrs={"iteration": st.global_iteration,
                                       "source": f"examples/{name}.toml, short inversion"})
                say(comm, f"wrote {path.name}")

        inv.run(inv.initial_state(), checkpoint=checkpoint)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or EXAMPLES)
