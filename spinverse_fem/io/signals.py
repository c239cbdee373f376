"""Signal tables (S/S0 per measurement) in HDF5; layout and units: docs/file_formats.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from spinverse_fem.errors import InputError
# re-exported: callers outside io (cli/objective.py, inverse/) still import atomic_h5 from here
from spinverse_fem.io.atomic import atomic_h5

REQUIRED = ("signal_real", "signal_imag", "b_s_per_mm2", "direction", "sequence_index")


@dataclass(frozen=True)
class SignalTable:
    signal: np.ndarray          # (n,) complex S/S0
    b_s_per_mm2: np.ndarray     # (n,)
    direction: np.ndarray       # (n, 3)
    sequence_index: np.ndarray  # (n,) int
    delta_ms: np.ndarray        # (n,)
    Delta_ms: np.ndarray        # (n,)
    echo_time_ms: np.ndarray    # (n,)
    sequence_names: tuple[str, ...]
    config_text: str = ""
    s0_um3: np.ndarray | None = None  # (n,) the b = 0 signal (um^3) each row was divided by

    @property
    def num_rows(self) -> int:
        return int(self.signal.shape[0])

    def rows_of(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.sequence_index == k)


def table_from_sequences(sequences, signals, config_text: str = "", s0=None) -> SignalTable:
    """Stack per-sequence signals (list of (n_k,) complex S/S0) in config order; s0: optional
    per-sequence b = 0 signals (um^3)."""
    cols = {k: [] for k in ("b", "d", "i", "de", "De", "te")}
    for k, (seq, s) in enumerate(zip(sequences, signals)):
        n = seq.num_measurements
        if np.asarray(s).shape != (n,):
            raise ValueError(f"sequence {seq.name!r}: {np.asarray(s).shape} signals for {n} rows")
        cols["b"].append(seq.b_s_per_mm2)
        cols["d"].append(seq.directions)
        cols["i"].append(np.full(n, k))
        cols["de"].append(np.full(n, np.nan if seq.delta_ms is None else seq.delta_ms))
        cols["De"].append(np.full(n, np.nan if seq.Delta_ms is None else seq.Delta_ms))
        cols["te"].append(np.full(n, seq.echo_time_ms))
    return SignalTable(signal=np.concatenate([np.asarray(s, dtype=complex) for s in signals]),
                       b_s_per_mm2=np.concatenate(cols["b"]), direction=np.vstack(cols["d"]),
                       sequence_index=np.concatenate(cols["i"]),
                       delta_ms=np.concatenate(cols["de"]),
                       Delta_ms=np.concatenate(cols["De"]), echo_time_ms=np.concatenate(cols["te"]),
                       sequence_names=tuple(s.name for s in sequences), config_text=config_text,
                       s0_um3=None if s0 is None else np.concatenate(
                           [np.full(q.num_measurements, float(v)) for q, v in zip(sequences, s0)]))


def write_signal_table(path, table: SignalTable, extra: dict | None = None) -> None:
    """Write atomically on the calling rank (call from rank 0 only); `extra` datasets are added
    as given."""
    with atomic_h5(path) as f:
        for key, value in (extra or {}).items():
            f[key] = value
        if table.s0_um3 is not None:
            f["s0_um3"] = table.s0_um3
        f["signal_real"] = table.signal.real
        f["signal_imag"] = table.signal.imag
        f["b_s_per_mm2"] = table.b_s_per_mm2
        f["direction"] = table.direction
        f["sequence_index"] = table.sequence_index
        f["delta_ms"] = table.delta_ms
        f["Delta_ms"] = table.Delta_ms
        f["echo_time_ms"] = table.echo_time_ms
        f.attrs["sequence_names"] = json.dumps(list(table.sequence_names))
        f.attrs["config"] = table.config_text
        f.attrs["normalisation"] = "S/S0, S0 = b = 0 signal of the same geometry"
        f.attrs["units"] = "b: s/mm^2; delta, Delta, echo time: ms; direction: unit vector"


def open_h5(path, what: str) -> h5py.File:
    """Open an HDF5 file for reading; InputError naming the file when missing or not HDF5."""
    src = str(path)
    if not Path(path).is_file():
        raise InputError(src, None, f"{what} not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(src, None, f"not an HDF5 file ({e})") from None


def read_signal_table(path) -> SignalTable:
    """Read and check a signal table; InputError naming the file and field on bad content."""
    src = str(path)
    with open_h5(path, "signal file") as f:
        for key in REQUIRED:
            if key not in f:
                raise InputError(src, key, "missing dataset")
        data = {k: np.asarray(f[k]) for k in f.keys()}
        names = json.loads(f.attrs.get("sequence_names", "[]"))
        cfg = f.attrs.get("config", "")
    n = data["signal_real"].shape[0]
    for key in ("signal_imag", "b_s_per_mm2", "sequence_index"):
        if data[key].shape != (n,):
            raise InputError(src, key, f"has shape {data[key].shape}, expected ({n},)")
    if data["direction"].shape != (n, 3):
        raise InputError(src, "direction",
                         f"has shape {data['direction'].shape}, expected ({n}, 3)")
    sig = data["signal_real"] + 1j * data["signal_imag"]
    if not np.all(np.isfinite(sig)):
        raise InputError(src, "signal_real", "contains non-finite values")
    nan = np.full(n, np.nan)
    return SignalTable(signal=sig, b_s_per_mm2=data["b_s_per_mm2"], direction=data["direction"],
                       sequence_index=data["sequence_index"].astype(int),
                       delta_ms=data.get("delta_ms", nan), Delta_ms=data.get("Delta_ms", nan),
                       echo_time_ms=data.get("echo_time_ms", nan),
                       sequence_names=tuple(names), config_text=str(cfg),
                       s0_um3=data.get("s0_um3"))


def check_table_matches(table: SignalTable, sequences, source: str) -> None:
    """The table's rows must be the measurements of `sequences` in config order."""
    expected = sum(s.num_measurements for s in sequences)
    if table.num_rows != expected:
        raise InputError(source, "signal_real", f"{table.num_rows} rows, but the config's "
                         f"sequences have {expected} measurements")
    row = 0
    for k, seq in enumerate(sequences):
        n = seq.num_measurements
        sl = slice(row, row + n)
        if not (np.allclose(table.b_s_per_mm2[sl], seq.b_s_per_mm2, rtol=1e-9, atol=1e-9)
                and np.allclose(table.direction[sl], seq.directions, atol=1e-9)
                and np.all(table.sequence_index[sl] == k)):
            raise InputError(source, "b_s_per_mm2", f"rows {row}..{row + n - 1} do not match "
                             f"sequence {k} ({seq.name!r}) of the config")
        row += n
