"""The sequence propagator with its measurements split over the ranks.

References: the one-rank `SequencePropagator` on the whole sequence (signals and every
cotangent, to 1e-12 relative) and, for the split itself, its definition (every measurement on
exactly one rank, balanced counts). Runs serially and under mpiexec -n 2, where the split is real.
"""

import numpy as np
import pytest

from spinverse_fem.config.protocol import Sequence, fibonacci_directions
from spinverse_fem.forward.propagator import SequencePropagator
from spinverse_fem.forward.reduced_model import (
    DistributedPropagator,
    ReducedSystem,
    split_measurements,
)

SEQ = Sequence.pgse(5.0, 12.0, [0.0, 500.0, 1500.0, 3000.0], fibonacci_directions(7))


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_covers_every_measurement_once_and_balances(parts):
    """Reference: the definition: a partition of range(n), moving columns within one of each
    other's count, the q = 0 columns spread."""
    idx = split_measurements(SEQ, parts)
    allidx = np.sort(np.concatenate(idx))
    assert np.array_equal(allidx, np.arange(SEQ.num_measurements))
    q = SEQ.q_per_um_ms()
    moving = [int(np.sum(q[i] != 0)) for i in idx]
    assert max(moving) - min(moving) <= 1
    still = [int(np.sum(q[i] == 0)) for i in idx]
    assert max(still) - min(still) <= 1


def test_distributed_equals_one_rank_propagator(comm):
    """Reference: SequencePropagator on the whole sequence, the same reduced system."""
    rng = np.random.default_rng(0)
    K = 14
    lam = np.sort(rng.uniform(0.0, 2.0, K))
    Q, _ = np.linalg.qr(rng.standard_normal((K, K)))
    W = np.stack([Q.T @ np.diag(rng.uniform(0.0, 8.0, K)) @ Q for _ in range(3)])
    W = 0.5 * (W + W.transpose(0, 2, 1))
    nu0 = Q.T @ np.ones(K)
    system = ReducedSystem(lam=lam, W=W, nu0=nu0, volume=1.0)
    ref = SequencePropagator(lam, W, nu0, SEQ.segments, SEQ.q_per_um_ms(), SEQ.directions)
    dist = DistributedPropagator(comm, system, SEQ)
    S_ref = ref.signals()
    np.testing.assert_allclose(dist.signals(), S_ref, rtol=1e-13, atol=1e-15)
    sbar = rng.standard_normal(S_ref.size) + 1j * rng.standard_normal(S_ref.size)
    for full in (False, True):
        for got, want in zip(dist.vjp(sbar, full_lam=full), ref.vjp(sbar, full_lam=full)):
            np.testing.assert_allclose(got, want, rtol=1e-12,
                                       atol=1e-12 * np.max(np.abs(want)))
