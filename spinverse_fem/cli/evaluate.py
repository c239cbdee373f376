"""`spinverse evaluate`: interface metrics of a result against the configuration's ground truth,
or, for a configuration without one ([geometry] kind = "none"), the metrics that need no truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

from spinverse_fem.errors import InputError
from spinverse_fem.parallel import world


def check_threshold(value) -> float | None:
    """--threshold: None (use the config's) or a finite positive kappa in um/ms."""
    if value is None:
        return None
    if not (math.isfinite(value) and value > 0):
        raise InputError("--threshold", None, f"must be a positive kappa in um/ms (faces with "
                         f"kappa below it form the interface), got {value:g}")
    return float(value)


def cmd_evaluate(args) -> int:
    """Metrics of a result/kappa file against a ground truth (config); truth-free metrics when
    the config has none."""
    from spinverse_fem.cli.outputs import config_inputs
    from spinverse_fem.config import load_config
    from spinverse_fem.evaluation.scoring import score
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.io.atomic import write_json_atomic
    from spinverse_fem.io.kappa import read_kappa
    from spinverse_fem.io.paths import check_outputs, on_root

    comm = world()
    threshold = check_threshold(args.threshold)
    cfg = load_config(args.config)
    if args.out is not None:
        check_outputs([args.out], [*config_inputs(args.config, cfg), ("result", args.result)],
                      comm)
    phantom = build_phantom(cfg)
    kappa = read_kappa(args.result, phantom.faces.faces, phantom.grid.points)
    if threshold is None:
        threshold = cfg.inversion.threshold_um_per_ms
    if cfg.geometry.kind == "none":
        m = score(phantom, kappa, threshold, None)
    else:
        m = score(phantom, kappa, threshold, phantom.membrane)
    m["threshold_um_per_ms"] = threshold

    def write():
        if args.out:
            try:
                write_json_atomic(Path(args.out), m)
            except OSError as e:
                raise InputError(str(args.out), "--out", f"cannot write ({e.strerror or e})") \
                    from None
        print(json.dumps(m, indent=2, sort_keys=True), flush=True)

    on_root(comm, write)  # rank 0 writes and prints; a failure is the same error on every rank
    return 0


def register(sub):
    p = sub.add_parser("evaluate", help="CD-L2, BadEdge%% and face scores of a result",
                       description="Metrics of a result against the configuration's ground "
                       "truth; with [geometry] kind = \"none\", the metrics of the predicted "
                       "interface alone (interface faces, BadEdge/Open/Branch %%, sealed "
                       "compartments).")
    p.add_argument("config", help="configuration with the ground-truth geometry")
    p.add_argument("result", help="result.h5 or kappa file (kappa_um_per_ms, faces, vertices)")
    p.add_argument("--threshold", type=float,
                   help="kappa threshold in um/ms, > 0 (default: the config's "
                   "inversion.threshold_um_per_ms)")
    p.add_argument("--out", help="write the metrics as JSON (must not be an input file)")
    p.set_defaults(func=cmd_evaluate)
