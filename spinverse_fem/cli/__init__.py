"""The command line (`spinverse ...`, `run_inversion.py`): the top layer."""

from spinverse_fem.cli.app import main

__all__ = ["main"]
