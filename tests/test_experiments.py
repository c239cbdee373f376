"""The experiment scripts (experiments/) end to end at tiny size: each produces its markdown
table and figure; the prior ablation resumes from its per-run JSON files.

They run in-process (no spawned processes), so they also run under mpiexec: every rank runs
every inversion, rank 0 writes (into rank 0's temporary directory, broadcast to all ranks)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import dataset  # noqa: E402
import prior_ablation  # noqa: E402
import staged_vs_split  # noqa: E402
import torus_variants  # noqa: E402

# 1 iteration per stage, 6 directions, small eigenbases: about 10 s per script on one core
TINY = ["--iterations", "1", "--directions", "6", "--max-modes", "30",
        "--reference-max-modes", "60", "--log-every", "1"]


@pytest.fixture
def out(comm, tmp_path):
    return Path(comm.bcast(str(tmp_path), root=0))


def test_dataset_reproduces_the_analytic_paper_files(comm, out):
    """Reference: the paper's 4 analytic files (torus 88, sphere 48, cylinder 96, tilted
    cylinder 52 membrane faces); the regenerated ones must equal them face for face, all 40
    ground truths must be closed 2-manifolds and each configuration must rebuild its membrane."""
    assert dataset.main(["--out", str(out)]) == 0
    gen = dataset.generated_ground_truths()
    assert [g.family for g in gen] == ["axon"] * 16 + list(dataset.ANALYTIC)
    faces = {g.family: int(g.membrane.sum()) for g in gen if g.family != "axon"}
    assert faces == {"torus": 88, "sphere": 48, "cylinder": 96, "tilted_cylinder": 52}
    for g in gen[:16]:
        assert 4.2 <= g.info["radius_um"] <= 5.5 and 4 <= g.info["segments"] <= 9
        assert 66 <= int(g.inside.sum()) <= 105
    # the same every time
    again = dataset.generated_ground_truths()
    assert all(np.array_equal(a.membrane, b.membrane) for a, b in zip(gen, again))
    texts = dataset.config_texts("paper")
    assert len(texts) == 20 and all('kind = "paper"' in t for t in texts.values())
    if comm.rank == 0:
        md = (out / "dataset.md").read_text()
        assert (out / "dataset.png").stat().st_size > 10_000
        for key in dataset.ANALYTIC:
            row = next(line for line in md.splitlines() if line.startswith(f"| gen_{key} |"))
            assert row.rstrip(" |").endswith("yes"), row
        assert "| no |" not in md and "| NO |" not in md


def test_staged_vs_split_tiny(comm, out):
    assert staged_vs_split.main([*TINY, "--out", str(out)]) == 0
    if comm.rank == 0:
        md = (out / "staged_vs_split.md").read_text()
        assert "| staged |" in md and "| split |" in md and "Verdict:" in md
        assert (out / "staged_vs_split.png").stat().st_size > 10_000
        runs = sorted((out / "staged_vs_split").glob("*.json"))
        assert [p.name for p in runs] == ["019_torus_majr10_minr6_split.json",
                                          "019_torus_majr10_minr6_staged.json"]
        r = json.loads(runs[1].read_text())
        assert r["iterations"] == 2 and r["stages"] == [["10/60"], ["10/20"]]
        assert len(r["history"]["iteration"]) == 3 and np.isfinite(r["misfit_joint"])


def test_prior_ablation_tiny_and_resume(comm, out, capsys):
    args = [*TINY, "--meshes", "1", "--out", str(out)]
    assert prior_ablation.main(args) == 0
    if comm.rank == 0:
        md = (out / "prior_ablation.md").read_text()
        assert "**mean**" in md and "..." not in md.split("## Means")[0].split("|---|")[-1]
        for c in prior_ablation.CONFIGS:
            assert f"| {c} |" in md
        assert (out / "prior_ablation.png").stat().st_size > 10_000
        assert len(list((out / "prior_ablation").glob("*.json"))) == 3
    capsys.readouterr()
    # a rerun with the same settings skips every finished run
    assert prior_ablation.main(args) == 0
    if comm.rank == 0:
        assert capsys.readouterr().out.count("skipped") == 3


def test_torus_variants_tiny(comm, out):
    """Two variants (a preset and a custom 3-stage curriculum) run and are tabulated with the
    sealed compartments of their interfaces."""
    args = [*TINY, "--variants", "restart", "closing_joint", "--out", str(out)]
    assert torus_variants.main(args) == 0
    if comm.rank == 0:
        md = (out / "torus_variants.md").read_text()
        assert "| restart |" in md and "| closing_joint |" in md
        r = json.loads((out / "torus_variants" / "closing_joint.json").read_text())
        assert r["stages"] == [["10/60"], ["10/20"], ["10/20", "10/60"]] or \
            r["stages"] == [["10/60"], ["10/20"], ["10/60", "10/20"]]
        assert r["iterations"] == 3
        assert r["metrics"]["true_sealed_compartment_tets"] == [64]
