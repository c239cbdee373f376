"""Shared pieces of the experiment scripts (the Spinverse paper's study on the n = 4 grid).

- the paper's run configuration as TOML text (grid, physics, three PGSE sequences, inversion),
  with the geometry block of one ground truth filled in (see dataset.py);
- one inversion run in-process on any number of MPI ranks (`run_case`), returning a JSON-able
  summary: final interface metrics, final misfits re-evaluated at the final kappa, the history;
- resume-friendly caching of finished runs (one JSON per run, rank 0 writes), atomic writes,
  markdown tables and the common command-line options (`--check-cache` lists the saved runs).

experiments/ is a package: run its scripts from the repository root as modules,
`python -m experiments.<script>` (under MPI: `mpiexec -n 2 python -m experiments.<script>`).

Saved runs are portable between checkouts: the paper's ground-truth files appear in them as
`<paper_meshes>/<file>.npz` (relative to the paper-mesh folder, see `portable_config`), never
as an absolute path.

Everything written to disk is written by rank 0 only; every rank runs every inversion (the
forward model is distributed), so all ranks must make the same decisions: rank 0 decides and
broadcasts.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spinverse_fem.io.atomic import save_figure_atomic, write_text_atomic

EXPERIMENTS = Path(__file__).resolve().parent
ROOT = EXPERIMENTS.parent
RESULTS = EXPERIMENTS / "results"

PAPER_CUBES = 4
PAPER_CUBE_UM = 20.0 / 3.0
# The paper's protocol: three PGSE sequences (delta/Delta in ms), b = 0..5000 s/mm^2, 30
# Fibonacci directions. 5/6 ms is simulated but unused by both curricula (as in the paper).
PAPER_SEQUENCES = (("5/6", 5.0, 6.0), ("10/20", 10.0, 20.0), ("10/60", 10.0, 60.0))
PAPER_B = (0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0)
CURRICULUM_SEQUENCES = ("10/60", "10/20")
# Keys of Inversion.history kept in the run summaries (all of them).
# Bumped when the optimiser's behaviour changes for the same configuration text, so that saved
# runs made by older code are run again: 2 = Adam restarts its moments at stage switches.
CODE_VERSION = 2
HISTORY_KEYS = ("stage", "iteration", "misfit", "continuity", "manifold", "total",
                "manifold_weight", "cd_l2", "bad_edge_pct", "interface_faces", "seconds")


# -- settings and configuration text -------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What a run depends on besides the ground truth and the prior weights."""

    iterations: int = 200           # per stage (two stages)
    optimizer: str = "adam"
    max_modes: int = 120            # eigenbasis cap of the inversion (paper: 500)
    reference_max_modes: int = 500  # eigenbasis cap of the simulated targets (paper: 500)
    directions: int = 30            # Fibonacci directions per b value (paper: 30)

    def as_dict(self) -> dict:
        return asdict(self)


def add_common_arguments(p: argparse.ArgumentParser, default_out: Path) -> None:
    p.add_argument("--iterations", type=int, default=200,
                   help="iterations per stage (two stages; paper: 200)")
    p.add_argument("--out", type=Path, default=default_out,
                   help=f"output directory (default: {default_out.relative_to(ROOT)})")
    p.add_argument("--optimizer", default="adam", choices=["adam", "blmvm"],
                   help="adam (the paper's; default) or blmvm (PETSc TAO, bounded L-BFGS)")
    p.add_argument("--max-modes", type=int, default=120,
                   help="eigenbasis cap during the inversion (default 120, measured ~1-1.6 s per "
                        "iteration on the paper grid; the paper allows 500, slower)")
    p.add_argument("--reference-max-modes", type=int, default=500,
                   help="eigenbasis cap when simulating the targets (default 500, the paper's)")
    p.add_argument("--directions", type=int, default=30,
                   help="Fibonacci gradient directions per b value (paper: 30; fewer = faster "
                        "smoke tests)")
    p.add_argument("--source", default="paper", choices=["paper", "generated"],
                   help="ground truths: the paper's .npz files (default) or our regenerated set")
    p.add_argument("--log-every", type=int, default=10,
                   help="print every N-th iteration line (default 10; 1 = all)")
    p.add_argument("--check-cache", action="store_true",
                   help="run nothing: list which of the runs these options select are saved in "
                        "OUT (and would be reused); exit code 1 if any is not")


def settings_from_args(args) -> Settings:
    if args.iterations < 1:
        raise SystemExit("--iterations must be >= 1")
    if args.max_modes < 1 or args.reference_max_modes < 1 or args.directions < 1:
        raise SystemExit("--max-modes, --reference-max-modes and --directions must be >= 1")
    return Settings(iterations=args.iterations, optimizer=args.optimizer,
                    max_modes=args.max_modes, reference_max_modes=args.reference_max_modes,
                    directions=args.directions)


def toml_string(s) -> str:
    """A TOML basic string (JSON string syntax is a subset for ordinary paths)."""
    return json.dumps(str(s))


def toml_vector(v) -> str:
    return "[" + ", ".join(repr(float(x)) for x in v) + "]"


# The configuration text of a run names the paper's ground-truth file by absolute path (run_case
# parses it relative to the working directory). Saved runs name it relative to the paper-mesh
# folder ($SPINVERSE_PAPER_MESHES, default <repo>/../shared/data/paper_meshes) behind this token
# instead, so that a results folder stays valid in another checkout or with the data elsewhere.
PAPER_MESHES_TOKEN = "<paper_meshes>"
_PATH_LINE = re.compile(r'^(path\s*=\s*)("(?:[^"\\]|\\.)*")[ \t]*$', re.MULTILINE)


def _paper_meshes_dir() -> Path | None:
    """The paper-mesh folder, resolved; None if it does not exist."""
    from spinverse_fem.errors import InputError
    from spinverse_fem.meshes.paper import paper_meshes_dir

    try:
        return paper_meshes_dir().resolve()
    except InputError:
        return None


def portable_config(cfg_text: str) -> str:
    """cfg_text with each `path = "<paper-mesh folder>/F.npz"` line written as
    `path = "<paper_meshes>/F.npz"`; other paths (and texts without paths) unchanged."""
    folder = None

    def sub(m: re.Match) -> str:
        nonlocal folder
        p = Path(json.loads(m[2]))
        if not p.is_absolute():
            return m[0]
        folder = folder or _paper_meshes_dir()
        if folder is None or p.resolve().parent != folder:
            return m[0]
        return m[1] + toml_string(f"{PAPER_MESHES_TOKEN}/{p.name}")

    return _PATH_LINE.sub(sub, cfg_text)


def runnable_config(cfg_text: str) -> str:
    """The inverse of portable_config: `<paper_meshes>/F.npz` -> the absolute path of F in this
    machine's paper-mesh folder (e.g. to rerun the configuration saved with a run)."""
    if f'"{PAPER_MESHES_TOKEN}/' not in cfg_text:
        return cfg_text
    folder = _paper_meshes_dir()
    if folder is None:
        raise FileNotFoundError("paper meshes folder not found; set $SPINVERSE_PAPER_MESHES")
    return cfg_text.replace(f'"{PAPER_MESHES_TOKEN}/', f'"{folder.as_posix()}/')


def paper_config_text(geometry_toml: str, settings: Settings, *, curriculum: str = "staged",
                      continuity_weight: float = 2.0, manifold_weight: float = 2.0) -> str:
    """The paper's run configuration (TOML) for one ground truth.

    geometry_toml: a complete [geometry] table (dataset.GroundTruth.geometry_toml).
    Adam follows the paper (lr 0.6, cosine decay to 0.1x, clip 1.0) with a 50-iteration
    warm-up, shortened to a quarter of the stage for stages under 200 iterations.
    """
    warmup = min(50, settings.iterations // 4)
    seqs = "".join(
        f'\n[[sequence]]\ntype = "pgse"\nname = "{name}"\ndelta_ms = {d!r}\nDelta_ms = {D!r}\n'
        f"b_s_per_mm2 = {toml_vector(PAPER_B)}\nfibonacci = {settings.directions}\n"
        for name, d, D in PAPER_SEQUENCES)
    return (
        "# Spinverse paper set-up (experiments/common.py): bcc n = 4 grid, a = 20/3 um\n"
        f"[grid]\nkind = \"bcc\"\ncubes = {PAPER_CUBES}\ncube_um = {PAPER_CUBE_UM!r}\n"
        "center_um = [0.0, 0.0, 0.0]\n\n"
        f"{geometry_toml.strip()}\n\n"
        "[permeability]\nbarrier_um_per_ms = 0.01\nopen_um_per_ms = 100.0\nouter = \"robin\"\n\n"
        "[physics]\ndiffusivity_um2_per_ms = 2.0\n\n"
        f"[eigen]\nlength_scale_um = 2.0\nmax_modes = {settings.max_modes}\n"
        f"{seqs}\n"
        f"[inversion]\noptimizer = \"{settings.optimizer}\"\ncurriculum = \"{curriculum}\"\n"
        f"iterations_per_stage = {settings.iterations}\n"
        f"continuity_weight = {float(continuity_weight)!r}\n"
        f"manifold_weight = {float(manifold_weight)!r}\n"
        f"adam_warmup = {warmup}\ncheckpoint_every = 10\n")


# -- MPI, logging, files -------------------------------------------------------------------------

#: The box of the paper's grid (um); the default example's bcc grid has 4 cubes per side.
BOX_UM = 80.0 / 3.0


def default_config_text(geometry_toml: str, settings: Settings, header: str, *,
                        cubes: int | None = None, curriculum: str | None = None,
                        inversion_lines: str = "", target_lines: str = "") -> str:
    """The default method (examples/paper_torus.toml: three PGSE sequences, long_to_short,
    Adam, manifold weight 4, the mode rule with its cap) for another ground truth, as TOML:
    its [geometry] table replaced, the mode cap, directions and iterations from `settings`;
    cubes: another bcc grid of the same box; curriculum: another preset; inversion_lines
    (each ending in a newline) added to [inversion]; target_lines: the body of a [target]
    table. header: the first (comment) line."""
    text = (ROOT / "examples" / "paper_torus.toml").read_text()
    if cubes is not None:
        text = re.sub(r"(?m)^cubes = .*$", f"cubes = {cubes}", text, count=1)
        text = re.sub(r"(?m)^cube_um = .*$", f"cube_um = {BOX_UM / cubes!r}", text, count=1)
    text = re.sub(r"(?ms)^\[geometry\]\n.*?(?=^\[)", geometry_toml.rstrip("\n") + "\n\n", text,
                  count=1)
    text = re.sub(r"(?m)^max_modes = .*$", f"max_modes = {settings.max_modes}", text, count=1)
    text = re.sub(r"(?m)^fibonacci = .*$", f"fibonacci = {settings.directions}", text)
    if curriculum is not None:
        text = re.sub(r'(?m)^curriculum = .*$', f'curriculum = "{curriculum}"', text, count=1)
    text = text.replace("[inversion]\n", f"[inversion]\niterations_per_stage = "
                                         f"{settings.iterations}\n{inversion_lines}", 1)
    return (f"# {header}\n" + text + (f"\n[target]\n{target_lines}" if target_lines else ""))


def mpi_comm():
    import dolfinx_solver  # noqa: F401  (PETSc/dolfinx set-up before mpi4py use)
    from mpi4py import MPI

    return MPI.COMM_WORLD


def say(comm, *args) -> None:
    if comm.rank == 0:
        print(*args, flush=True)


_IT = re.compile(r"\bit +(\d+)\b")


def iteration_logger(comm, every: int, prefix: str = ""):
    """A log callable for Inversion: stage lines always, iteration lines every `every`."""
    every = max(int(every), 1)

    def log(line: str) -> None:
        m = _IT.search(line)
        if m is None or int(m.group(1)) % every == 0:
            say(comm, prefix + line)

    return log


def atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def save_figure(fig, path: Path) -> None:
    save_figure_atomic(fig, path, dpi=120)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(plt, fig, axes, title: str, path: Path) -> None:
    """Grid on every axis, legend on the first, title; save atomically and close."""
    for a in axes:
        a.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.{digits}f}"


def fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


# -- one inversion -------------------------------------------------------------------------------

def _misfit_value(signals, targets, weight: float) -> float:
    """The paper's misfit: weight x mean over measurements of |S/S0_ref - T|^2."""
    r = np.concatenate([np.abs(np.asarray(s) - np.asarray(t)) ** 2
                        for s, t in zip(signals, targets)])
    return float(weight * r.mean())


def run_case(comm, cfg_text: str, settings: Settings, label: str, log=None) -> dict:
    """Simulate the targets of the configured ground truth (on the grid refined by [target]
    grid_refinement when set, with [target] noise_snr Rician noise), or read them from the
    [target] file when one is named, and invert them (all ranks).

    Returns (identical on every rank) a JSON-able dict: label, settings, config, final metrics
    of the interface at the final kappa (cd_l2, bad_edge_pct, open_pct, branch_pct, iou,
    precision, recall, num_pred_faces, num_true_faces, ...), final misfits at the final kappa
    with the last stage's mode count: `misfit_last_stage` (what the last stage fits),
    `misfit_joint` (10/60 + 10/20 together) and `misfit_per_sequence`; modes per stage,
    iterations, seconds (inversion wall time), seconds_total (with set-up), final_log10_kappa
    (every face, canonical order: for re-scoring) and history
    (Inversion.history plus a final row at iteration = total iterations with the final
    cd_l2 / bad_edge_pct / interface_faces and the last-stage misfit).
    """
    from dataclasses import replace

    from spinverse_fem.config import parse_config
    from spinverse_fem.evaluation.scoring import score
    from spinverse_fem.forward.synthetic import simulate_targets
    from spinverse_fem.inverse.case import Case, Targets
    from spinverse_fem.inverse.driver import Inversion

    log = log or (lambda s: say(comm, s))
    t0 = time.perf_counter()
    cfg = parse_config(cfg_text, source=f"<{label}>")
    ref_cfg = replace(cfg, eigen=replace(cfg.eigen, max_modes=settings.reference_max_modes))
    # a [target] grid_refinement simulates the targets on a finer grid (no inverse crime)
    refine = cfg.target.grid_refinement if cfg.target and cfg.target.grid_refinement else 1
    if cfg.target and cfg.target.file:
        # a [target] file (e.g. signals simulated on a conforming mesh) is read as it is
        case = Case(comm, cfg)
        targets = case.targets.signals
        log(f"  targets read from {cfg.target.file}; inverting")
    else:
        log(f"  simulating the targets on the grid refined {refine}x (up to "
            f"{settings.reference_max_modes} modes) ...")
        # and a [target] noise_snr adds Rician noise (seeded) to them
        snr = cfg.target.noise_snr if cfg.target else None
        targets, s0, ref_phantom = simulate_targets(comm, ref_cfg, refine, snr,
                                                    cfg.target.seed if cfg.target else 0)
        log(f"  targets done ({ref_phantom.grid.num_tets} tets) after "
            f"{time.perf_counter() - t0:.0f} s; inverting")
        case = Case(comm, cfg, targets=Targets(targets, s0, f"simulated ({label})"))
    problem = case.phantom
    threshold = cfg.inversion.threshold_um_per_ms

    def observe(kappa):
        return score(problem, kappa, threshold, case.truth)

    inv = Inversion(case, log=log, observer=observe)
    t1 = time.perf_counter()
    state = inv.run(inv.initial_state())
    t2 = time.perf_counter()
    kappa = inv.kappa(state.x)
    metrics = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
               for k, v in observe(kappa).items() if k != "interface_faces"}
    num_interface = int(observe(kappa)["interface_faces"])

    # final misfits at the final kappa: one forward solve with the last stage's mode count
    run_stages = case.stages
    used = sorted({i for st in run_stages for i in st.sequences})
    mis = case.misfit(used, num_modes=state.modes[-1])
    sig = dict(zip(used, mis.signals(kappa)))
    w = cfg.inversion.misfit_weight
    per_seq = {cfg.sequences[i].name: _misfit_value([sig[i]], [targets[i]], w) for i in used}
    last = run_stages[-1].sequences
    misfit_last = _misfit_value([sig[i] for i in last], [targets[i] for i in last], w)
    misfit_joint = _misfit_value([sig[i] for i in used], [targets[i] for i in used], w)

    history = {k: [float(x) for x in state.history[k]] for k in HISTORY_KEYS}
    final_row = dict(stage=float(len(run_stages) - 1), iteration=float(state.global_iteration),
                     misfit=misfit_last, continuity=np.nan, manifold=np.nan, total=np.nan,
                     manifold_weight=np.nan, cd_l2=metrics.get("cd_l2", np.nan),
                     bad_edge_pct=metrics.get("bad_edge_pct", np.nan),
                     interface_faces=float(num_interface), seconds=t2 - t1)
    for k in HISTORY_KEYS:
        history[k].append(float(final_row[k]))
    return dict(label=label, code_version=CODE_VERSION, settings=settings.as_dict(),
                config=cfg_text, ranks=comm.size, metrics=metrics, interface_faces=num_interface,
                misfit_last_stage=misfit_last, misfit_joint=misfit_joint,
                misfit_per_sequence=per_seq, modes=[int(m) for m in state.modes],
                iterations=int(state.global_iteration), seconds=t2 - t1,
                seconds_total=time.perf_counter() - t0,
                stages=[[cfg.sequences[i].name for i in st.sequences] for st in run_stages],
                history=history, final_log10_kappa=[float(v) for v in np.log10(kappa)])


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def from_json_history(h: dict) -> dict:
    return {k: [np.nan if x is None else float(x) for x in v] for k, v in h.items()}


def cache_status(path: Path, cfg_text: str, settings: Settings) -> tuple[str, dict | None]:
    """(status, saved JSON) of the run saved at `path` for this configuration text and settings.

    status: "saved" (same configuration, settings and code version: reusable), "missing",
    "unreadable (...)", "other configuration", "other settings" or "older code". The
    configuration texts are compared in their portable form (portable_config), so a run saved
    in another checkout, or before paths were made portable, is recognised.
    """
    path = Path(path)
    if not path.exists():
        return "missing", None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})", None
    if portable_config(data.get("config", "")) != portable_config(cfg_text):
        return "other configuration", data
    if data.get("settings") != settings.as_dict():
        return "other settings", data
    if data.get("code_version", 1) != CODE_VERSION:
        return "older code", data
    return "saved", data


def saved_run(path: Path, cfg_text: str, settings: Settings, quiet: bool = False):
    """The run saved at `path` if it holds the same config text, settings and code version,
    else None (call on one rank)."""
    status, data = cache_status(path, cfg_text, settings)
    if status == "saved":
        data["history"] = from_json_history(data["history"])
        return data
    if not quiet and status != "missing":
        print(f"{Path(path).name}: {status}; running again", flush=True)
    return None


def check_cache(comm, runs, settings: Settings) -> int:
    """Report (rank 0) which of `runs`, [(label, JSON path, config text)], are saved for these
    settings and would be reused; runs nothing. Returns 0 if all are, else 1 (an exit code)."""
    missing = 0
    for label, path, cfg_text in runs:
        status, _ = cache_status(path, cfg_text, settings)
        missing += status != "saved"
        shown = Path(path).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        say(comm, f"  {status:<20} {label}  ({shown})")
    say(comm, f"{len(runs) - missing}/{len(runs)} run(s) saved"
              + (f", {missing} would run" if missing else ", nothing would run"))
    return 1 if missing else 0


def cached_run(comm, path: Path, cfg_text: str, settings: Settings, label: str, log=None,
               resume: bool = True) -> dict:
    """run_case, or its saved JSON at `path` if that holds the same config text and settings.

    Rank 0 decides and broadcasts (so every rank runs, or skips, together) and writes the JSON
    atomically when a run finishes: a killed job loses at most the run in progress. The JSON
    holds the configuration text in its portable form (portable_config).
    """
    path = Path(path)
    found = saved_run(path, cfg_text, settings) if comm.rank == 0 and resume else None
    found = comm.bcast(found, root=0)
    if found is not None:
        say(comm, f"{label}: done before ({path}), skipped")
        return found
    res = run_case(comm, cfg_text, settings, label, log=log)
    res = dict(res, config=portable_config(cfg_text))
    if comm.rank == 0:
        atomic_write_text(path, json.dumps(_json_safe(res), indent=1) + "\n")
    comm.Barrier()
    return res


def mark_stage_switches(ax, history: dict, **kw) -> None:
    it = np.asarray(history["iteration"])
    stage = np.asarray(history["stage"])
    for j in np.flatnonzero(np.diff(stage)) + 1:
        ax.axvline(it[j] - 0.5, **({"color": "k", "ls": ":", "lw": 0.8} | kw))
