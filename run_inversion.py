#!/usr/bin/env python
"""The main job: reconstruct the face permeabilities of a tissue sample from dMRI signals.

    python run_inversion.py                      # paper default: torus on the bcc n = 4 grid
    python run_inversion.py --config my.toml --out results/ [--target signals.h5] [--resume]
    mpirun -n 4 python run_inversion.py ...

Same as `spinverse invert`; see README.md and docs/.
"""

import sys

from spinverse_fem.cli.app import main as spinverse_main

if __name__ == "__main__":
    sys.exit(spinverse_main(["invert", *sys.argv[1:]]))
