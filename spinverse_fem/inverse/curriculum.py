"""The curriculum policy: which sequences each stage of an inversion fits, and for how long.

Long diffusion times first (the paper's staged idea): the long-Delta sequences see the coarse
barrier layout, shorter ones refine it. Presets: staged, split, long_to_short, cumulative,
custom.
"""

from __future__ import annotations

import math

from spinverse_fem.config.protocol import Sequence
from spinverse_fem.config.schema import Config, Stage


def stages(cfg: Config) -> tuple[Stage, ...]:
    """The inversion curriculum as explicit stages.

    staged: the sequence named "10/60" (or PGSE with delta/Delta = 10/60 ms), then "10/20";
      if either is missing, the two sequences with the longest Delta (echo time for
      non-PGSE), longest first. One stage per sequence.
    split:  the same sequences, all jointly in every stage; as many stages as "staged".
    long_to_short: every sequence alone, one stage each, in decreasing diffusion time
      (Delta - delta/3 for PGSE, echo time otherwise): the paper's idea carried on to its
      unused short sequence (5/6 ms after 10/60 and 10/20 on the paper protocol).
    cumulative: the same order, but stage k fits the k longest sequences jointly, so the last
      stage fits every sequence: a shorter sequence refines the layout without the earlier
      ones being dropped (with targets the grid cannot fit exactly, a stage on one sequence
      alone overfits it at the others' expense).
    custom: the [[inversion.stage]] tables.
    Every preset stage runs iterations_per_stage with the [inversion] weights.
    """
    inv = cfg.inversion
    if inv.curriculum == "custom":
        return inv.custom_stages
    if inv.curriculum == "long_to_short":
        groups = [(i,) for i in _by_diffusion_time(cfg.sequences)]
    elif inv.curriculum == "cumulative":
        order = _by_diffusion_time(cfg.sequences)
        groups = [tuple(sorted(order[:k + 1])) for k in range(len(order))]
    elif inv.curriculum == "staged":
        groups = [(i,) for i in _curriculum_sequences(cfg.sequences)]
    else:
        chosen = _curriculum_sequences(cfg.sequences)
        groups = [tuple(sorted(chosen))] * len(chosen)
    return tuple(
        Stage(g, inv.iterations_per_stage, inv.continuity_weight, inv.manifold_weight)
        for g in groups
    )




def _by_diffusion_time(seqs: tuple[Sequence, ...]) -> list[int]:
    """Sequence indices, longest diffusion time first (file order on ties)."""
    key = [s.Delta_ms - s.delta_ms / 3.0 if s.is_pgse else s.echo_time_ms for s in seqs]
    return sorted(range(len(seqs)), key=lambda i: -key[i])


def _curriculum_sequences(seqs: tuple[Sequence, ...]) -> list[int]:
    def find(name: str, delta: float, Delta: float) -> int | None:
        for i, s in enumerate(seqs):
            if s.name == name:
                return i
        for i, s in enumerate(seqs):
            if s.is_pgse and math.isclose(s.delta_ms, delta) and math.isclose(s.Delta_ms, Delta):
                return i
        return None

    long_, short = find("10/60", 10.0, 60.0), find("10/20", 10.0, 20.0)
    if long_ is not None and short is not None and long_ != short:
        return [long_, short]
    key = [s.Delta_ms if s.is_pgse else s.echo_time_ms for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -key[i])  # stable: file order on ties
    return order[:2]
