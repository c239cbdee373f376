#!/usr/bin/env python
"""Robustness of the default method (issue 13): smooth truths, Rician noise, all 20 shapes.

Every run is the default example (examples/paper_torus.toml: paper grid n = 4, three PGSE
sequences, long_to_short, Adam, manifold weight 4) with its [geometry] replaced; one process
per run, each saved as OUT/robustness/<part>__<label>.json and reused when its configuration
and settings are unchanged (rerun the same command after a kill).

Parts (--parts, default the first four):
  smooth  sphere, torus, cylinder (our analytic shapes, the paper's sizes) and two generated
          bent axons: targets simulated on the grid refined --refine times (default 3; the
          membrane re-resolved on the shape's true surface there, no inverse crime), noiseless;
          CD-L2 also against the analytic surface itself (marched at 0.5 um).
  noise   the default torus, targets on its own grid with Rician noise at SNR 100, 50, 20
          (relative to S0 = 1), seeds 0, 1, 2; misfit "plain" (least squares on S/S0) and
          "rician" ([inversion] noise_snr = SNR: the Rician-biased magnitude).
  shapes  the paper's 20 ground truths, noiseless and at SNR 50 (seed 0), plain misfit.
  weights the torus-tuned manifold weight (4) re-checked on every 4th paper ground truth
          (5 shapes, noiseless) at --manifold-weights (default 2, the paper's, and 8).
  conforming
          the sphere and the cylinder (the paper's sizes) with targets simulated on conforming
          gmsh meshes of the paper grid's domain (meshes/conforming.py --bcc; edge length
          CONFORMING_SIZE_UM at the membrane and away from it; the membrane is the true surface
          up to its triangulation, not a staircase of any grid; where the box clips the
          cylinder its ends on the outer boundary belong to the membrane, as in the paper's
          truths): `spinverse simulate` on a file-grid configuration written next to the mesh,
          then the inversion reads that signal table as its [target] file. Needs gmsh (pip
          install gmsh) unless the runs are saved; the mesh, the configuration and the table
          are written under OUT/robustness/conforming/.
  joint   a probe of a method change: the default three stages, then a fourth that fits all
          three sequences jointly with manifold weight 8 (the earlier stages' ramp kept as in
          the default), on every 4th paper ground truth (noiseless) and the two smooth bent
          axons. Not in the default --parts.

--match REGEX keeps only the runs whose label matches (e.g. --match 'joint__(000|gen_axon)').

    python -m experiments.robustness --parts noise --snr 50 --seeds 0     # one condition
    mpiexec -n 2 python -m experiments.robustness                          # everything
    python -m experiments.robustness --shard 0/2 & python -m experiments.robustness --shard 1/2
                                      # everything, as two one-core processes (faster here:
                                      # the paper grid gains little from a second rank)

OUT/robustness.md (tables: CD-L2, BadEdge, IoU, sealed-compartment error per run, mean and
spread per condition), OUT/robustness.png (CD-L2 and BadEdge against SNR) and
OUT/robustness_surfaces.png (reconstructed over true surfaces of a few runs) are rewritten
after every run from all saved runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

if not __package__:  # run as a file: experiments.* is importable only when run as a module
    raise SystemExit("run it as a module from the repository root: "
                     f"python -m experiments.{Path(__file__).stem}")

from experiments.common import (  # noqa: E402
    RESULTS,
    ROOT,
    Settings,
    atomic_write_text,
    cached_run,
    default_config_text,
    fmt,
    fmt_seconds,
    iteration_logger,
    markdown_table,
    mpi_comm,
    pyplot,
    runnable_config,
    save_figure,
    saved_run,
    say,
    toml_string,
)

PARTS = ("smooth", "noise", "shapes", "weights", "conforming", "joint")
DEFAULT_PARTS = PARTS[:5]
JOINT_MANIFOLD_WEIGHT = 8.0
DEFAULT_MANIFOLD_WEIGHT = 4.0          # examples/paper_torus.toml
SMOOTH = ("gen_sphere", "gen_torus", "gen_cylinder", "gen_axon_s00", "gen_axon_s01")
MISFITS = ("plain", "rician")
CONFORMING = ("gen_sphere", "gen_cylinder")
SMOOTH_PARTS = ("smooth", "conforming")  # scored against the analytic surface
CONFORMING_SIZE_UM = (1.0, 2.5)        # gmsh edge length at the membrane / away from it
CONFORMING_MEMBRANE_TAG = 101          # meshes/conforming.py: the interface of layer 1
OUTER_TAG = 200                        # meshes/conforming.py: 200 + i = layer i clipped


def config_text(geometry_toml: str, settings: Settings, header: str, *,
                refine: int | None = None, snr: float | None = None, seed: int = 0,
                misfit: str = "plain", target_file: str | None = None) -> str:
    target = ((f"grid_refinement = {refine}\n" if refine else "")
              + (f"noise_snr = {snr!r}\nseed = {seed}\n" if snr else "")
              + (f"file = {toml_string(target_file)}\n" if target_file else ""))
    extra = f"noise_snr = {snr!r}\n" if misfit == "rician" else ""
    return default_config_text(geometry_toml, settings, header, inversion_lines=extra,
                               target_lines=target)


def runs(parts, settings: Settings, snrs, seeds, refine: int, meshes: int = 20,
         manifold_weights=(2.0, 8.0), conforming_dir: Path = RESULTS / "robustness" /
         "conforming") -> list[tuple[str, str, dict]]:
    """[(label, config text, description)] of the selected runs, in running order;
    conforming_dir: where the conforming part's meshes and targets are (see
    conforming_paths)."""
    from experiments.dataset import find, generated_ground_truths, paper_ground_truths

    out = []
    if "smooth" in parts:
        gen = generated_ground_truths()
        for key in SMOOTH:
            gt = find(gen, key)
            out.append((f"smooth__{key}", config_text(
                gt.geometry_toml, settings, f"experiments/robustness.py: {key}, targets "
                f"refined {refine}x", refine=refine),
                dict(part="smooth", shape=key, snr=None, seed=None, misfit="plain")))
    if "noise" in parts:
        torus = find(generated_ground_truths(), "gen_torus")
        for snr in snrs:
            for seed in seeds:
                for misfit in MISFITS:
                    label = f"noise__torus_snr{snr:g}_seed{seed}_{misfit}"
                    out.append((label, config_text(
                        torus.geometry_toml, settings, f"experiments/robustness.py: {label}",
                        snr=snr, seed=seed, misfit=misfit),
                        dict(part="noise", shape="torus", snr=snr, seed=seed, misfit=misfit)))
    if "shapes" in parts:
        # all noiseless runs first: the 20-shape noiseless mean is the study's first target
        for snr in (None, 50.0):
            for gt in paper_ground_truths()[:meshes]:
                label = f"shapes__{gt.name}_" + ("noiseless" if snr is None else f"snr{snr:g}")
                out.append((label, config_text(gt.geometry_toml, settings,
                                               f"experiments/robustness.py: {label}", snr=snr),
                            dict(part="shapes", shape=gt.name, snr=snr, seed=0,
                                 misfit="plain")))
    if "weights" in parts:
        for w in manifold_weights:
            for gt in paper_ground_truths()[:meshes][::4]:
                label = f"weights__{gt.name}_manifold{w:g}"
                text = config_text(gt.geometry_toml, settings,
                                   f"experiments/robustness.py: {label}")
                text, n = re.subn(r"(?m)^manifold_weight = .*$", f"manifold_weight = {w!r}",
                                  text)
                if n != 1:
                    raise RuntimeError("the default example has no single manifold_weight line")
                out.append((label, text, dict(part="weights", shape=gt.name, snr=None, seed=0,
                                              misfit="plain", manifold_weight=w)))
    if "conforming" in parts:
        gen = generated_ground_truths()
        for key in CONFORMING:
            gt = find(gen, key)
            label = f"conforming__{key}"
            out.append((label, config_text(
                gt.geometry_toml, settings, f"experiments/robustness.py: {key}, targets "
                f"on a conforming mesh (h {CONFORMING_SIZE_UM[0]:g} / "
                f"{CONFORMING_SIZE_UM[1]:g} um, up to {settings.reference_max_modes} modes)",
                target_file=_from_root(conforming_paths(conforming_dir, key)[2])),
                dict(part="conforming", shape=key, snr=None, seed=None, misfit="plain")))
    if "joint" in parts:
        gen = generated_ground_truths()
        cases = [(gt, None) for gt in paper_ground_truths()[:meshes][::4]]
        cases += [(find(gen, key), refine) for key in SMOOTH if key.startswith("gen_axon")]
        for gt, ref in cases:
            label = f"joint__{gt.name}"
            text = joint_stage_config(config_text(
                gt.geometry_toml, settings, f"experiments/robustness.py: {label}", refine=ref))
            out.append((label, text, dict(part="joint", shape=gt.name, snr=None, seed=0,
                                          misfit="plain", refine=ref)))
    return out


def _from_root(path: Path) -> str:
    """`path` relative to the repository root when it lies inside (the experiments run from
    there; saved configurations then stay valid in another checkout), else absolute."""
    path = Path(path).resolve()
    return (path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).as_posix()


def conforming_paths(folder: Path, key: str) -> tuple[Path, Path, Path]:
    """(mesh, simulation config, signal table) of the conforming target of `key`; the mesh
    sizes are in the names, so that other sizes make other files."""
    stem = f"{key.removeprefix('gen_')}_h{CONFORMING_SIZE_UM[0]:g}-{CONFORMING_SIZE_UM[1]:g}"
    return folder / f"{stem}.msh", folder / f"{stem}.toml", folder / f"{stem}.h5"


def conforming_reference_text(inversion_text: str, mesh: Path, settings: Settings,
                              closure_tags=()) -> str:
    """The configuration that simulates the conforming target: the inversion's (same
    sequences, physics and permeabilities) on the file grid `mesh`, whose interface tag is the
    membrane, with the reference mode cap. closure_tags: surface tags of the shape's share of
    the outer boundary (meshes/conforming.py: 201 where the domain clips the shape), members
    of the membrane too, as in the paper's ground truths (a shape leaving the box is closed by
    the outer faces it reaches)."""
    from spinverse_fem.config import parse_config

    cfg = parse_config(runnable_config(inversion_text), source="<conforming>")
    perm = cfg.permeability
    text = re.sub(r"(?ms)^\[target\]\n.*\Z", "", inversion_text).rstrip("\n") + "\n"
    text = re.sub(r"\A# experiments/robustness.py: .*\n", "", text)  # the inversion's header
    tables = {
        # relative to the configuration's folder, which holds the mesh
        "grid": f'[grid]\nkind = "file"\npath = {toml_string(mesh.name)}\nunit_um = 1.0\n',
        "geometry": '[geometry]\nkind = "file_tags"\n',
        "permeability": f"[permeability]\nopen_um_per_ms = {perm.open_um_per_ms!r}\n"
                        f'outer = "{perm.outer}"\n\n[[membrane]]\nname = "shape surface"\n'
                        f"tag = {CONFORMING_MEMBRANE_TAG}\n"
                        f"kappa_um_per_ms = {perm.barrier_um_per_ms!r}\n"
                        + "".join(f'\n[[membrane]]\nname = "shape end on the boundary"\n'
                                  f"tag = {tag}\nkappa_um_per_ms = "
                                  f"{perm.barrier_um_per_ms!r}\n" for tag in closure_tags),
    }
    for name, table in tables.items():
        text, n = re.subn(rf"(?ms)^\[{name}\]\n.*?(?=^\[)", table + "\n", text, count=1)
        if n != 1:
            raise RuntimeError(f"the inversion configuration has no [{name}] table")
    text = re.sub(r"(?m)^max_modes = .*$", f"max_modes = {settings.reference_max_modes}", text,
                  count=1)
    return ("# experiments/robustness.py: the conforming target's simulation "
            "(spinverse simulate THIS --out TABLE)\n" + text)


def make_conforming_target(comm, key: str, inversion_text: str, settings: Settings,
                           folder: Path) -> Path:
    """Mesh (rank 0, gmsh), configuration and signal table of the conforming target of `key`
    (each made only if missing); returns the table's path."""
    from experiments.dataset import find, generated_ground_truths
    from spinverse_fem.cli.app import main as spinverse
    from spinverse_fem.meshes.conforming import build
    from spinverse_fem.meshes.paper import paper_shape

    mesh, cfg_path, table = conforming_paths(folder, key)
    if comm.rank == 0:
        gt = find(generated_ground_truths(), key)
        shape = paper_shape(gt.family)
        if any(abs(c) > 1e-12 for c in shape.center_um) or (
                getattr(shape, "axis", (0.0, 0.0, 1.0)) != (0.0, 0.0, 1.0)):
            raise RuntimeError(f"{key}: meshes/conforming.py builds shapes at the origin "
                               f"along z, not {shape}")
        if not mesh.exists():
            from spinverse_fem.config import parse_config

            grid = parse_config(runnable_config(inversion_text), source="<conforming>").grid
            counts = build(gt.family, [shape.radius_um], CONFORMING_SIZE_UM[0], mesh,
                           height_um=getattr(shape, "height_um", None),
                           bcc=(grid.cubes, grid.cube_um), size_far_um=CONFORMING_SIZE_UM[1])
            say(comm, f"  wrote {mesh}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        import meshio

        m = meshio.read(mesh)
        tags = set()
        for block, tag in zip(m.cells, m.cell_data["gmsh:physical"], strict=True):
            if block.type == "triangle":
                tags |= {int(t) for t in np.unique(tag)}
        closure = sorted(t for t in tags if t > OUTER_TAG)
        atomic_write_text(cfg_path, conforming_reference_text(inversion_text, mesh, settings,
                                                              closure))
    comm.Barrier()
    if not table.exists():
        say(comm, f"  simulating the conforming target: spinverse simulate {cfg_path} "
                  f"--out {table}")
        if spinverse(["simulate", str(cfg_path), "--out", str(table)]) != 0:
            raise RuntimeError(f"spinverse simulate {cfg_path} failed")
    return table


def joint_stage_config(text: str) -> str:
    """The default configuration with a fourth, joint stage: curriculum "custom" with the three
    long_to_short stages (10/60, 10/20, 5/6 ms), then all three sequences together.

    The manifold weight ramps linearly over the whole run to the current stage's weight, so
    four stages of N iterations stretch the ramp to 4N: the first three stages get weight
    4 * 4/3 so that their ramp is the default's (4 t / 3N); the joint stage ramps on to
    JOINT_MANIFOLD_WEIGHT (from 3/4 of it at its start)."""
    text, n = re.subn(r'(?m)^curriculum = .*$', 'curriculum = "custom"', text)
    weight = re.findall(r"(?m)^manifold_weight = (.*)$", text)
    if n != 1 or len(weight) != 1:
        raise RuntimeError("the default example has no single curriculum / manifold_weight line")
    early = float(weight[0]) * 4.0 / 3.0
    stages = "".join(
        f'[[inversion.stage]]\nsequences = {names}\nmanifold_weight = {w!r}\n\n'
        for names, w in (('["10/60"]', early), ('["10/20"]', early), ('["5/6"]', early),
                         ('["10/60", "10/20", "5/6"]', JOINT_MANIFOLD_WEIGHT)))
    head, sep, target = text.partition("\n[target]\n")
    return head.rstrip("\n") + "\n\n" + stages.rstrip("\n") + "\n" + sep + target


def surfaces(r: dict, spacing_um: float = 1.0):
    """(reconstructed triangles, true triangles) in um of a saved run: the faces below the
    threshold at its final kappa, and what it is scored against: for a smooth truth the
    analytic surface of its [geometry] (marched at spacing_um), otherwise the grid's own
    membrane faces."""
    from spinverse_fem.config import parse_config
    from spinverse_fem.evaluation.analytic_surface import analytic_surface
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.geometry.phantom import build_phantom

    cfg = parse_config(runnable_config(r["config"]), source=r["label"])
    ph = build_phantom(cfg)
    pred = extract_interface(10.0 ** np.asarray(r["final_log10_kappa"]),
                             cfg.inversion.threshold_um_per_ms, ph.active)
    recon = ph.grid.points[ph.faces.faces[pred]]
    if r["part"] not in SMOOTH_PARTS or cfg.geometry.kind in ("paper", "file_tags", "none"):
        return recon, ph.grid.points[ph.faces.faces[ph.membrane]]
    return recon, analytic_surface(cfg, spacing_um)


def plot_reconstructions(runs: list[dict], path: Path) -> None:
    """One 3-D panel per run: the reconstructed faces (blue) over the true surface (orange,
    translucent), with the run's CD-L2 in the title."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    plt = pyplot()
    ncols = min(len(runs), 4)
    nrows = (len(runs) + ncols - 1) // ncols
    fig = plt.figure(figsize=(max(3.4 * ncols, 6.0), 3.4 * nrows))
    for k, r in enumerate(runs):
        recon, truth = surfaces(r)
        ax = fig.add_subplot(nrows, ncols, k + 1, projection="3d")
        ax.add_collection3d(Poly3DCollection(truth, facecolors=[[0.9, 0.55, 0.25, 0.18]],
                                             edgecolors="none"))
        ax.add_collection3d(Poly3DCollection(recon, facecolors=[[0.25, 0.45, 0.85, 0.85]],
                                             edgecolors="k", linewidths=0.15))
        half = float(np.abs(np.concatenate([truth.reshape(-1, 3),
                                            recon.reshape(-1, 3)])).max()) if recon.size else 14
        for a in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            a(-half, half)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=22, azim=35)
        ax.tick_params(labelsize=5)
        snr = "noiseless" if r["snr"] is None else f"SNR {r['snr']:g}"
        score = (f"CD-L2 {r['cd_l2_analytic']:.2f} um^2 to the surface"
                 if r["part"] in SMOOTH_PARTS and r.get("cd_l2_analytic") is not None else
                 f"CD-L2 {r['metrics']['cd_l2']:.2f} um^2, "
                 f"BadEdge {r['metrics']['bad_edge_pct']:.0f} %")
        ax.set_title(f"{r['shape']} ({r['part']}, {snr})\n{score}", fontsize=8)
    fig.suptitle("reconstructed faces (blue) over the truth (orange), um\norange: the "
                 "analytic surface for smooth truths, the grid's membrane faces otherwise",
                 fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def analytic_cd(r: dict, spacing_um: float = 0.5, *, truth: bool = False) -> float | None:
    """CD-L2 (um^2) of a saved run's final interface (truth=True: of its grid's own truth, the
    membrane faces of the inversion grid) to the analytic surface of its [geometry]; None for
    file ground truths."""
    from spinverse_fem.config import parse_config
    from spinverse_fem.evaluation.analytic_surface import analytic_surface
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.evaluation.metrics import chamfer_l2
    from spinverse_fem.geometry.phantom import build_phantom

    cfg = parse_config(runnable_config(r["config"]), source=r["label"])
    if cfg.geometry.kind in ("paper", "file_tags", "none"):
        return None
    ph = build_phantom(cfg)
    pred = ph.membrane if truth else extract_interface(
        10.0 ** np.asarray(r["final_log10_kappa"]), cfg.inversion.threshold_um_per_ms,
        ph.active)
    return float(chamfer_l2(ph.grid.points[ph.faces.faces[pred]],
                            analytic_surface(cfg, spacing_um)))


def sides(r: dict) -> dict:
    """Where a saved run's final faces lie relative to its grid's truth (`face_sides`)."""
    from spinverse_fem.config import parse_config
    from spinverse_fem.evaluation.compartments import face_sides
    from spinverse_fem.evaluation.interface import extract_interface
    from spinverse_fem.geometry.phantom import build_phantom

    cfg = parse_config(runnable_config(r["config"]), source=r["label"])
    ph = build_phantom(cfg)
    pred = extract_interface(10.0 ** np.asarray(r["final_log10_kappa"]),
                             cfg.inversion.threshold_um_per_ms, ph.active)
    return face_sides(ph.faces, pred, ph.membrane)


def _row(r: dict) -> list:
    m = r["metrics"]
    sealed = m.get("sealed_status_mismatch_tets")
    seed = r.get("seed")
    return [r["shape"], "-" if r["snr"] is None else f"{r['snr']:g}",
            "-" if seed is None else seed,
            r["misfit"], fmt(m.get("cd_l2")), fmt(r.get("cd_l2_analytic")),
            fmt(r.get("cd_l2_analytic_grid_truth")),
            fmt(m.get("bad_edge_pct")), fmt(m.get("iou")), "-" if sealed is None else sealed,
            "{on} / {inside} / {outside}".format(**r["face_sides"]) if "face_sides" in r
            else "-", _before_last_stage(r),
            ", ".join(f"{k} {v:.2g}" for k, v in r.get("misfit_per_sequence", {}).items())
            or "-",
            fmt_seconds(r["seconds"])]


def _before_last_stage(r: dict) -> str:
    """CD-L2 / BadEdge % at the last iteration before the final stage began."""
    h = r.get("history") or {}
    stage = np.asarray(h.get("stage", []))
    if stage.size == 0 or stage.max() == 0:
        return "-"
    i = int(np.flatnonzero(stage < stage.max())[-1])
    return f"{h['cd_l2'][i]:.3g} / {h['bad_edge_pct'][i]:.1f}"


HEADER = ["shape", "SNR", "seed", "misfit", "CD-L2 (um^2)", "CD-L2 to the analytic surface",
          "the n = 4 truth to the analytic surface",
          "BadEdge %", "IoU", "sealed-compartment error (tets)",
          "faces on / inside / outside the truth", "CD-L2 / BadEdge before the last stage",
          "final misfit per sequence (delta/Delta ms: J)", "wall"]


def _mean_spread(rs: list[dict], key) -> str:
    v = np.array([key(r) for r in rs], dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return "-"
    return f"{np.mean(v):.3g} ± {np.std(v):.2g}" if v.size > 1 else f"{v[0]:.3g}"


# issue 13's targets: (label, runs it is the mean over, metric key, bound)
TARGETS = (
    ("all 20 shapes, noiseless: mean CD-L2 (um^2)",
     lambda r: r["part"] == "shapes" and r["snr"] is None, "cd_l2", 3.0),
    ("all 20 shapes, noiseless: mean BadEdge %",
     lambda r: r["part"] == "shapes" and r["snr"] is None, "bad_edge_pct", 10.0),
    ("default torus, SNR 50 (plain misfit, every seed): mean CD-L2 (um^2)",
     lambda r: r["part"] == "noise" and r["snr"] == 50.0 and r["misfit"] == "plain",
     "cd_l2", 3.0),
    ("default torus, SNR 50 (plain misfit, every seed): mean BadEdge %",
     lambda r: r["part"] == "noise" and r["snr"] == 50.0 and r["misfit"] == "plain",
     "bad_edge_pct", 10.0),
)


def conforming_section(saved: list[dict]) -> list[str]:
    """The same shapes with targets from the 3x-refined grid and from the conforming mesh."""
    conf = {r["shape"]: r for r in saved if r["part"] == "conforming"}
    fine = {r["shape"]: r for r in saved if r["part"] == "smooth"}
    rows = [[shape, fmt(fine[shape].get("cd_l2_analytic")), fmt(r.get("cd_l2_analytic")),
             fmt(fine[shape]["metrics"]["bad_edge_pct"]), fmt(r["metrics"]["bad_edge_pct"])]
            for shape, r in sorted(conf.items()) if shape in fine]
    if not rows:
        return []
    return ["### Refined-grid and conforming targets compared\n",
            "The same inversion of the same shape; only where its targets come from differs: "
            "the paper grid refined 3x with the membrane re-resolved on the shape (a finer "
            "staircase) or a conforming mesh whose membrane triangulates the surface itself.\n",
            markdown_table(["shape", "CD-L2 to the analytic surface, refined-grid targets",
                            "the same, conforming targets", "BadEdge %, refined",
                            "BadEdge %, conforming"], rows), ""]


def weights_section(saved: list[dict]) -> list[str]:
    """Markdown lines: the manifold weight re-checked, per shape and as means over the shapes
    run at every weight (the default weight's runs are the noiseless shapes part's)."""
    alt = [r for r in saved if r["part"] == "weights"]
    if not alt:
        return []
    base = {r["shape"]: r for r in saved if r["part"] == "shapes" and r["snr"] is None}
    by_w: dict = {DEFAULT_MANIFOLD_WEIGHT: base}
    for r in alt:
        by_w.setdefault(r["manifold_weight"], {})[r["shape"]] = r
    weights = sorted(by_w)
    shapes = sorted({r["shape"] for r in alt})
    rows, common = [], [s for s in shapes if all(s in by_w[w] for w in weights)]
    for shape in shapes:
        rows.append([shape] + [f"{fmt(by_w[w][shape]['metrics']['cd_l2'])} / "
                               f"{by_w[w][shape]['metrics']['bad_edge_pct']:.1f}"
                               if shape in by_w[w] else "..." for w in weights])
    if common:
        rows.append([f"**mean over {len(common)}**"] + [
            f"**{np.mean([by_w[w][s]['metrics']['cd_l2'] for s in common]):.3g} / "
            f"{np.mean([by_w[w][s]['metrics']['bad_edge_pct'] for s in common]):.1f}**"
            for w in weights])
    return ["## The manifold weight re-checked (noiseless, CD-L2 um^2 / BadEdge %)\n",
            markdown_table(["shape"] + [f"weight {w:g}" + (" (default)" if
                                        w == DEFAULT_MANIFOLD_WEIGHT else "")
                                        for w in weights], rows), ""]


def joint_section(saved: list[dict]) -> list[str]:
    """Markdown lines: the joint-fourth-stage probe against the default run of the same shape
    (the noiseless `shapes` run, or the `smooth` run for a smooth truth)."""
    probe = [r for r in saved if r["part"] == "joint"]
    if not probe:
        return []
    base = {r["shape"]: r for r in saved if r["snr"] is None and r["part"] in ("shapes",
                                                                                "smooth")}

    def score(r):
        m = r["metrics"]
        return f"{fmt(m['cd_l2'])} / {m['bad_edge_pct']:.1f}"

    rows, pairs = [], []
    for r in probe:
        b = base.get(r["shape"])
        h = r.get("history") or {}
        stage = np.asarray(h.get("stage", []))
        at = np.flatnonzero(stage == 2)
        third = (f"{h['cd_l2'][at[-1]]:.3g} / {h['bad_edge_pct'][at[-1]]:.1f}"
                 if at.size else "-")
        rows.append([r["shape"], score(b) if b else "...", third, score(r),
                     f"{fmt(b.get('cd_l2_analytic'))} -> {fmt(r.get('cd_l2_analytic'))}"
                     if b and r.get("cd_l2_analytic") is not None else "-",
                     ", ".join(f"{k} {v:.2g}" for k, v in r["misfit_per_sequence"].items()),
                     fmt_seconds(r["seconds"])])
        if b:
            pairs.append((b["metrics"]["cd_l2"], r["metrics"]["cd_l2"],
                          b["metrics"]["bad_edge_pct"], r["metrics"]["bad_edge_pct"]))
    text = ["## Probe: a joint fourth stage (all three sequences, manifold weight "
            f"{JOINT_MANIFOLD_WEIGHT:g})\n",
            "CD-L2 (um^2) / BadEdge % against the grid's truth: the default run, this run "
            "after its first three stages (the default's stages, ramp unchanged), and at its "
            "end; for smooth truths also CD-L2 to the analytic surface (default -> joint).\n",
            markdown_table(["shape", "default", "after 3 stages", "joint 4th stage",
                            "CD-L2 to the analytic surface", "final misfit per sequence",
                            "wall"], rows), ""]
    if pairs:
        v = np.array(pairs)
        text += [f"Means over {len(v)} shapes: default {v[:, 0].mean():.3g} / "
                 f"{v[:, 2].mean():.3g} %, joint fourth stage {v[:, 1].mean():.3g} / "
                 f"{v[:, 3].mean():.3g} %.", ""]
    return text


def forgetting_section(saved: list[dict]) -> list[str]:
    """Markdown lines: for every noiseless run, each sequence's misfit at the end of its own
    stage and at the end of the run. On same-grid targets the truth fits every sequence
    exactly (J = 0), so a sequence fitted to 1e-2 in its stage and at 1-40 at the end shows
    what the staged curriculum gives up: each stage fits its own sequence alone, and a kappa
    that fits one sequence need not fit the others (the data of one sequence do not determine
    the layout)."""
    rows, ratios, names = [], [], None
    for r in saved:
        h, stages_ = r.get("history") or {}, r.get("stages") or []
        if r["snr"] is not None or r["part"] not in ("shapes", "smooth") or not stages_:
            continue
        stage = np.asarray(h.get("stage", []))
        misfit = np.asarray(h.get("misfit", []), dtype=float)
        final = r.get("misfit_per_sequence", {})
        cells = []
        for k, group in enumerate(stages_):
            at = np.flatnonzero(stage == k)
            if len(group) != 1 or not at.size or group[0] not in final:
                cells.append("-")
                continue
            own, end = float(misfit[at[-1]]), float(final[group[0]])
            cells.append(f"{own:.2g} -> {end:.2g}")
            if k < len(stages_) - 1 and own > 0:
                ratios.append(end / own)
        names = names or [" + ".join(g) for g in stages_]
        cd = np.asarray(h.get("cd_l2", []), dtype=float)
        after = " / ".join(f"{cd[np.flatnonzero(stage == k)[-1]]:.2g}"
                           for k in range(len(stages_)) if (stage == k).any())
        rows.append([r["shape"], r["part"], *cells, after])
    if not rows:
        return []
    return ["## What each stage leaves of the earlier ones (noiseless runs)\n",
            "Misfit J of each sequence at the end of its own stage -> at the end of the run "
            "(stages in curriculum order). The ground truth fits every sequence of a "
            "same-grid target to J = 0 (`shapes`); the earlier sequences end "
            f"{np.median(ratios):.0f}x (median over {len(ratios)}) above what their own stage "
            "reached, so the final kappa fits the last sequence only. Two things follow: (1) "
            "one sequence alone does not determine the layout: each stage fits its own "
            "sequence to J ~ 1e-2 while CD-L2 after that stage (last column, against the "
            "grid's truth) is still several um^2, and the later stages, each fitting its "
            "sequence alone, improve the layout only partly; (2) part of the long-sequence "
            "misfit is the barrier's permeability, not its place (docs/curriculum.md: the "
            "paper sphere ends on exactly its true faces with membrane kappa 0.025 instead "
            "of 0.01 um/ms). Whether a final "
            "stage that fits every sequence jointly also fixes the layout is what the `joint` "
            "part measures (its section below, where run).\n",
            markdown_table(["shape", "part", *names,
                            "CD-L2 after each stage (um^2)"], rows), ""]


def targets_section(saved: list[dict]) -> list[str]:
    """Markdown lines: each issue target, the measured mean (and worst run) over the runs saved
    so far, and whether it is met or by how much it is missed."""
    rows = []
    for label, select, key, bound in TARGETS:
        v = np.array([r["metrics"][key] for r in saved if select(r)], dtype=float)
        if not v.size:
            rows.append([label, f"<= {bound:g}", "-", "-", "0", "not run yet"])
            continue
        mean = float(np.mean(v))
        verdict = ("met" if mean <= bound else
                   f"missed by {mean - bound:.3g} ({100 * (mean / bound - 1):.0f} %)")
        rows.append([label, f"<= {bound:g}", f"{mean:.3g}", f"{np.max(v):.3g}", str(v.size),
                     verdict])
    return ["## Targets (issue 13)\n",
            markdown_table(["target", "bound", "mean", "worst run", "runs", "verdict"], rows),
            "", "A mean over fewer runs than the target names is provisional.", ""]


def report(out: Path) -> None:
    folder = out / "robustness"
    saved = []
    for p in sorted(folder.glob("*__*.json")):
        r = json.loads(p.read_text())
        if "part" not in r:         # another process (--shard) has not labelled it yet
            continue
        if "face_sides" not in r:
            r["cd_l2_analytic"] = analytic_cd(r)
            r["cd_l2_analytic_grid_truth"] = analytic_cd(r, truth=True)
            r["face_sides"] = sides(r)
            atomic_write_text(p, json.dumps(r, indent=1) + "\n")
        saved.append(r)
    if not saved:
        return
    text = ["# Robustness of the default method\n",
            "`python -m experiments.robustness` (see its docstring): the default example's "
            "method on the paper grid (n = 4), every shape with the same settings. Wall time "
            "of the inversion alone on the shared 2-core machine. CD-L2 is measured against "
            "the inversion grid's own truth (its faces on the shape, as the paper scores); "
            "against the analytic surface (marched at 0.5 um) both the reconstruction and that "
            "staircase truth are scored, so that the two can be compared: on the n = 4 grid "
            "the staircase of a smooth shape is itself tens of um^2 from the surface.\n"]
    for part, title in (("smooth", "Smooth truths (targets on a refined grid, noiseless)"),
                        ("conforming", "Smooth truths on conforming meshes (targets simulated "
                                       "on a gmsh mesh of the paper grid's domain whose "
                                       "membrane is the shape's surface, noiseless)"),
                        ("noise", "Rician noise, the default torus"),
                        ("shapes", "All 20 paper ground truths")):
        rs = [r for r in saved if r["part"] == part]
        if not rs:
            continue
        text += [f"## {title}\n", markdown_table(HEADER, [_row(r) for r in rs]), ""]
        groups: dict = {}
        for r in rs:
            groups.setdefault((r["snr"], r["misfit"]), []).append(r)
        summary = [["-" if snr is None else f"{snr:g}", misfit, len(g),
                    _mean_spread(g, lambda r: r["metrics"]["cd_l2"]),
                    _mean_spread(g, lambda r: r["metrics"]["bad_edge_pct"])]
                   for (snr, misfit), g in sorted(groups.items(),
                                                  key=lambda kv: (kv[0][0] or 1e9, kv[0][1]))]
        text += ["Mean ± standard deviation per condition:\n",
                 markdown_table(["SNR", "misfit", "runs", "CD-L2 (um^2)", "BadEdge %"],
                                summary), ""]
        if part == "conforming":
            text += conforming_section(saved)
    text += weights_section(saved)
    text += forgetting_section(saved)
    text += joint_section(saved)
    text += targets_section(saved)
    atomic_write_text(out / "robustness.md", "\n".join(text) + "\n")
    # a few reconstructions to look at: the smooth truths, one noisy torus per SNR, and the
    # best and the worst of the noiseless paper shapes
    shown = ([r for r in saved if r["part"] == "smooth"]
             + [r for r in saved if r["part"] == "conforming"])
    shown += list({r["snr"]: r for r in saved if r["part"] == "noise"
                   and r["misfit"] == "plain" and r["seed"] == 0}.values())[:3]
    clean = sorted((r for r in saved if r["part"] == "shapes" and r["snr"] is None),
                   key=lambda r: r["metrics"]["cd_l2"])
    shown += clean[:1] + clean[1:][-1:]
    if shown:
        plot_reconstructions(shown[:12], out / "robustness_surfaces.png")
    noisy = [r for r in saved if r["part"] == "noise"]
    if noisy:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for misfit in MISFITS:
            rs = [r for r in noisy if r["misfit"] == misfit]
            if not rs:
                continue
            shift = 0.96 if misfit == "plain" else 1.04     # side by side at each SNR
            for ax, key in zip(axes, ("cd_l2", "bad_edge_pct"), strict=True):
                ax.plot([r["snr"] * shift for r in rs], [r["metrics"][key] for r in rs], "o",
                        alpha=0.6, label=f"{misfit} misfit (each seed)")
                means = {snr: np.mean([r["metrics"][key] for r in rs if r["snr"] == snr])
                         for snr in sorted({r["snr"] for r in rs})}
                ax.plot([v * shift for v in means], list(means.values()), "_", ms=14, mew=2,
                        color=ax.lines[-1].get_color())
        for ax, name, bound in zip(axes, ("CD-L2 (um^2)", "BadEdge (%)"), (3.0, 10.0),
                                   strict=True):
            ax.axhline(bound, color="k", ls="--", lw=0.8, label="issue 13 target (SNR 50)")
            ax.set_xscale("log")
            ax.set_xlim(15.0, 130.0)
            ax.set_xticks([20, 50, 100], labels=["20", "50", "100"])
            ax.minorticks_off()
            ax.set_xlabel("SNR (S0 = 1)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("default torus with Rician noise (bars: means over the seeds)")
        fig.tight_layout()
        save_figure(fig, out / "robustness.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=PARTS)
    p.add_argument("--match", default=None, metavar="REGEX",
                   help="only the runs whose label matches REGEX (re.search)")
    p.add_argument("--snr", type=float, nargs="+", default=[100.0, 50.0, 20.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--refine", type=int, default=3)
    p.add_argument("--meshes", type=int, default=20,
                   help="shapes and weights parts: the first N paper ground truths (list order)")
    p.add_argument("--manifold-weights", type=float, nargs="+", default=[2.0, 8.0],
                   help="weights part: manifold weights compared with the default 4")
    p.add_argument("--iterations", type=int, default=200, help="per stage (three stages)")
    p.add_argument("--max-modes", type=int, default=120)
    p.add_argument("--reference-max-modes", type=int, default=500)
    p.add_argument("--directions", type=int, default=30)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--shard", default="0/1", metavar="I/K",
                   help="run only every K-th of the selected runs starting at I (0-based): "
                        "K independent processes sharing --out, e.g. one per core")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    try:
        shard, shards = (int(v) for v in a.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        p.error(f"--shard: expected I/K with 0 <= I < K, got {a.shard!r}")
    comm = mpi_comm()
    settings = Settings(iterations=a.iterations, max_modes=a.max_modes,
                        reference_max_modes=a.reference_max_modes, directions=a.directions)
    folder = a.out / "robustness"
    selected = runs(a.parts, settings, a.snr, a.seeds, a.refine, a.meshes,
                    a.manifold_weights, conforming_dir=folder / "conforming")
    if a.match is not None:
        selected = [run for run in selected if re.search(a.match, run[0])]
    selected = selected[shard::shards]
    unmeshed = [label for label, text, desc in selected if desc["part"] == "conforming"
                and not conforming_paths(folder / "conforming", desc["shape"])[0].exists()
                and saved_run(folder / f"{label}.json", text, settings, quiet=True) is None]
    if unmeshed:
        try:
            import gmsh  # noqa: F401
        except ImportError:
            say(comm, f"error: {', '.join(unmeshed)} need(s) gmsh to mesh the conforming "
                      "targets: pip install gmsh (or leave the part out: --parts smooth noise "
                      "shapes weights)")
            return 2
    for label, text, desc in selected:
        say(comm, f"== {label}")
        if desc["part"] == "conforming":
            saved = (saved_run(folder / f"{label}.json", text, settings, quiet=True)
                     if comm.rank == 0 else None)
            if comm.bcast(saved is None, root=0):
                make_conforming_target(comm, desc["shape"], text, settings,
                                       folder / "conforming")
        res = cached_run(comm, folder / f"{label}.json", text, settings, label,
                         log=iteration_logger(comm, a.log_every))
        if comm.rank == 0:
            path = folder / f"{label}.json"
            saved = json.loads(path.read_text())
            if "part" not in saved:
                atomic_write_text(path, json.dumps(dict(saved, **desc), indent=1) + "\n")
            report(a.out)
            m = res["metrics"]
            print(f"{label}: CD-L2 {m['cd_l2']:.3f} um^2, BadEdge {m['bad_edge_pct']:.1f} %",
                  flush=True)
        comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
