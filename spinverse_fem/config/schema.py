"""The run configuration as frozen dataclasses: what each TOML section holds, with units in the
field names (um, ms, um/ms, um^2/ms, s/mm^2). Reading and checking the TOML is
`config.reader`; the file format is documented in docs/configuration.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spinverse_fem.config.protocol import Sequence

# -- limits on what a run may ask for ----------------------------------------------------------
#
# The configuration reader refuses, before anything is built, a run that cannot fit in memory or
# a value no tissue has; the messages state the estimate and the limit.
#
# Permeability (um/ms): a face is already transparent when kappa >> D / h (D <= 3 um^2/ms for
# free water at body temperature, h the grid spacing): for any grid coarser than 1 nm that is
# kappa >> 3e3 um/ms, so 1e6 um/ms is "no membrane" with a margin of 300. Larger values only
# worsen the conditioning of the stiffness matrix (its face terms grow like kappa h / D against
# the volume terms) until the eigen-solver's tolerance cannot be met; 1e300 overflows.
MAX_KAPPA_UM_PER_MS = 1.0e6
# Tetrahedra: every rank holds the whole serial grid and face table (points, tets, about two
# faces per tet with their cells and sort temporaries: ~0.5 kB per tet), the distributed mesh
# and the broken-P1 matrices L and M (4 dofs per tet, ~30 nonzeros per row: ~2 kB per tet), and
# MUMPS factorises L - sigma M with 3D fill-in growing like N^(4/3). At 2 million tets that is
# already 5 GB per rank before the factorisation and the eigenvectors; the largest grid measured
# (19 008 tets) takes 144 s per forward solve on 2 ranks. Above this nothing useful finishes.
MAX_TETRAHEDRA = 2_000_000
# Eigenbasis: SLEPc keeps ncv = nev + mpd Krylov vectors (mpd <= 256) and the converged
# eigenvectors are copied out, each a vector of 4 doubles per tet, so about
# (2 K + 256) x 4 x 8 bytes per tet for K modes (K = eigen.num_modes or eigen.max_modes).
# 64 GiB over all ranks is more than the machines this runs on hold.
MAX_EIGENBASIS_BYTES = 64 * 2**30
EIGEN_EXTRA_VECTORS = 256
# Measurements per sequence: the reduced model evaluates one K x K complex matrix exponential
# product per measurement and gradient step (K <= 500: ~0.1 s each), and the signal table holds
# every row; real protocols have at most a few thousand. 100 000 is ~3 CPU hours per forward
# evaluation at K = 500.
MAX_MEASUREMENTS_PER_SEQUENCE = 100_000


def estimated_tetrahedra(grid: GridConfig, refinement: int = 1) -> int | None:
    """Tetrahedra of the grid [grid] describes, refined `refinement` times (exact for the
    generated grids: bcc 12 n^2 (n - 1) with n = cubes x refinement, box 6 nx ny nz x
    refinement^3); None for a file grid (known only once read)."""
    r = int(refinement)
    if grid.kind == "bcc":
        n = int(grid.cubes) * r
        return 12 * n * n * (n - 1)
    if grid.kind == "box":
        nx, ny, nz = (int(c) * r for c in grid.cells)
        return 6 * nx * ny * nz
    return None


def eigenbasis_bytes(num_tets: int, modes: int) -> int:
    """Estimated memory (bytes, all ranks together) of an eigen-solve for `modes` modes."""
    return int(num_tets) * 4 * 8 * (2 * int(modes) + EIGEN_EXTRA_VECTORS)

# -- dataclasses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridConfig:
    """[grid]. kind "bcc": `cubes` (>= 2) cubes of side `cube_um` per axis centred at
    `center_um` (the paper's grid); "box": structured box [lower_um, upper_um] with `cells`
    (nx, ny, nz); "file": tetrahedral grid read from `path`, optional `membrane_tag`, and
    `unit_um`, the length of one coordinate unit of the file in um (1000 for a mesh in mm)."""

    kind: str
    cubes: int | None = None
    cube_um: float | None = None
    center_um: tuple[float, float, float] | None = None
    lower_um: tuple[float, float, float] | None = None
    upper_um: tuple[float, float, float] | None = None
    cells: tuple[int, int, int] | None = None
    path: Path | None = None
    membrane_tag: int | None = None
    unit_um: float = 1.0


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
    "robin" (outer faces get open_um_per_ms unless they are membrane faces). barrier_um_per_ms
    is None when [[membrane]] tables give each membrane its own permeability."""

    barrier_um_per_ms: float | None
    open_um_per_ms: float
    outer: str = "neumann"


@dataclass(frozen=True)
class PhysicsConfig:
    """[physics]: diffusivity (um^2/ms), optional T2 (ms; None = no relaxation)."""

    diffusivity_um2_per_ms: float = 2.0
    t2_ms: float | None = None


COMPARTMENT_REGIONS = ("inside", "outside")


@dataclass(frozen=True)
class CompartmentConfig:
    """[[compartment]]: a tissue compartment with its own diffusivity (um^2/ms), T2 (ms;
    None = no relaxation) and relative spin density, selected on a file grid by a volume
    physical `tag` and on a generated grid by `region` "inside" / "outside" the [geometry]
    shape (the same inside rule as the ground-truth membrane). With [inversion]
    fit_compartments the fit of D (T2) starts at diffusivity_start_um2_per_ms (t2_start_ms),
    default the value itself (which simulated targets use as the truth)."""

    name: str
    diffusivity_um2_per_ms: float
    t2_ms: float | None = None
    tag: int | None = None
    region: str | None = None
    diffusivity_start_um2_per_ms: float | None = None
    t2_start_ms: float | None = None
    # a 3 x 3 symmetric positive definite tensor (rows, um^2/ms, grid axes) when the table
    # gives one; diffusivity_um2_per_ms is then its mean diffusivity (trace / 3)
    diffusion_tensor_um2_per_ms: tuple | None = None
    # initial magnetisation per unit volume relative to the other compartments (> 0,
    # dimensionless): signals are normalised by S0, so only the ratios matter
    spin_density: float = 1.0


@dataclass(frozen=True)
class MembraneConfig:
    """[[membrane]]: the triangles of a file grid's surface physical `tag` are a membrane of
    permeability kappa_um_per_ms (um/ms); several tables give several membranes."""

    name: str
    tag: int
    kappa_um_per_ms: float


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


BASES = ("eigen", "frozen")


@dataclass(frozen=True)
class InversionConfig:
    """[inversion]; defaults follow the paper (kappa in um/ms).

    curriculum: "staged" (long-Delta sequence, then the shorter one), "split" (both jointly,
    same number of stages), "long_to_short" (every sequence, one stage each, longest diffusion
    time first), "cumulative" (the same order, stage k fitting the k longest jointly),
    "custom" (stages from [[inversion.stage]], kept in `custom_stages`).
    normalisation: "reference" (divide predictions by the reference b = 0 signal) or "own".
    checkpoint_every: iterations between checkpoints (0 = none).
    adam_restart_per_stage: Adam starts every stage with fresh moment estimates (and its
    warm-up), since each stage fits a different objective; false keeps them across stages.
    adam_eps: added to Adam's RMS gradient (units of the clipped v-gradient, whose 2-norm is
    at most clip_grad_norm). The paper's 1e-8 turns faces whose gradient is at round-off level
    into full-size steps, which amplifies round-off from one run to the next
    (docs/reproducibility.md); 1e-4 keeps such faces still.
    basis: "eigen" (the eigenbasis of every iterate; its adjoint needs one complement solve
    per mode) or "frozen" (the eigenbasis of the iterate at a refresh, held fixed for
    `basis_refresh_every` iterations: a Galerkin model with an exact, solve-free gradient;
    `inverse.frozen_basis`, docs/frozen_basis.md); with Adam also as soon as some face's
    log10 kappa has moved more than `basis_refresh_step` since the refresh (0 = never).
    noise_snr: None (least squares on S/S0) or the data's SNR (relative to S0 = 1): the misfit
    then compares sqrt(|S/S0|^2 + 2/SNR^2), the Rician-biased magnitude, with |data|.
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
    adam_eps: float = 1e-8
    clip_grad_norm: float = 1.0
    adam_restart_per_stage: bool = True
    checkpoint_every: int = 10
    basis: str = "eigen"
    basis_refresh_every: int = 10
    basis_refresh_step: float = 0.1
    fit_compartments: tuple[str, ...] = ()
    noise_snr: float | None = None
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
    compartments: tuple[CompartmentConfig, ...] = ()
    membranes: tuple[MembraneConfig, ...] = ()
    # every file the configuration itself reads (grid, ground truth, protocol files), as
    # (field, path) pairs; the [target] file is not among them (only some commands read it)
    input_files: tuple[tuple[str, Path], ...] = ()

    def sequence_index(self, name: str) -> int:
        """Index of the sequence called `name` (KeyError if none)."""
        for i, s in enumerate(self.sequences):
            if s.name == name:
                return i
        raise KeyError(f"no sequence named {name!r}; have {[s.name for s in self.sequences]}")
