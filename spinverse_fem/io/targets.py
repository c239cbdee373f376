"""Target signals for the misfit: a signal table (as written by `spinverse simulate`) split per
sequence of a configuration.

The table's rows must be the configuration's measurements in config order (sequence, then b, then
direction): same row count, b-values (s/mm^2), directions and sequence index
(signals_io.check_table_matches), and, where the file records them, the same echo time and PGSE
delta / Delta (ms). Anything else is refused with InputError(file, field, "mismatched signal
tables: ...").
"""

from __future__ import annotations

import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.io.signals import check_table_matches, read_signal_table

_TIME_RTOL = 1e-9


def _mismatch(src: str, field: str, message: str) -> InputError:
    return InputError(src, field, f"mismatched signal tables: {message}")


def load_targets(path, cfg) -> tuple[list[np.ndarray], list[float] | None]:
    """(targets, s0) for every sequence of cfg, in config order.

    targets: list of (n_k,) complex S/S0 (dimensionless);
    s0: list of the b = 0 signals (um^3) each sequence's rows were divided by (the reference
        normalisation), or None when the file has no `s0_um3` column (e.g. measured data).
    Raises InputError naming the file and the field on a bad file or a table that does not
    match cfg.sequences.
    """
    src = str(path)
    table = read_signal_table(path)
    try:
        check_table_matches(table, cfg.sequences, src)
    except InputError as e:
        raise _mismatch(e.source, e.field, e.message) from None
    targets, s0 = [], []
    for k, seq in enumerate(cfg.sequences):
        rows = table.rows_of(k)
        for field, have, want in (("delta_ms", table.delta_ms[rows], seq.delta_ms),
                                  ("Delta_ms", table.Delta_ms[rows], seq.Delta_ms),
                                  ("echo_time_ms", table.echo_time_ms[rows], seq.echo_time_ms)):
            have = np.asarray(have, dtype=np.float64)
            known = np.isfinite(have)
            if not known.any():
                continue  # not recorded in the file (or a general waveform)
            if want is None or not np.allclose(have[known], want, rtol=_TIME_RTOL, atol=0.0):
                raise _mismatch(src, field, f"rows of sequence {k} ({seq.name!r}) have "
                                f"{field} = {float(have[known][0]):g}, the config "
                                f"{'none' if want is None else f'{want:g}'}")
        targets.append(np.asarray(table.signal[rows], dtype=np.complex128))
        if table.s0_um3 is not None:
            v = np.asarray(table.s0_um3, dtype=np.float64)
            if v.shape != (table.num_rows,):
                raise InputError(src, "s0_um3", f"has shape {v.shape}, expected "
                                 f"({table.num_rows},)")
            v = v[rows]
            if not (np.all(np.isfinite(v)) and np.all(v > 0)):
                raise InputError(src, "s0_um3", f"rows of sequence {k} ({seq.name!r}) must "
                                 "hold positive finite b = 0 signals (um^3)")
            if not np.allclose(v, v[0], rtol=1e-12, atol=0.0):
                raise InputError(src, "s0_um3", f"rows of sequence {k} ({seq.name!r}) hold "
                                 "different b = 0 signals; one per sequence expected")
            s0.append(float(v[0]))
    return targets, (s0 if table.s0_um3 is not None else None)
