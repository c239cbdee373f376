"""The parameter map of the inversion: the optimisation vector x <-> face permeabilities kappa.

    x = log10(kappa / (1 um/ms))   on the active faces (interior faces, plus the outer faces
                                   when they are robin), lower <= x <= upper;
    kappa = fixed_kappa            on the inactive faces.

dJ/dx = dJ/dkappa * kappa * ln 10 (`pullback`).

With [inversion] fit_compartments the vector goes on with the compartment parameters
(`TissueParameters`): y = log10(D_c / (1 um^2/ms)) for every compartment c, then
y = log10(T2_c / (1 ms)), in that order; x = [x_faces, y].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LN10 = np.log(10.0)
#: a fitted compartment parameter stays within this many decades of its start value (the
#: optimiser's bounds; Adam's logistic map then also scales its steps to this range)
TISSUE_SEARCH_DECADES = 0.3


@dataclass(frozen=True)
class TissueParameters:
    """compartment: (T,) compartment index per tetrahedron; diffusivity (C,) um^2/ms and
    t2_ms (C,) ms or None: the values not fitted and the start of the fitted ones; fit: the
    fitted fields, a subset of ("diffusivity", "t2") in that order."""

    compartment: np.ndarray
    diffusivity: np.ndarray
    t2_ms: np.ndarray | None
    fit: tuple[str, ...]

    @property
    def num_compartments(self) -> int:
        return int(self.diffusivity.size)

    @property
    def size(self) -> int:
        return self.num_compartments * len(self.fit)

    def initial(self) -> np.ndarray:
        """y0 (size,): log10 of the start values."""
        parts = [np.log10(self.diffusivity if f == "diffusivity" else self.t2_ms)
                 for f in self.fit]
        return np.concatenate(parts) if parts else np.zeros(0)

    def values(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(D (C,) um^2/ms, T2 (C,) ms or None) at y."""
        D, T2 = self.diffusivity.copy(), None if self.t2_ms is None else self.t2_ms.copy()
        C = self.num_compartments
        for i, f in enumerate(self.fit):
            v = 10.0 ** np.asarray(y[i * C:(i + 1) * C], dtype=float)
            if f == "diffusivity":
                D = v
            else:
                T2 = v
        return D, T2

    def cell_fields(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(D (T,) um^2/ms, 1/T2 (T,) 1/ms or None) per tetrahedron at y."""
        D, T2 = self.values(y)
        return D[self.compartment], None if T2 is None else (1.0 / T2)[self.compartment]

    def pullback(self, y: np.ndarray, grad_D_cells: np.ndarray,
                 grad_rate_cells: np.ndarray) -> np.ndarray:
        """dJ/dy (size,) from dJ/dD_t (ms/um^2) and dJ/dr_t (ms, r = 1/T2) per tetrahedron:
        dJ/dlog10 D_c = ln10 D_c sum_{t in c} dJ/dD_t, dJ/dlog10 T2_c = -ln10 / T2_c
        sum_{t in c} dJ/dr_t."""
        D, T2 = self.values(y)
        C = self.num_compartments
        out = []
        for f in self.fit:
            if f == "diffusivity":
                out.append(LN10 * D * np.bincount(self.compartment, grad_D_cells, C))
            else:
                out.append(-LN10 / T2 * np.bincount(self.compartment, grad_rate_cells, C))
        return np.concatenate(out) if out else np.zeros(0)


@dataclass(frozen=True)
class ParameterMap:
    """active: (F,) bool; lower/upper: bounds of x (log10 of um/ms; also of the compartment
    entries, log10 of um^2/ms and ms); fixed_kappa: (F,) kappa (um/ms) used on inactive faces;
    tissue: the fitted compartment parameters after the faces, or None."""

    active: np.ndarray
    lower: float
    upper: float
    fixed_kappa: np.ndarray
    tissue: TissueParameters | None = None

    @property
    def num_faces(self) -> int:
        """Unknowns that are faces (the active ones)."""
        return int(np.sum(self.active))

    @property
    def size(self) -> int:
        """Number of unknowns (active faces, then the fitted compartment parameters)."""
        return self.num_faces + (self.tissue.size if self.tissue is not None else 0)

    def bounds(self) -> tuple:
        """(lower, upper) of x for the optimiser: the scalars when only faces are fitted, else
        (size,) arrays with each compartment entry within TISSUE_SEARCH_DECADES of its
        start."""
        if self.tissue is None:
            return self.lower, self.upper
        y0 = self.tissue.initial()
        nf = self.num_faces
        lo = np.concatenate([np.full(nf, self.lower), y0 - TISSUE_SEARCH_DECADES])
        hi = np.concatenate([np.full(nf, self.upper), y0 + TISSUE_SEARCH_DECADES])
        return lo, hi

    def tissue_part(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[self.num_faces:]

    def to_kappa(self, x: np.ndarray) -> np.ndarray:
        """(F,) kappa in um/ms for the optimisation vector x (size,)."""
        k = self.fixed_kappa.copy()
        k[self.active] = 10.0 ** np.asarray(x)[: self.num_faces]
        return k

    def from_kappa(self, kappa: np.ndarray, tissue_y: np.ndarray | None = None) -> np.ndarray:
        """x (size,) for a per-face kappa (F,) in um/ms, clipped to the bounds; the compartment
        entries from tissue_y (default: their start values)."""
        x = np.clip(np.log10(np.asarray(kappa, dtype=float)[self.active]), self.lower,
                    self.upper)
        if self.tissue is None:
            return x
        y = self.tissue.initial() if tissue_y is None else np.asarray(tissue_y, dtype=float)
        return np.concatenate([x, y])

    def full_log10(self, x: np.ndarray) -> np.ndarray:
        """(F,) log10 kappa on every face (inactive faces from fixed_kappa)."""
        return np.log10(self.to_kappa(x))

    def pullback(self, kappa: np.ndarray, grad_kappa: np.ndarray) -> np.ndarray:
        """dJ/dx (size,) from dJ/dkappa (F,) in 1/(um/ms) at kappa = to_kappa(x)."""
        return grad_kappa[self.active] * kappa[self.active] * LN10
