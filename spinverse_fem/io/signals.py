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
    """Read and check a signal table; InputError naming the file and field on bad content:
    a required dataset missing, a group or unreadable where a dataset should be, a non-numeric
    dtype, a shape that is not one row per measurement, non-finite signals, a sequence_index
    that is not a non-negative integer, a sequence_names attribute that is not a JSON list of
    strings."""
    src = str(path)
    with open_h5(path, "signal file") as f:
        for key in REQUIRED:
            if key not in f:
                raise InputError(src, key, "missing dataset")
        data = {key: _read_numeric(f, key, src) for key in (*REQUIRED, *OPTIONAL) if key in f}
        names = _sequence_names(f, src)
        cfg = f.attrs.get("config", "")
    sig_re = data["signal_real"]
    if sig_re.ndim != 1:
        raise InputError(src, "signal_real", f"has shape {sig_re.shape}, expected (n,): one "
                         "value per measurement")
    n = sig_re.shape[0]
    for key in ("signal_imag", "b_s_per_mm2", "sequence_index", *OPTIONAL):
        if key in data and data[key].shape != (n,):
            raise InputError(src, key, f"has shape {data[key].shape}, expected ({n},) like "
                             "signal_real")
    if data["direction"].shape != (n, 3):
        raise InputError(src, "direction",
                         f"has shape {data['direction'].shape}, expected ({n}, 3)")
    for key in ("signal_real", "signal_imag"):
        if not np.all(np.isfinite(data[key])):
            raise InputError(src, key, "contains non-finite values")
    sig = data["signal_real"] + 1j * data["signal_imag"]
    index = data["sequence_index"]
    if not (np.all(np.isfinite(index)) and np.all(index == np.round(index))
            and np.all(index >= 0)):
        raise InputError(src, "sequence_index", "must hold non-negative integers (the 0-based "
                         "sequence of each row)")
    index = index.astype(np.int64)
    if names and n and int(index.max()) >= len(names):
        raise InputError(src, "sequence_names", f"names {len(names)} sequences, but "
                         f"sequence_index goes up to {int(index.max())}")
    nan = np.full(n, np.nan)
    return SignalTable(signal=sig, b_s_per_mm2=data["b_s_per_mm2"].astype(np.float64),
                       direction=data["direction"].astype(np.float64),
                       sequence_index=index,
                       delta_ms=data.get("delta_ms", nan), Delta_ms=data.get("Delta_ms", nan),
                       echo_time_ms=data.get("echo_time_ms", nan),
                       sequence_names=tuple(names), config_text=_text_attr(cfg),
                       s0_um3=data.get("s0_um3"))


# datasets a table may have besides REQUIRED (one value per row each)
OPTIONAL = ("delta_ms", "Delta_ms", "echo_time_ms", "s0_um3")


def _read_numeric(f: h5py.File, key: str, src: str) -> np.ndarray:
    """Dataset `key` as a real numeric array; InputError naming it when it is a group, cannot be
    read (a damaged file) or holds strings, compound or complex values."""
    try:
        obj = f[key]
    except (KeyError, OSError, ValueError) as e:  # a dangling link, a damaged header
        raise InputError(src, key, f"cannot be read ({e})") from None
    if not isinstance(obj, h5py.Dataset):
        raise InputError(src, key, f"is a {'group' if isinstance(obj, h5py.Group) else 'link'}, "
                         "not a dataset")
    if obj.dtype.kind not in "iuf":
        raise InputError(src, key, f"must hold real numbers, got dtype {obj.dtype}")
    try:
        return np.asarray(obj[()], dtype=np.float64)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(src, key, f"cannot be read ({e})") from None


def _text_attr(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def _sequence_names(f: h5py.File, src: str) -> list[str]:
    """The sequence_names attribute: a JSON list of strings ([] when absent)."""
    try:
        raw = f.attrs.get("sequence_names", None)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(src, "sequence_names", f"attribute cannot be read ({e})") from None
    if raw is None:
        return []
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        names = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        names = None
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        raise InputError(src, "sequence_names", f"attribute must be a JSON list of strings "
                         f"(e.g. '[\"10/60\", \"10/20\"]'), got {shown}")
    return names


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
