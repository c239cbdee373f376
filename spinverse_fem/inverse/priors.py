"""The Spinverse mesh-based geometric priors on per-face log-permeabilities, with exact gradients.

The parameter is x = log10(kappa / (1 um/ms)), one value per grid triangle, shape (F,). A face is
a "barrier" with probability

    p = sigmoid((log10(threshold) - x) / width),

which with threshold = 1 um/ms and width = 0.5 is the paper's
sigmoid((-3 - log10 kappa[um/us]) / 0.5) (kappa[um/us] = kappa[um/ms] / 1000).

Two priors (both dimensionless, to be weighted by the caller):

- continuity: mean over pairs (i, j) of faces sharing a grid edge of w_ij (x_i - x_j)^2 / 2 with
  w_ij = clip(1 - |p_i - p_j|, 0, 1). The weights are evaluated once per outer iteration and held
  fixed (the paper detaches them), so `continuity` takes them as an argument and does not
  differentiate them.
- manifold: for each grid edge e, k_e = sum of p over its faces; the double-well
  pen(k) = -t log(exp(-k^2/t) + exp(-(k-2)^2/t)) + t log(1 + exp(-4/t)) is 0 at k = 0 (no
  membrane through the edge) and k = 2 (a 2-manifold through it) and positive elsewhere. pen is
  divided by the edge's face count, then averaged over edges.

Only `active` faces take part: inactive faces are dropped from pairs and edge sums and get a zero
gradient. Everything works on global arrays (numpy/scipy only); callers gather x first.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from spinverse_fem.geometry.topology import build_edge_table


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a non-positive argument only, so no overflow warnings for large |z|
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def manifold_penalty(k: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Double-well pen(k) and its derivative dpen/dk, elementwise (k dimensionless, any shape).

    pen(0) = pen(2) = 0 exactly (up to rounding); computed with logaddexp so that small
    temperatures do not underflow.
    """
    t = float(temperature)
    k = np.asarray(k, dtype=np.float64)
    a = -k**2 / t
    b = -(k - 2.0) ** 2 / t
    lse = np.logaddexp(a, b)
    pen = -t * lse + t * np.log1p(np.exp(-4.0 / t))
    # d/dk of -t*lse = 2 * (sa*k + sb*(k-2)) with softmax weights sa + sb = 1
    sb = np.exp(b - lse)
    dpen = 2.0 * (k - 2.0 * sb)
    return pen, dpen


class GeometricPriors:
    """Continuity and manifold priors on a fixed triangle set.

    faces:       (F, 3) int vertex ids of every grid triangle (any consistent face order; the
                 arrays x passed later use the same order).
    active:      (F,) bool, faces whose permeability is a free parameter; None means all.
    threshold_um_per_ms: barrier threshold on kappa (um/ms); p = 1/2 there.
    temperature: t of the manifold double well (dimensionless).
    width:       sigmoid width in decades of kappa.

    Precomputed: `pairs` (P, 2) global ids of active faces sharing an edge (i < j), and the
    sparse incidence of active faces on the edges they use (`num_edges` edges).
    """

    def __init__(self, faces: np.ndarray, active: np.ndarray | None = None,
                 threshold_um_per_ms: float = 1.0, temperature: float = 0.1,
                 width: float = 0.5):
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
        if not np.issubdtype(faces.dtype, np.integer):
            raise ValueError(f"faces must hold integer vertex ids, got dtype {faces.dtype}")
        nf = faces.shape[0]
        if active is None:
            active = np.ones(nf, dtype=bool)
        active = np.asarray(active)
        if active.shape != (nf,) or active.dtype != bool:
            raise ValueError(f"active must be a bool array of shape ({nf},), "
                             f"got {active.dtype} {active.shape}")
        for name, val in (("threshold_um_per_ms", threshold_um_per_ms),
                          ("temperature", temperature), ("width", width)):
            if not (np.isfinite(val) and val > 0):
                raise ValueError(f"{name} must be a positive finite number, got {val}")

        self.num_faces = nf
        self.active = active.copy()
        self.log10_threshold = float(np.log10(threshold_um_per_ms))
        self.temperature = float(temperature)
        self.width = float(width)

        act_ids = np.flatnonzero(active)
        if act_ids.size:
            table = build_edge_table(faces[act_ids])
            local_pairs = table.face_pairs()
            self.pairs = act_ids[local_pairs] if local_pairs.size else np.zeros((0, 2), np.int64)
            ne = table.num_edges
            rows = table.face_edges.ravel()
            cols = np.repeat(act_ids, 3)
            # (E, F) 0/1 incidence of active faces on the edges they use
            self._incidence = sp.csr_matrix(
                (np.ones(rows.size), (rows, cols)), shape=(ne, nf))
            self.edge_face_counts = table.edge_face_counts().astype(np.float64)
            self.edges = table.edges
        else:
            self.pairs = np.zeros((0, 2), dtype=np.int64)
            self._incidence = sp.csr_matrix((0, nf))
            self.edge_face_counts = np.zeros(0)
            self.edges = np.zeros((0, 2), dtype=np.int64)
        self.pairs = np.ascontiguousarray(self.pairs, dtype=np.int64)

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    @property
    def num_edges(self) -> int:
        """Edges used by at least one active face."""
        return int(self.edge_face_counts.size)

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.num_faces,):
            raise ValueError(f"x must have shape ({self.num_faces},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x (log10 kappa) contains non-finite values")
        return x

    def barrier_probability(self, x: np.ndarray) -> np.ndarray:
        """(F,) p in (0, 1): sigmoid((log10 threshold - x) / width); inactive faces included."""
        x = self._check(x)
        return _sigmoid((self.log10_threshold - x) / self.width)

    def continuity_weights(self, x: np.ndarray) -> np.ndarray:
        """(P,) w_ij = clip(1 - |p_i - p_j|, 0, 1) at x, to be held fixed in `continuity`."""
        p = self.barrier_probability(x)
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        return np.clip(1.0 - np.abs(p[i] - p[j]), 0.0, 1.0)

    def continuity(self, x: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean over pairs of w_ij (x_i - x_j)^2 / 2 and its gradient in x (F,), w fixed."""
        x = self._check(x)
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.num_pairs,):
            raise ValueError(f"w must have shape ({self.num_pairs},), got {w.shape}")
        grad = np.zeros(self.num_faces)
        if self.num_pairs == 0:
            return 0.0, grad
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        d = x[i] - x[j]
        value = float(np.mean(w * d * d) / 2.0)
        c = w * d / self.num_pairs
        grad += np.bincount(i, weights=c, minlength=self.num_faces)
        grad -= np.bincount(j, weights=c, minlength=self.num_faces)
        return value, grad

    def manifold(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean over edges of pen(k_e) / n_e and its gradient in x (F,)."""
        p = self.barrier_probability(x)
        grad = np.zeros(self.num_faces)
        if self.num_edges == 0:
            return 0.0, grad
        k = self._incidence @ p
        pen, dpen = manifold_penalty(k, self.temperature)
        ne = self.num_edges
        value = float(np.sum(pen / self.edge_face_counts) / ne)
        dvalue_dp = self._incidence.T @ (dpen / self.edge_face_counts / ne)
        # dp/dx = -p (1 - p) / width; inactive columns of the incidence are empty, so they get 0
        grad = dvalue_dp * (-p * (1.0 - p) / self.width)
        return value, grad
