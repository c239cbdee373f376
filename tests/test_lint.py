"""The repository is lint-clean: `ruff check` with the configuration in pyproject.toml
([tool.ruff]: pycodestyle E/W, pyflakes F, isort I, pyupgrade UP; line length 100).

ruff comes from this interpreter's environment (the `test` extra installs it): the module
(`python -m ruff`), else the executable next to sys.executable (a venv's bin/). One on PATH is not
used, since another version may apply other rules. Without ruff the test is skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # ruff takes about a second here; generous for a loaded machine


def _ruff_command() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    for name in ("ruff", "ruff.exe"):
        exe = Path(sys.executable).with_name(name)
        if exe.is_file():
            return [str(exe)]
    return None


def test_ruff_check_is_clean():
    cmd = _ruff_command()
    if cmd is None:
        pytest.skip("ruff is not installed in this environment (pip install -e '.[test]')")
    # --no-cache: leave no .ruff_cache behind; the configuration is found from cwd = ROOT
    args = [*cmd, "check", "--no-cache", "--output-format", "concise", "."]
    try:
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ruff check did not finish within {TIMEOUT_S} s: {' '.join(args)}")
    report = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, (
        f"`ruff check` exited with {proc.returncode} "
        f"(fix the findings, `ruff check --fix` for the safe ones):\n{report}")
