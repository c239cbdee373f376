"""The experiment scripts (experiments/) end to end at tiny size: each produces its markdown
table and figure; the prior ablation resumes from its per-run JSON files.

They run in-process (no spawned processes), so they also run under mpiexec: every rank runs
every inversion, rank 0 writes (into rank 0's temporary directory, broadcast to all ranks).

experiments/ is a package imported from the repository root (`python -m pytest` from there puts
it on sys.path, as `python -m experiments.<script>` does for the scripts)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import (
    common,
    dataset,
    prior_ablation,
    refined_grids,
    robustness,
    staged_vs_split,
    torus_variants,
)
from spinverse_fem.meshes.paper import paper_meshes_dir

ROOT = Path(__file__).resolve().parents[1]

# 1 iteration per stage, 6 directions, small eigenbases: about 10 s per script on one core
TINY = ["--iterations", "1", "--directions", "6", "--max-modes", "30",
        "--reference-max-modes", "60", "--log-every", "1"]


def config_paths(cfg_text: str) -> list[str]:
    """The values of the `path = "..."` lines of a configuration text."""
    return re.findall(r'^path = "(.*)"$', cfg_text, flags=re.MULTILINE)


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
        # saved with the ground truth's path relative to the paper-mesh folder (portable)
        assert config_paths(r["config"]) == ["<paper_meshes>/019_torus_majr10_minr6.npz"]
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


def test_refined_grids_tiny(comm, out):
    """The sphere on the paper's n = 4 grid with targets simulated on the n = 8 grid: tabulated
    with the paper's tetrahedron count (576); a second call reuses the saved run. The misfit
    floor: with same-grid targets the truth fits exactly (the inverse crime, J ~ 0); with the
    refined targets it does not."""
    # the same cap for targets and model (else the truncation alone leaves a misfit)
    args = [*TINY, "--max-modes", "80", "--reference-max-modes", "80", "--sizes", "4",
            "--shapes", "sphere", "--floor", "--analytic-spacing", "2.0", "--out", str(out)]
    assert refined_grids.main(args) == 0
    assert refined_grids.main(args) == 0
    assert refined_grids.main([*args, "--basis", "frozen", "--refresh-every", "2",
                               "--curriculum", "cumulative"]) == 0
    assert refined_grids.main([*args, "--basis", "frozen", "--start", "10"]) == 0
    if comm.rank == 0:
        md = (out / "refined_grids.md").read_text()
        assert f"| sphere | 4 | 576 | eigen | long_to_short | 1 | 80 | {comm.size} |" in md, md
        assert (f"| sphere | 4 | 576 | frozen, refresh every 2 | cumulative | 1 | 80 | "
                f"{comm.size} |" in md), md
        assert (f"| sphere | 4 | 576 | frozen, refresh every 10 | long_to_short | 10 | 80 | "
                f"{comm.size} |" in md), md
        r10 = json.loads((out / "refined_grids" / "sphere_n4_frozen10_K80_start10.json")
                         .read_text())
        assert "start_um_per_ms = 10.0" in r10["config"]
        # the scores against the target grid's truth and the analytic surface
        sc = json.loads((out / "refined_grids" / "sphere_n4_K80.scores.json").read_text())
        assert all(np.isfinite(v) and v >= 0 for v in sc.values()), sc
        assert sc["cd_l2_grid_truth_vs_analytic"] > 0.1      # the staircase is not the sphere
        r = json.loads((out / "refined_grids" / "sphere_n4_K80.json").read_text())
        assert "grid_refinement = 2" in r["config"] and r["iterations"] == 3
        assert np.isfinite(r["metrics"]["cd_l2"])
        assert (out / "refined_grids.png").stat().st_size > 10_000
        floor = json.loads((out / "refined_grids" / "sphere_n4.floor.json").read_text())
        same = [v for k, v in floor.items() if k.startswith("refine1/")]
        refined = [v for k, v in floor.items() if k.startswith("refine2/")]
        assert len(same) == len(refined) == 3
        assert all(v["truth"] < 1e-20 < v["start"] for v in same)
        assert all(v["truth"] > 1e-6 for v in refined)


def test_saved_configurations_are_portable(comm, tmp_path):
    """The configuration text saved with a run names the paper's file relative to the paper-mesh
    folder; runnable_config restores the absolute path, and the comparison of the cache accepts
    both forms."""
    gt = dataset.find(dataset.ground_truths("paper"), "torus")
    text = gt.config_text()
    folder = str(paper_meshes_dir().resolve())
    assert config_paths(text) == [f"{folder}/019_torus_majr10_minr6.npz"]
    portable = common.portable_config(text)
    assert config_paths(portable) == ["<paper_meshes>/019_torus_majr10_minr6.npz"]
    assert common.runnable_config(portable) == text
    analytic = dataset.generated_ground_truths()[-1].config_text()
    assert common.portable_config(analytic) == analytic
    settings = common.Settings()
    for saved in (text, portable):  # written before paths were portable, and since
        path = tmp_path / "run.json"
        path.write_text(json.dumps(dict(config=saved, settings=settings.as_dict(),
                                        code_version=common.CODE_VERSION)))
        assert common.cache_status(path, text, settings)[0] == "saved"
    other = text.replace("019_torus_majr10_minr6", "018_sphere")
    assert common.cache_status(path, other, settings)[0] == "other configuration"


SHIPPED = [  # (script, extra arguments, runs saved in experiments/results)
    (prior_ablation, [], 30),
    (staged_vs_split, [], 2),
    (torus_variants, ["--variants", "paper", "restart", "short_last", "short_last_carried",
                      "long_to_short_m3", "long_to_short_m4"], 6),
]


@pytest.mark.parametrize("script, extra, runs", SHIPPED, ids=lambda v: getattr(v, "__name__", ""))
def test_shipped_runs_are_recognised(comm, capsys, script, extra, runs):
    """Reference: the runs saved in experiments/results (made with the default settings); each
    script's --check-cache finds every one of them, so nothing would be run again."""
    assert script.main(["--check-cache", *extra]) == 0
    if comm.rank == 0:
        out = capsys.readouterr().out
        assert f"{runs}/{runs} run(s) saved, nothing would run" in out, out
    for path in common.RESULTS.glob(f"{script.__name__.split('.')[-1]}/*.json"):
        paths = config_paths(json.loads(path.read_text())["config"])
        assert paths and all(p.startswith("<paper_meshes>/") for p in paths), (path, paths)


@pytest.mark.serial_only
def test_scripts_run_as_modules_only():
    """`python -m experiments.<script>` from the repository root; run as a file, a script says
    so instead of failing on its imports."""
    r = subprocess.run([sys.executable, "-m", "experiments.staged_vs_split", "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--check-cache" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "staged_vs_split.py")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "python -m experiments.staged_vs_split" in r.stderr, r.stderr


def test_robustness_tiny(comm, out):
    """The noise part at one SNR and seed, both misfits, 1 iteration per stage: the targets
    carry the configured Rician noise (the saved configuration says so and the table lists
    both misfits with finite scores, also against the analytic torus); a second call reuses
    the saved runs."""
    args = [*TINY, "--parts", "noise", "--snr", "50", "--seeds", "0", "--out", str(out)]
    assert robustness.main(args) == 0
    assert robustness.main(args) == 0
    if comm.rank == 0:
        md = (out / "robustness.md").read_text()
        for misfit in ("plain", "rician"):
            assert f"| torus | 50 | 0 | {misfit} |" in md, md
            r = json.loads((out / "robustness" / f"noise__torus_snr50_seed0_{misfit}.json")
                           .read_text())
            assert "noise_snr = 50.0\nseed = 0" in r["config"]
            assert ("[inversion]\niterations_per_stage = 1\nnoise_snr = 50.0"
                    in r["config"]) == (misfit == "rician")
            assert np.isfinite(r["metrics"]["cd_l2"]) and r["cd_l2_analytic"] > 0
        assert (out / "robustness.png").stat().st_size > 10_000
        assert (out / "robustness_surfaces.png").stat().st_size > 10_000
        # the SNR 50 target is reported from the plain run alone (1 of 3 seeds)
        row = next(line for line in md.splitlines() if line.startswith(
            "| default torus, SNR 50 (plain misfit, every seed): mean CD-L2"))
        r = json.loads((out / "robustness" / "noise__torus_snr50_seed0_plain.json").read_text())
        assert f"| {r['metrics']['cd_l2']:.3g} |" in row and "| 1 |" in row, row
        assert "| 0 | not run yet |" in md


def test_robustness_weights_part_changes_only_the_manifold_weight():
    """Reference: the default example's configuration text: the weights part's runs differ
    from the noiseless shapes part's only in the manifold_weight line (every 4th shape)."""
    from experiments.common import Settings

    shapes = robustness.runs(["shapes"], Settings(), [], [], 3, meshes=8)
    weights = robustness.runs(["weights"], Settings(), [], [], 3, meshes=8,
                              manifold_weights=(2.0, 8.0))
    assert [d["manifold_weight"] for _, _, d in weights] == [2.0, 2.0, 8.0, 8.0]
    clean = {d["shape"]: t for _, t, d in shapes if d["snr"] is None}
    for label, text, d in weights:
        assert d["shape"] in list(clean)[::4]
        differ = [(a, b) for a, b in zip(clean[d["shape"]].splitlines(), text.splitlines(),
                                         strict=True) if a != b]
        assert differ[1:] == [("manifold_weight = 4.0",
                               f"manifold_weight = {d['manifold_weight']!r}")], differ


def test_robustness_forgetting_table_reads_each_stage_end_and_the_run_end():
    """Reference: a hand-made run of three one-sequence stages whose history ends stage 0 at
    J = 0.1 (CD-L2 8), stage 1 at J = 0.02 (CD-L2 5), stage 2 at J = 0.01 (CD-L2 4), and final
    per-sequence misfits 30 / 4 / 0.01: the table shows each pair and the CD-L2 after each
    stage, and the median ratio over the two earlier sequences is (300 + 200) / 2 = 250."""
    run = dict(shape="s", part="shapes", snr=None,
               stages=[["10/60"], ["10/20"], ["5/6"]],
               history=dict(stage=[0, 0, 1, 1, 2, 2], misfit=[5.0, 0.1, 3.0, 0.02, 1.0, 0.01],
                            cd_l2=[9.0, 8.0, 7.0, 5.0, 4.5, 4.0]),
               misfit_per_sequence={"5/6": 0.01, "10/20": 4.0, "10/60": 30.0})
    noisy = dict(run, snr=50.0)
    text = "\n".join(robustness.forgetting_section([run, noisy]))
    assert "| s | shapes | 0.1 -> 30 | 0.02 -> 4 | 0.01 -> 0.01 | 8 / 5 / 4 |" in text, text
    assert "end 250x (median over 2)" in text, text
    assert robustness.forgetting_section([noisy]) == []


def test_robustness_joint_probe_keeps_the_default_stages_and_ramp():
    """Reference: the default example's long_to_short stages (10/60, 10/20, 5/6 ms) and its
    manifold ramp 4 t / 600 over three 200-iteration stages: the probe's configuration has the
    same three stages with the same ramp for t < 600 (to round-off), then all three sequences
    jointly, ramping on to 8 (6 at its start)."""
    from experiments.common import Settings, runnable_config
    from spinverse_fem.config import parse_config

    runs = robustness.runs(["joint"], Settings(), [], [], 3, meshes=8)
    assert [d["shape"] for _, _, d in runs][:2] == [d["shape"] for _, _, d in robustness.runs(
        ["shapes"], Settings(), [], [], 3, meshes=8)][:8:4]
    for _, text, d in runs:
        cfg = parse_config(runnable_config(text), source="probe")
        names = [[cfg.sequences[i].name for i in s.sequences] for s in cfg.inversion.custom_stages]
        assert names == [["10/60"], ["10/20"], ["5/6"], ["10/60", "10/20", "5/6"]]
        stages = cfg.inversion.custom_stages
        total = sum(s.iterations for s in stages)
        for t in (1, 150, 599):
            w = stages[t // 200].manifold_weight * t / total
            assert abs(w - 4.0 * t / 600) < 1e-12
        assert stages[3].manifold_weight * 600 / total == 6.0
        assert (cfg.target is not None and cfg.target.grid_refinement == 3) == (
            d["refine"] == 3)


def test_robustness_conforming_target_is_read_from_its_table(comm, out):
    """The conforming part's plumbing on a small case (the shipped sphere of radius 3 um in the
    domain of a 2 x 2 x 2 bcc grid of 8 um cubes, so no gmsh is needed): the simulation
    configuration is the inversion's on the file grid with the interface as membrane; the
    inversion reads that signal table as its [target] (reference: the table read by
    io.targets, and the same-grid targets it must differ from: no inverse crime)."""
    import shutil

    from spinverse_fem.config import parse_config
    from spinverse_fem.forward.synthetic import simulate_targets
    from spinverse_fem.geometry.phantom import build_phantom
    from spinverse_fem.io.targets import load_targets

    settings = common.Settings(iterations=1, max_modes=20, reference_max_modes=40,
                               directions=2)
    folder = out / "conforming"
    mesh, cfg_path, table = robustness.conforming_paths(folder, "gen_sphere")
    if comm.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "meshes" / "data" / "sphere_in_bcc2.msh", mesh)
    comm.Barrier()
    # the scoring truth only: no face set of this 96-tet grid lies on the 3 um sphere
    geometry = '[geometry]\nkind = "sphere"\ncenter_um = [0.0, 0.0, 0.0]\nradius_um = 12.0\n'
    text = robustness.config_text(geometry, settings, "test", target_file=str(table))
    text = re.sub(r"(?m)^cubes = .*$", "cubes = 2", text)
    text = re.sub(r"(?m)^cube_um = .*$", "cube_um = 8.0", text)
    assert robustness.make_conforming_target(comm, "gen_sphere", text, settings,
                                             folder) == table
    ref = parse_config(cfg_path.read_text(), source=str(cfg_path))
    inv = parse_config(text, source="<inversion>")
    assert ref.grid.kind == "file" and ref.eigen.max_modes == 40
    assert [s.name for s in ref.sequences] == [s.name for s in inv.sequences]
    ph = build_phantom(ref)
    assert int(ph.membrane.sum()) == 276                # gmsh's count of surface 101
    assert ph.outer == "robin" and np.all(ph.kappa[~ph.membrane] == 100.0)

    res = common.run_case(comm, text, settings, "conforming test")
    assert np.isfinite(res["metrics"]["cd_l2"])
    read, _ = load_targets(table, inv)
    same_grid, _, _ = simulate_targets(comm, inv)
    w = inv.inversion.misfit_weight
    for name, tgt, grid_tgt in zip([s.name for s in inv.sequences], read, same_grid,
                                   strict=True):
        assert np.max(np.abs(tgt - grid_tgt)) > 1e-3     # the staircase differs
        # the run's final misfit is against the table it read
        assert res["misfit_per_sequence"][name] >= 0.0
    final = 10.0 ** np.asarray(res["final_log10_kappa"])
    from spinverse_fem.inverse.case import Case

    case = Case(comm, inv)
    mis = case.misfit([0, 1, 2], num_modes=res["modes"][-1])
    sig = mis.signals(final)
    expect = w * np.mean(np.abs(sig[0] - read[0]) ** 2)
    assert res["misfit_per_sequence"][inv.sequences[0].name] == pytest.approx(expect, rel=1e-8)


def test_robustness_conforming_cylinder_is_closed_on_the_boundary(tmp_path):
    """Reference: the paper's ground-truth convention (a shape leaving the box is closed by the
    outer faces it reaches): the clipped cylinder's ends (surface 201 of the shipped mesh, 128
    triangles) join its side (101, 332) in the membrane, at the barrier kappa; every other
    outer face keeps the open (Robin) kappa."""
    import shutil

    from spinverse_fem.config import parse_config
    from spinverse_fem.geometry.phantom import build_phantom

    mesh = tmp_path / "cylinder.msh"
    shutil.copy(ROOT / "meshes" / "data" / "cylinder_in_bcc2.msh", mesh)
    geometry = ('[geometry]\nkind = "cylinder"\ncenter_um = [0.0, 0.0, 0.0]\n'
                'axis = [0.0, 0.0, 1.0]\nradius_um = 3.0\nheight_um = 20.0\n')
    text = robustness.config_text(geometry, common.Settings(), "test")
    ref = robustness.conforming_reference_text(text, mesh, common.Settings(), [201])
    (tmp_path / "ref.toml").write_text(ref)
    ph = build_phantom(parse_config(ref, source=str(tmp_path / "ref.toml")))
    outer = ph.faces.outer
    assert int((ph.membrane & ~outer).sum()) == 332 and int((ph.membrane & outer).sum()) == 128
    assert np.all(ph.kappa[ph.membrane] == 0.01) and np.all(ph.kappa[~ph.membrane] == 100.0)
