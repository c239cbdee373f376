"""The scaling benchmark's driver and workers (benchmarks/scaling.py), at a size that runs in
seconds. Reference: the same iteration on 1 and 2 ranks must give the same objective and
gradient norm (MPI parity, 1e-8 relative) and the same mode count; the phases it reports must
account for the iteration time they break down."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.serial_only
def test_scaling_benchmark_reports_one_iteration_identically_on_1_and_2_ranks(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--sizes",
                           "3", "--ranks", "1", "2", "--modes", "40", "--force", "--timeout",
                           "300", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    one, two = (r for r in rep["results"] if r["kind"] == "strong")
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["modes"] == two["modes"] and 20 <= one["modes"] <= 40
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-8)
    assert two["gradient_norm"] == pytest.approx(one["gradient_norm"], rel=1e-8)
    for r in (one, two):
        assert all(v >= 0 for v in r["phases"].values())
        assert sum(r["phases"].values()) == pytest.approx(r["iteration_seconds"], abs=0.01)
        assert len(r["peak_rss_mb_per_rank"]) == r["ranks"]
        assert min(r["peak_rss_mb_per_rank"]) > 50       # a dolfinx process is > 50 MB
    assert out.with_suffix(".png").stat().st_size > 10_000
