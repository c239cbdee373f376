r"""The misfit, its adjoint gradient dJ/dkappa, and Taylor tests of both functionals.

What is computed
================

Targets T_c are simulated from the ground truth (a sphere of radius 10 um, kappa = 0.01 um/ms on
its faces, 100 um/ms elsewhere; the paper's bcc grid with 3 x 3 x 3 cubes). At another field
kappa (um/ms, one value per face) the signal misfit is

    J(kappa) = w / N  sum_c | S_c(kappa) / S0 - T_c |^2            (dimensionless, w = 100)

and its gradient dJ/dkappa_f (ms/um, one value per face) comes from the adjoint equations of
docs/adjoint.md: one eigen-solve, one block-CG solve per mode, one face assembly -- about the
cost of two misfit evaluations, whatever the number of faces F.

The inverse problem's model adds geometric priors on x = log10(kappa / (1 um/ms)):

    Phi(x) = J(kappa(x)) + w_c C(x; w_ij) + w_m Mfd(x),     dPhi/dx = ln 10 kappa dJ/dkappa + ...

A gradient g of a functional F is checked by the Taylor remainders along a random direction d,

    r1(h) = | F(m_h) - F(m) - h <g, d> | = O(h^2),      m_h = m e^{h d} (kappa)  or  m + h d (x),

so halving h must divide r1 by 4: observed rates log2(r1(h) / r1(h/2)) -> 2 (a wrong gradient
gives 1). The reduced model keeps a fixed number K of eigenmodes, chosen at a spectral gap; the
functional is smooth only while that cut stays open, which we check along the path.

Run:  python examples/gradient_check.py          (or: mpiexec -n 2 python ...)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from spinverse_fem.config import load_config
from spinverse_fem.forward.mode_selection import RESELECT_GAP
from spinverse_fem.inverse.case import Case
from spinverse_fem.inverse.model import PriorWeights
from spinverse_fem.inverse.taylor import taylor_test
from spinverse_fem.parallel import say, world

#: the small sphere of small_inversion.py; the misfit uses its 10/20 ms sequence only
CONFIG = Path(__file__).resolve().parent / "small_sphere.toml"



def rates_line(rates) -> str:
    return " ".join(f"{r:5.3f}" for r in rates)


def main(comm, config: Path = CONFIG, seed: int = 4, h0: float = 2e-3,
         halvings: int = 4) -> dict:
    """Misfit, gradient and two Taylor tests at a random kappa (log-uniform in [0.1, 10] um/ms
    on the active faces; the same on every rank: seeded). Returns J, |dJ/dkappa|, the mode
    count and relative gap, the rates of both tests (rates1_misfit, rates1_model), seconds."""
    t0 = time.perf_counter()
    cfg = load_config(config)
    case = Case(comm, cfg)
    phantom = case.phantom
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, case.params.size)        # log10 kappa on the active faces
    kappa = case.params.to_kappa(x)
    say(comm, f"grid: {phantom.grid.num_tets} tetrahedra, {phantom.faces.num_faces} faces, "
              f"{case.params.size} active; targets: {case.targets.source}")

    # the mode count by the [eigen] rule at this kappa, then fixed: J is smooth at fixed K
    K = case.num_modes_at(kappa)
    misfit = case.misfit([cfg.sequence_index("10/20")], num_modes=K)
    J, dJ = misfit.cost_and_gradient(kappa)
    cut = misfit.last_cut
    say(comm, f"J = {J:.8e} with K = {K} modes (relative gap at the cut {cut.rel_gap:.2e}); "
              f"|dJ/dkappa| = {np.linalg.norm(dJ):.4e} ms/um, largest on face "
              f"{int(np.argmax(np.abs(dJ)))}: {dJ[np.argmax(np.abs(dJ))]:+.4e} ms/um")
    if not cut.rel_gap >= RESELECT_GAP:
        raise RuntimeError(f"the spectral cut at K = {K} is (nearly) closed: not differentiable")

    # (1) the misfit alone, in kappa: steps kappa e^{h d}
    d = rng.standard_normal(kappa.size)
    res_m = taylor_test(misfit, kappa, direction=d, h0=h0, halvings=halvings,
                        multiplicative=True)
    say(comm, f"Taylor test of J(kappa), multiplicative steps, h0 = {h0:g}:")
    say(comm, f"  r1 = {' '.join(f'{r:.3e}' for r in res_m.r1)}")
    say(comm, f"  rates {rates_line(res_m.rates1)} (first order without the gradient: "
              f"{rates_line(res_m.rates0)})")

    # (2) the full model (misfit + continuity + manifold priors), additive steps in x
    model = case.model(misfit, PriorWeights(continuity=2.0, manifold=1.5), reference_x=x)
    Phi, dPhi = model.cost_and_gradient(x)
    terms = model.last_terms
    say(comm, f"Phi = {Phi:.8e} = misfit {terms['misfit']:.4e} + 2.0 x continuity "
              f"{terms['continuity']:.4e} + 1.5 x manifold {terms['manifold']:.4e}")
    res_x = taylor_test(model, x, direction=rng.standard_normal(x.size), h0=h0,
                        halvings=halvings)
    say(comm, f"Taylor test of Phi(x), additive steps, h0 = {h0:g}:")
    say(comm, f"  r1 = {' '.join(f'{r:.3e}' for r in res_x.r1)}")
    say(comm, f"  rates {rates_line(res_x.rates1)}")

    seconds = time.perf_counter() - t0
    say(comm, f"done in {seconds:.2f} s")
    case.destroy()
    return {
        "J": float(J), "dJ_dkappa": dJ, "kappa": kappa, "x": x, "num_modes": int(K),
        "rel_gap": float(cut.rel_gap), "Phi": float(Phi), "dPhi_dx": dPhi,
        "terms": dict(terms), "rates1_misfit": res_m.rates1, "rates0_misfit": res_m.rates0,
        "rates1_model": res_x.rates1, "r1_misfit": res_m.r1, "r1_model": res_x.r1,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main(world())
