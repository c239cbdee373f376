"""Reference (target) signals for synthetic inversions: the forward model on the ground truth,
optionally on a finer grid (no inverse crime) and with Rician noise."""

from __future__ import annotations

import numpy as np

from spinverse_fem.config import Config
from spinverse_fem.forward.model import ForwardModel
from spinverse_fem.forward.reduced_model import b0_signal
from spinverse_fem.geometry.phantom import build_phantom


def simulate_targets(comm, cfg: Config, refinement: int = 1, noise_snr: float | None = None,
                       seed: int = 0):
    """(targets per sequence (n_k,) S/S0, s0 per sequence in um^3, reference Phantom).

    Rician noise: T = |T + (n1 + i n2) / SNR| with n1, n2 ~ N(0, 1), SNR relative to S0 = 1
    (seeded, identical on every rank).
    """
    problem = build_phantom(cfg, refinement)
    model = ForwardModel(comm, problem, cfg.physics, cfg.eigen)
    _, system = model.reduce(problem.kappa)
    targets = model.normalised_signals(system, cfg.sequences)
    s0 = [b0_signal(system, seq.echo_time_ms) for seq in cfg.sequences]
    if noise_snr:
        rng = np.random.default_rng(seed)
        noisy = []
        for t in targets:
            n = (rng.standard_normal(t.shape) + 1j * rng.standard_normal(t.shape)) / noise_snr
            noisy.append(np.abs(t + n).astype(complex))
        targets = noisy
    return targets, s0, problem
