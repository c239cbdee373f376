"""`spinverse evaluate`: interface metrics of a result against the configuration's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

from spinverse_fem.parallel import world


def cmd_evaluate(args) -> int:
    """Metrics of a result/kappa file (or PLY) against a ground truth (config or paper .npz)."""
    from spinverse_fem.config import load_config
    from spinverse_fem.evaluation.scoring import score
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.io.kappa import read_kappa

    comm = world()
    cfg = load_config(args.config)
    phantom = build_phantom(cfg)
    kappa = read_kappa(args.result, phantom.faces.faces, phantom.grid.points)
    threshold = (args.threshold if args.threshold is not None
                 else cfg.inversion.threshold_um_per_ms)
    m = score(phantom, kappa, threshold, phantom.membrane)
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
