#!/usr/bin/env python
"""Recompute CD-L2 of an inversion output directory from `interface.ply` alone, independently
of the package (numpy, scipy, h5py only), and compare it with `metrics.json`.

    python -m experiments.check_cd_from_ply out/     # from the repository root

The truth surface is read from `result.h5` (`vertices`, `faces`, `membrane_truth`). CD-L2 as
the paper defines it: 10 samples per triangle at barycentric (u, v) in a fixed list, each cloud
centred on its own centroid, mean squared nearest distance one way plus the other way (um^2).
Exit code 1 when the two values differ by more than 1e-9 relative.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial import cKDTree

UV = [(0, 0), (0, .25), (0, .5), (0, .75), (0, 1), (.25, 0), (.25, .25), (.25, .5), (.25, .75),
      (.5, 0)]


def read_ascii_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = path.read_text().splitlines()
    count = {ln.split()[1]: int(ln.split()[2]) for ln in lines if ln.startswith("element ")}
    start = lines.index("end_header") + 1
    nv, nf = count["vertex"], count["face"]
    pts = np.array([[float(x) for x in ln.split()[:3]] for ln in lines[start:start + nv]])
    tris = np.array([[int(x) for x in ln.split()[1:4]] for ln in lines[start + nv:start + nv + nf]],
                    dtype=int).reshape(-1, 3)
    return pts, tris


def centred_cloud(pts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    p = np.concatenate([(1 - u - v) * pts[tris[:, 0]] + u * pts[tris[:, 1]] + v * pts[tris[:, 2]]
                        for u, v in UV])
    return p - p.mean(axis=0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    pts, tris = read_ascii_ply(out / "interface.ply")
    with h5py.File(out / "result.h5", "r") as f:
        truth_pts = np.asarray(f["vertices"])
        truth_tris = np.asarray(f["faces"])[np.asarray(f["membrane_truth"]).astype(bool)]
    reported = json.loads((out / "metrics.json").read_text())["cd_l2"]
    if len(tris) == 0:
        cd = 0.0  # the paper's convention for an empty prediction
    else:
        a, b = centred_cloud(pts, tris), centred_cloud(truth_pts, truth_tris)
        cd = float(np.mean(cKDTree(b).query(a)[0] ** 2) + np.mean(cKDTree(a).query(b)[0] ** 2))
    ok = abs(cd - reported) <= 1e-9 * max(abs(reported), 1.0)
    print(f"{out}: {len(tris)} faces; CD-L2 from interface.ply {cd:.9f} um^2, metrics.json "
          f"{reported:.9f} um^2: {'agree' if ok else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
