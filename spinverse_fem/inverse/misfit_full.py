r"""Signal misfit of the full-order Crank-Nicolson model and its exact discrete gradient.

Same misfit, weight and normalisations as the reduced model's `objective.SignalMisfit`:

    J(kappa) = w / N  sum_c | S_c(kappa) / S0_k - T_c |^2     (c over the active measurements,
                                                               k the sequence of c)

with S_c = (M 1)^T m_c(TE) (um^3) from `full_order.FullOrderModel` and S0_k either the
reference's b = 0 signal of sequence k (normalisation "reference", a constant in um^3) or the
model's own b = 0 signal at the same echo time ("own": depends on kappa).

"own" normalisation: S0_k is computed by the same Crank-Nicolson recursion as the signals, by
appending one b = 0 measurement to sequence k (gradient vector 0, so it runs on the cheap
real N x N path and is simulated only once even if the sequence has b = 0 rows of its own). It
is therefore exactly the discrete b = 0 signal of the model, and its sensitivity enters the
same adjoint sweep through the cotangent of the appended row:

    dJ/dS0_k = -(1 / S0_k) sum_c Re( conj(Sbar_c) S_c / S0_k ),
    Sbar_c   = 2 w / N (S_c / S0_k - T_c)            (cotangent of S_c / S0_k),

i.e. the appended row gets the real cotangent dJ/dS0_k (S0_k is real: with q = 0 the system is
real), and the rows of sequence k get Sbar_c / S0_k. One `signals_and_vjp` call per sequence then
returns dJ/dkappa with the normalisation included.

Cost: `objective` is one forward sweep per sequence; `objective_and_gradient` needs the signals
before it can form the cotangents, so it is one forward sweep (reused if `objective` was just
called at the same kappa) plus one forward-and-backward sweep per sequence.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from spinverse_fem.forward.full_order import FullOrderModel
from spinverse_fem.inverse.misfit import Counters, set_misfit_inputs
from spinverse_fem.config.protocol import Sequence


def with_b0_row(seq) -> Sequence:
    """`seq` with one extra measurement b = 0 (direction x) appended as the last row."""
    return Sequence(seq.name, seq.segments, np.append(seq.b_s_per_mm2, 0.0),
                    np.vstack([seq.directions, [[1.0, 0.0, 0.0]]]))


class FullOrderMisfit:
    """J(kappa) and dJ/dkappa of the full-order model for a set of sequences and targets.

    model: FullOrderModel; sequences: the active sequences; targets: list of (n_k,) complex
    S/S0; weight: w; normalisation: "reference" (needs s0_reference, um^3 per sequence) or
    "own". Same interface as objective.SignalMisfit: objective(kappa), objective_and_gradient
    (kappa) -> (J, dJ/dkappa (F,) in 1/(um/ms), canonical face order, replicated), gradient,
    signals(kappa) -> S/S0 per sequence, counters (forward: forward evaluations, adjoint:
    gradient evaluations, timings in s; the eigen and CG counters stay 0).
    All methods are collective; kappa must be identical on every rank.
    """

    num_modes = None  # no modal reduction (same attribute as SignalMisfit)

    def __init__(self, model: FullOrderModel, sequences, targets, *, weight: float = 1.0,
                 normalisation: str = "own", s0_reference=None):
        self.model = model
        set_misfit_inputs(self, sequences, targets, weight, normalisation, s0_reference)
        self.num_measurements = sum(s.num_measurements for s in self.sequences)
        # the sequences actually simulated (with the b = 0 row for "own")
        self._sim = [with_b0_row(s) if normalisation == "own" else s for s in self.sequences]
        self.counters = Counters()
        self._cache_key = None
        self._state = None

    @property
    def comm(self) -> MPI.Comm:
        return self.model.comm

    def _split(self, k: int, S_sim: np.ndarray) -> tuple[np.ndarray, float]:
        """(S (n_k,) um^3, S0_k um^3) from the simulated signals of sequence k."""
        n = self.sequences[k].num_measurements
        if self.normalisation == "own":
            return S_sim[:n], float(S_sim[n].real)
        return S_sim, self.s0_reference[k]

    def _evaluate(self, raw: list[np.ndarray]) -> dict:
        scale = self.weight / self.num_measurements
        value, S, s0, res = 0.0, [], [], []
        for k, target in enumerate(self.targets):
            Sk, s0k = self._split(k, raw[k])
            r = Sk / s0k - target
            value += scale * float(np.sum(np.abs(r) ** 2))
            S.append(Sk)
            s0.append(s0k)
            res.append(r)
        return dict(value=value, S=S, s0=s0, residuals=res,
                    signals=[Sk / s for Sk, s in zip(S, s0)])

    def _forward(self, kappa: np.ndarray) -> dict:
        kappa = np.asarray(kappa, dtype=np.float64)
        key = kappa.tobytes()
        if self._cache_key == key:
            return self._state
        t0 = time.perf_counter()
        raw = [self.model.signals(seq, kappa=kappa) for seq in self._sim]
        self.counters.forward += 1
        self._add_time("forward", time.perf_counter() - t0)
        self._state = self._evaluate(raw)
        self._cache_key = key
        return self._state

    def _add_time(self, key: str, seconds: float) -> None:
        self.counters.timings[key] = self.counters.timings.get(key, 0.0) + seconds

    def objective(self, kappa: np.ndarray) -> float:
        return self._forward(kappa)["value"]

    def signals(self, kappa: np.ndarray) -> list[np.ndarray]:
        """Normalised model signals S/S0 per sequence at kappa."""
        return self._forward(kappa)["signals"]

    def cotangents(self, kappa: np.ndarray) -> list[np.ndarray]:
        """Per simulated sequence, Sbar = dJ/dRe S + i dJ/dIm S of its rows (incl. the b = 0 row
        for "own")."""
        st = self._forward(kappa)
        scale = self.weight / self.num_measurements
        out = []
        for k in range(len(self.sequences)):
            shat_bar = 2.0 * scale * st["residuals"][k]      # cotangent of S / S0
            s0 = st["s0"][k]
            sbar = shat_bar / s0
            if self.normalisation == "own":
                s0_bar = -float(np.sum(np.real(np.conj(shat_bar) * st["signals"][k]))) / s0
                sbar = np.append(sbar, s0_bar + 0.0j)
            out.append(sbar)
        return out

    def objective_and_gradient(self, kappa: np.ndarray) -> tuple[float, np.ndarray]:
        """(J, dJ/dkappa (F,) in 1/(um/ms), canonical face order, replicated)."""
        kappa = np.asarray(kappa, dtype=np.float64)
        st = self._forward(kappa)
        sbars = self.cotangents(kappa)
        t0 = time.perf_counter()
        grad = None
        for seq, sbar in zip(self._sim, sbars):
            _, g = self.model.signals_and_vjp(seq, sbar, kappa=kappa)
            grad = g if grad is None else grad + g
        self.counters.adjoint += 1
        self._add_time("adjoint", time.perf_counter() - t0)
        return st["value"], grad

    def gradient(self, kappa: np.ndarray) -> np.ndarray:
        return self.objective_and_gradient(kappa)[1]
