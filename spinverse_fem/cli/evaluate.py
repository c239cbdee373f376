"""`spinverse evaluate`: interface metrics of a result against the configuration's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

from spinverse_fem.parallel import world


def cmd_evaluate(args) -> int:
    """Metrics of a result/kappa file (or PLY) against a ground truth (config or paper .npz)."""
    from spinverse_fem.evaluation.compartments import compare_compartments
    from spinverse_fem.config import load_config
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.io.kappa import read_kappa
    from spinverse_fem.evaluation.metrics import evaluate
    from spinverse_fem.geometry.phantom import build_phantom

    comm = world()
    cfg = load_config(args.config)
    problem = build_phantom(cfg)
    kappa = read_kappa(args.result, problem.faces.faces, problem.grid.points)
    pred = extract_interface(kappa, args.threshold or cfg.inversion.threshold_um_per_ms,
                             problem.active)
    m = evaluate(problem.grid.points, problem.faces.faces, pred, problem.membrane)
    m.update(compare_compartments(problem.faces, pred, problem.membrane,
                                  outer_drains=problem.outer == "robin"))
    if comm.rank == 0:
        text = json.dumps(m, indent=2, sort_keys=True)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
    return 0


def register(sub):
    p = sub.add_parser("evaluate", help="CD-L2, BadEdge%% and face scores of a result")
    p.add_argument("config", help="configuration with the ground-truth geometry")
    p.add_argument("result", help="result.h5 or kappa file (kappa_um_per_ms, faces, vertices)")
    p.add_argument("--threshold", type=float, help="kappa threshold in um/ms (default: config)")
    p.add_argument("--out", help="write the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)
