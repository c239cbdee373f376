"""The README's Python API block runs as written (from the repository root) and prints what it
says. Reference: the same numbers computed here independently of the block's variables."""

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _python_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S)
    assert m, "README has no Python API block"
    return m.group(1)


def test_readme_python_block_runs(comm):
    code = _python_block()
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        ns = {}
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    # reference: S/S0 = 1 at b = 0, |S/S0| <= 1, a finite misfit and a gradient on every face
    sig = ns["signals"][0]
    seq = ns["case"].cfg.sequences[0]
    np.testing.assert_allclose(sig[seq.b_s_per_mm2 == 0], 1.0, atol=1e-10)
    assert np.all(np.abs(sig) <= 1.0 + 1e-10)
    assert np.isfinite(ns["J"]) and ns["J"] > 0
    assert ns["dJ_dkappa"].shape == (ns["case"].phantom.faces.num_faces,)
    if comm.rank == 0:
        assert f"{ns['basis'].num_modes} modes" in out.getvalue()
