"""The Spinverse paper's study on the n = 4 grid (see README.md).

A package so that its scripts share `experiments.common` without editing sys.path: run them from
the repository root as modules, e.g. `python -m experiments.prior_ablation --help`.
"""
