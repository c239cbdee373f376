"""The run configuration as frozen dataclasses: what each TOML section holds, with units in the
field names (um, ms, um/ms, um^2/ms, s/mm^2). Reading and checking the TOML is
`config.reader`; the file format is documented in docs/configuration.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spinverse_fem.config.protocol import Sequence

# -- dataclasses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridConfig:
    """[grid]. kind "bcc": `cubes` (>= 2) cubes of side `cube_um` per axis centred at
    `center_um` (the paper's grid); "box": structured box [lower_um, upper_um] with `cells`
    (nx, ny, nz); "file": tetrahedral grid read from `path`, optional `membrane_tag`."""

    kind: str
    cubes: int | None = None
    cube_um: float | None = None
    center_um: tuple[float, float, float] | None = None
    lower_um: tuple[float, float, float] | None = None
    upper_um: tuple[float, float, float] | None = None
    cells: tuple[int, int, int] | None = None
    path: Path | None = None
    membrane_tag: int | None = None


@dataclass(frozen=True)
class GeometryConfig:
    """[geometry]: the ground-truth membrane. Fields unused by `kind` are None.

    plane:     axis (unit 3-vector; "x"/"y"/"z" accepted), position_um (plane x . axis = position).
    sphere:    center_um, radius_um.
    cylinder:  center_um, axis, radius_um, height_um (None = crosses the whole grid).
    torus:     center_um, axis, major_radius_um, minor_radius_um (< major).
    bent_axon: radius_um and either (segments, seed) or control_points_um ((k, 3), k >= 2).
    two_axons: radius_um, seed.
    The analytic kinds above also take inside_rule: a tet is inside the shape when all 4 of
    its vertices are ("vertices", default; reproduces the paper's analytic shapes) or when its
    centroid is ("centroid"; the paper's bent axons).
    paper:     path to a paper ground-truth .npz.
    file_tags: membranes tagged in the grid file (needs grid.kind = "file").
    none:      no membrane.
    """

    kind: str
    axis: tuple[float, float, float] | None = None
    position_um: float | None = None
    center_um: tuple[float, float, float] | None = None
    radius_um: float | None = None
    height_um: float | None = None
    major_radius_um: float | None = None
    minor_radius_um: float | None = None
    segments: int | None = None
    seed: int | None = None
    control_points_um: tuple[tuple[float, float, float], ...] | None = None
    path: Path | None = None
    inside_rule: str = "vertices"


@dataclass(frozen=True)
class PermeabilityConfig:
    """[permeability] in um/ms. outer = "neumann" (no flux through the grid boundary) or
    "robin" (outer faces get open_um_per_ms unless they are membrane faces)."""

    barrier_um_per_ms: float
    open_um_per_ms: float
    outer: str = "neumann"


@dataclass(frozen=True)
class PhysicsConfig:
    """[physics]: diffusivity (um^2/ms), optional T2 (ms; None = no relaxation)."""

    diffusivity_um2_per_ms: float = 2.0
    t2_ms: float | None = None


@dataclass(frozen=True)
class EigenConfig:
    """[eigen]: keep modes with lambda <= D pi^2 / length_scale_um^2, at most max_modes;
    num_modes (if set) asks for a fixed count instead of the length scale."""

    length_scale_um: float = 2.0
    max_modes: int = 500
    num_modes: int | None = None
    tolerance: float = 1e-10


@dataclass(frozen=True)
class FullOrderConfig:
    """[full_order]: Crank-Nicolson reference solver time step (ms)."""

    time_step_ms: float = 0.05


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: indices into Config.sequences fitted jointly for `iterations`."""

    sequences: tuple[int, ...]
    iterations: int
    continuity_weight: float
    manifold_weight: float


@dataclass(frozen=True)
class InversionConfig:
    """[inversion]; defaults follow the paper (kappa in um/ms).

    curriculum: "staged" (long-Delta sequence, then the shorter one), "split" (both jointly,
    same number of stages), "long_to_short" (every sequence, one stage each, longest diffusion
    time first), "custom" (stages from [[inversion.stage]], kept in `custom_stages`).
    normalisation: "reference" (divide predictions by the reference b = 0 signal) or "own".
    checkpoint_every: iterations between checkpoints (0 = none).
    adam_restart_per_stage: Adam starts every stage with fresh moment estimates (and its
    warm-up), since each stage fits a different objective; false keeps them across stages.
    """

    kappa_min_um_per_ms: float = 0.01
    kappa_max_um_per_ms: float = 100.0
    start_um_per_ms: float = 1.0
    threshold_um_per_ms: float = 1.0
    optimizer: str = "blmvm"
    misfit_weight: float = 100.0
    normalisation: str = "reference"
    curriculum: str = "staged"
    iterations_per_stage: int = 200
    continuity_weight: float = 2.0
    manifold_weight: float = 2.0
    adam_lr: float = 0.6
    adam_warmup: int = 50
    adam_final_lr_factor: float = 0.1
    clip_grad_norm: float = 1.0
    adam_restart_per_stage: bool = True
    checkpoint_every: int = 10
    custom_stages: tuple[Stage, ...] = ()


@dataclass(frozen=True)
class TargetConfig:
    """[target]: measured signals `file` (HDF5; None = simulate from the geometry), Rician noise
    at `noise_snr` (None = noiseless) with `seed`, reference simulated on a grid refined
    `grid_refinement` times (None = same grid)."""

    file: Path | None = None
    noise_snr: float | None = None
    seed: int = 0
    grid_refinement: int | None = None


@dataclass(frozen=True)
class Config:
    """A whole run configuration. `text` is the raw TOML, `source` the file it came from."""

    source: str
    text: str
    grid: GridConfig
    geometry: GeometryConfig
    permeability: PermeabilityConfig
    physics: PhysicsConfig
    eigen: EigenConfig
    full_order: FullOrderConfig
    sequences: tuple[Sequence, ...]
    inversion: InversionConfig
    target: TargetConfig | None

    def sequence_index(self, name: str) -> int:
        """Index of the sequence called `name` (KeyError if none)."""
        for i, s in enumerate(self.sequences):
            if s.name == name:
                return i
        raise KeyError(f"no sequence named {name!r}; have {[s.name for s in self.sequences]}")
