"""Diffusion-encoding protocols: gradient waveforms, b-values, directions and their file formats.

A sequence is a normalised, piecewise-constant gradient waveform f(t) in [-1, 1] on [0, TE]
(the effective gradient, i.e. with the sign flip of the refocusing pulse already applied) and a
list of measurements (b, g). Measurement m applies the gradient q_m f(t) g_m, where
q = gamma |G| (units 1/(um ms)) is fixed by the b-value through

    b = q^2 * b_factor,   b_factor = int_0^TE F(t)^2 dt,   F(t) = int_0^t f(s) ds   (ms^3).

Units: times in ms, b in s/mm^2 at this boundary (1 s/mm^2 = 1e-3 ms/um^2), q in 1/(um ms).
File formats: Camino STEJSKALTANNER schemes (SI units) and FSL bvals/bvecs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinverse_fem.errors import InputError

# Proton gyromagnetic ratio as used by Camino (rad s^-1 T^-1).
GAMMA_RAD_PER_S_PER_T = 2.6751525e8
# 1 s/mm^2 = 1e-3 ms/um^2.
MS_PER_UM2_PER_S_PER_MM2 = 1e-3
# Directions given in code must be unit to this tolerance (b > 0).
UNIT_TOL = 1e-6
# Directions read from text files carry few digits: accept this error and renormalise.
FILE_UNIT_TOL = 1e-3
# A waveform is refocused when |int f dt| <= REFOCUS_TOL * TE.
REFOCUS_TOL = 1e-9
# Relative tolerance for recognising a PGSE waveform (equal pulse durations).
_PGSE_RTOL = 1e-12

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
# A configuration is a few kB and a protocol file (one line of < 100 bytes per measurement, at
# most config.schema.MAX_MEASUREMENTS_PER_SEQUENCE rows) a few MB: anything larger is the wrong
# file and is refused before it is read into memory.
MAX_TEXT_BYTES = 64 * 2**20


def fibonacci_directions(n: int) -> np.ndarray:
    """Return n unit vectors of a Fibonacci lattice on the whole sphere, shape (n, 3).

    Point i has z_i = 1 - (2i + 1)/n and azimuth i * golden angle (pi (3 - sqrt 5)).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"fibonacci_directions: n must be an integer >= 1, got {n!r}")
    i = np.arange(n, dtype=float)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * _GOLDEN_ANGLE
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def read_text_file(path: str | Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file; InputError naming the file when it is missing, not a
    regular file (a folder, a device), larger than max_bytes, or not UTF-8 text."""
    p = Path(path)
    src = str(p)
    try:
        if not p.exists():
            raise InputError(src, None, f"cannot read {what} (no such file)")
        if not p.is_file():
            raise InputError(src, None, f"cannot read {what}: not a regular file")
        size = p.stat().st_size
        if size > max_bytes:
            raise InputError(src, None, f"{what} is {size / 2**20:.1f} MiB; a text file of at "
                             f"most {max_bytes / 2**20:.0f} MiB is expected (the wrong file?)")
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(src, None, f"cannot read {what} ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(src, f"line {line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                         f"offset {exc.start}): a binary file or another encoding; {what} "
                         "must be UTF-8 text") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise InputError(src, f"line {line}", f"contains NUL bytes: a binary file, not a {what}")
    return text


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=float, copy=True)
    a.setflags(write=False)
    return a


def _check_b(b, source: str, field: str) -> np.ndarray:
    """Validate b-values (n,) in s/mm^2: non-empty, finite, >= 0."""
    try:
        b = np.asarray(b, dtype=float)
    except (TypeError, ValueError):
        raise InputError(source, field, "must be a list of numbers") from None
    if b.ndim != 1 or b.size == 0:
        raise InputError(source, field, f"must be a non-empty 1-D list, got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        k = int(np.flatnonzero(~np.isfinite(b))[0])
        raise InputError(source, f"{field}[{k}]", f"must be finite, got {b[k]}")
    if np.any(b < 0):
        k = int(np.flatnonzero(b < 0)[0])
        raise InputError(source, f"{field}[{k}]", f"must be >= 0, got {b[k]:g}")
    return b


def _check_directions(d, b_used, source: str, field: str) -> np.ndarray:
    """Validate directions (n, 3): unit where b_used > 0, unit or zero where b_used == 0.

    b_used: (n,) or a scalar, the b-value each direction is used with.
    """
    try:
        d = np.asarray(d, dtype=float)
    except (TypeError, ValueError):
        raise InputError(source, field, "must be a list of 3-vectors") from None
    if d.ndim != 2 or d.shape[1] != 3 or d.shape[0] == 0:
        raise InputError(source, field,
                         f"must be a non-empty list of 3-vectors, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        k = int(np.flatnonzero(~np.all(np.isfinite(d), axis=1))[0])
        raise InputError(source, f"{field}[{k}]", "must be finite")
    k, norm = _first_non_unit(d, b_used, UNIT_TOL)
    if k is not None:
        raise InputError(source, f"{field}[{k}]", "must be a unit vector (a zero vector only "
                         f"where b = 0), got norm {norm:.9g}")
    return d


def _first_non_unit(d: np.ndarray, b, tol: float) -> tuple[int | None, float]:
    """(index, norm) of the first direction that is neither unit (within tol) nor a zero vector
    at b = 0; (None, 0) if all are fine."""
    norm = np.linalg.norm(d, axis=1)
    bad = (np.abs(norm - 1.0) > tol) & ((np.asarray(b) > 0) | (norm != 0))
    if not np.any(bad):
        return None, 0.0
    k = int(np.flatnonzero(bad)[0])
    return k, float(norm[k])


def _check_measurements(b, directions, source: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-measurement (b (n,), directions (n, 3)); return float copies."""
    b = _check_b(b, source, f"{prefix}b_s_per_mm2")
    try:
        d = np.asarray(directions, dtype=float)
    except (TypeError, ValueError):
        raise InputError(source, f"{prefix}directions", "must be a list of 3-vectors") from None
    if d.ndim != 2 or d.shape[0] != b.size:
        raise InputError(
            source, f"{prefix}directions",
            f"need one direction per b-value ({b.size}), got shape {d.shape}"
        )
    d = _check_directions(d, b, source, f"{prefix}directions")
    return b, d


def _outer_measurements(b_values, directions, source: str,
                        prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (b_values[ib], directions[idir]) at ib * nd + idir; errors index the user's lists."""
    b = _check_b(b_values, source, f"{prefix}b_s_per_mm2")
    # Every direction is used with every b, so it must be unit unless all b are zero.
    d = _check_directions(directions, b.max(), source, f"{prefix}directions")
    return np.repeat(b, d.shape[0]), np.tile(d, (b.size, 1))


def _check_segments(segments, source: str, prefix: str) -> tuple[tuple[float, float], ...]:
    """Validate a piecewise-constant waveform ((duration_ms, amplitude), ...)."""
    field = f"{prefix}segments"
    try:
        seg = np.asarray(segments, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(source, field,
                         f"must be [[duration_ms, amplitude], ...] ({exc})") from None
    if seg.ndim != 2 or seg.shape[1] != 2 or seg.shape[0] == 0:
        raise InputError(source, field,
                         f"must be [[duration_ms, amplitude], ...], got shape {seg.shape}")
    if not np.all(np.isfinite(seg)):
        raise InputError(source, field, "must be finite")
    dur, amp = seg[:, 0], seg[:, 1]
    if np.any(dur < 0):
        k = int(np.flatnonzero(dur < 0)[0])
        raise InputError(source, f"{field}[{k}]", f"duration must be >= 0 ms, got {dur[k]:g}")
    te = float(dur.sum())
    if te <= 0:
        raise InputError(source, field, "total duration (echo time) must be > 0 ms")
    if np.any(np.abs(amp) > 1.0):
        k = int(np.flatnonzero(np.abs(amp) > 1.0)[0])
        raise InputError(source, f"{field}[{k}]", f"amplitude must be in [-1, 1], got {amp[k]:g}")
    moment = float(np.dot(dur, amp))
    if abs(moment) > REFOCUS_TOL * te:
        raise InputError(
            source, field, f"waveform is not refocused: int f dt = {moment:.3g} ms (must be 0)"
        )
    return tuple((float(t), float(a)) for t, a in seg)


def _b_factor(segments: tuple[tuple[float, float], ...]) -> float:
    """Exact int_0^TE F^2 dt (ms^3) for piecewise-constant f.

    On a segment of duration d and amplitude a starting at F0, F = F0 + a s, so
    int_0^d F^2 ds = F0^2 d + F0 a d^2 + a^2 d^3 / 3.
    """
    total, f0 = 0.0, 0.0
    for d, a in segments:
        total += f0 * f0 * d + f0 * a * d * d + a * a * d**3 / 3.0
        f0 += a * d
    return total


@dataclass(frozen=True, eq=False)
class Sequence:
    """One diffusion-encoding sequence and its measurements.

    name:          label (used to pick sequences for the inversion curriculum).
    segments:      ((duration_ms, amplitude), ...), the normalised effective waveform f(t),
                   amplitudes in [-1, 1], refocused (int f dt = 0).
    b_s_per_mm2:   (n,) b-values in s/mm^2 (read-only array).
    directions:    (n, 3) unit gradient directions; a zero row is allowed where b = 0.

    Build with `Sequence.pgse` or `Sequence.waveform`; direct construction validates too.
    """

    name: str
    segments: tuple[tuple[float, float], ...]
    b_s_per_mm2: np.ndarray
    directions: np.ndarray

    def __post_init__(self):
        source = f"sequence {self.name!r}"
        segments = _check_segments(self.segments, source, "")
        b, d = _check_measurements(self.b_s_per_mm2, self.directions, source, "")
        if np.any(b > 0) and _b_factor(segments) <= 0:
            raise InputError(source, "segments", "waveform is zero: b > 0 cannot be reached")
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "b_s_per_mm2", _frozen(b))
        object.__setattr__(self, "directions", _frozen(d))

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def pgse(
        cls,
        delta_ms: float,
        Delta_ms: float,
        b_values: SequenceLike[float],
        directions,
        *,
        name: str | None = None,
        source: str = "<pgse>",
        prefix: str = "",
    ) -> Sequence:
        """Pulsed-gradient spin echo: f = +1 on [0, delta], -1 on [Delta, Delta + delta].

        b_values (nb,) in s/mm^2 and directions (nd, 3) are combined as an outer product:
        row ib * nd + idir is (b_values[ib], directions[idir]). Errors name `source` and
        fields `prefix + "delta_ms"` etc. The default name is "delta/Delta", e.g. "10/60".
        """
        delta = _finite_scalar(delta_ms, source, f"{prefix}delta_ms")
        Delta = _finite_scalar(Delta_ms, source, f"{prefix}Delta_ms")
        if delta <= 0:
            raise InputError(source, f"{prefix}delta_ms", f"must be > 0, got {delta:g}")
        if Delta < delta:
            raise InputError(
                source, f"{prefix}delta_ms", f"must be <= Delta_ms ({Delta:g}), got {delta:g}"
            )
        bb, dd = _outer_measurements(b_values, directions, source, prefix)
        segments = ((delta, 1.0), (Delta - delta, 0.0), (delta, -1.0))
        return cls(name if name is not None else f"{delta:g}/{Delta:g}", segments, bb, dd)

    @classmethod
    def waveform(
        cls,
        segments,
        b_values: SequenceLike[float],
        directions,
        *,
        name: str = "waveform",
        source: str = "<waveform>",
        prefix: str = "",
    ) -> Sequence:
        """General piecewise-constant waveform, measurements as an outer product b x directions.

        segments: [(duration_ms, amplitude), ...]; rows ordered b outer, direction inner.
        """
        seg = _check_segments(segments, source, prefix)
        bb, dd = _outer_measurements(b_values, directions, source, prefix)
        if np.any(bb > 0) and _b_factor(seg) <= 0:
            raise InputError(source, f"{prefix}segments",
                             "waveform is zero: b > 0 cannot be reached")
        return cls(name, seg, bb, dd)

    # -- derived quantities -------------------------------------------------------------------

    @property
    def num_measurements(self) -> int:
        return int(self.b_s_per_mm2.size)

    @property
    def echo_time_ms(self) -> float:
        """TE = total waveform duration (ms)."""
        return float(sum(d for d, _ in self.segments))

    @property
    def is_pgse(self) -> bool:
        """True when the waveform is [(delta, +1), (Delta - delta, 0), (delta, -1)]."""
        s = self.segments
        return (
            len(s) == 3
            and (s[0][1], s[1][1], s[2][1]) == (1.0, 0.0, -1.0)
            and abs(s[0][0] - s[2][0]) <= _PGSE_RTOL * max(s[0][0], s[2][0])
            and s[0][0] > 0
        )

    @property
    def delta_ms(self) -> float | None:
        """Pulse duration delta (ms) of a PGSE sequence; None for other waveforms."""
        return self.segments[0][0] if self.is_pgse else None

    @property
    def Delta_ms(self) -> float | None:
        """Pulse separation Delta (ms) of a PGSE sequence; None for other waveforms."""
        return self.segments[0][0] + self.segments[1][0] if self.is_pgse else None

    @property
    def b_factor_ms3(self) -> float:
        """int_0^TE F(t)^2 dt in ms^3, exact; delta^2 (Delta - delta/3) for PGSE."""
        return _b_factor(self.segments)

    @property
    def b_ms_per_um2(self) -> np.ndarray:
        """(n,) b-values in ms/um^2."""
        return self.b_s_per_mm2 * MS_PER_UM2_PER_S_PER_MM2

    def q_per_um_ms(self) -> np.ndarray:
        """(n,) gradient strengths q = gamma |G| in 1/(um ms), from b = q^2 b_factor."""
        bf = self.b_factor_ms3
        if bf <= 0:
            return np.zeros_like(self.b_s_per_mm2)
        return np.sqrt(self.b_ms_per_um2 / bf)

    @property
    def breakpoints_ms(self) -> np.ndarray:
        """(len(segments) + 1,) segment boundaries 0 = t_0 <= ... <= t_K = TE (ms)."""
        return np.concatenate([[0.0], np.cumsum([d for d, _ in self.segments])])

    def amplitude(self, t_ms) -> np.ndarray:
        """f(t) at times t_ms (any shape): a_k on [t_k, t_{k+1}), 0 outside [0, TE)."""
        t = np.asarray(t_ms, dtype=float)
        edges = self.breakpoints_ms
        amps = np.array([a for _, a in self.segments] + [0.0])
        k = np.searchsorted(edges, t, side="right") - 1
        out = np.where((k >= 0) & (t < edges[-1]), amps[np.clip(k, 0, len(amps) - 1)], 0.0)
        return out

    def __repr__(self) -> str:
        return (
            f"Sequence(name={self.name!r}, segments={self.segments}, "
            f"num_measurements={self.num_measurements})"
        )


def _finite_scalar(value, source: str, field: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(source, field, f"must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(source, field, f"must be finite, got {v}")
    return v


def _normalise_file_directions(d: np.ndarray, b: np.ndarray, source: str, field: str) -> np.ndarray:
    """Renormalise directions read from text (few digits); zero rows allowed where b = 0."""
    norm = np.linalg.norm(d, axis=1)
    zero = norm == 0
    bad = (np.abs(norm - 1.0) > FILE_UNIT_TOL) & ((b > 0) | ~zero)
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        raise InputError(
            source, f"{field}[{k}]",
            f"must be a unit vector (zero only where b = 0), got norm {norm[k]:.6g}"
        )
    out = d.copy()
    out[~zero] /= norm[~zero, None]
    return out


# -- Camino --------------------------------------------------------------------------------------

_CAMINO_HEADER = "VERSION: STEJSKALTANNER"


def read_camino_scheme(path) -> list[Sequence]:
    """Read a Camino STEJSKALTANNER scheme file into PGSE sequences.

    File: optional '#' comment lines, the header "VERSION: STEJSKALTANNER", then one row per
    measurement "gx gy gz |G| DELTA delta TE" in SI units (T/m, s). b = gamma^2 |G|^2 delta^2
    (DELTA - delta/3) with gamma = 2.6751525e8 rad/s/T. Rows are grouped into one sequence per
    (delta, DELTA) in order of first appearance, keeping file order inside a group; sequences are
    named "delta/Delta" in ms (e.g. "10/60"). Rows with |G| = 0 have b = 0. Directions are
    renormalised (accepted to 1e-3). TE must be >= delta + DELTA; it is otherwise not used
    (the model's echo time is delta + DELTA: gradients are zero in any dead time).
    """
    source = str(path)
    lines = read_text_file(path, "scheme file").splitlines()
    rows: list[tuple[int, list[float]]] = []
    header_seen = False
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not header_seen:
            if line.replace(" ", "").upper() != _CAMINO_HEADER.replace(" ", ""):
                raise InputError(
                    source, f"line {lineno}", f"expected header {_CAMINO_HEADER!r}, got {line!r}"
                )
            header_seen = True
            continue
        parts = line.split()
        if len(parts) != 7:
            raise InputError(
                source, f"line {lineno}",
                f"expected 7 columns 'gx gy gz |G| DELTA delta TE', got {len(parts)}"
            )
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise InputError(source, f"line {lineno}", f"not numbers: {line!r}") from None
        if not all(math.isfinite(v) for v in vals):
            raise InputError(source, f"line {lineno}", "values must be finite")
        rows.append((lineno, vals))
    if not header_seen:
        raise InputError(source, None, f"missing header {_CAMINO_HEADER!r}")
    if not rows:
        raise InputError(source, None, "no measurement rows")

    groups: dict[tuple[float, float], list[tuple[int, list[float]]]] = {}
    for lineno, vals in rows:
        g, Delta_s, delta_s, te_s = vals[3], vals[4], vals[5], vals[6]
        field = f"line {lineno}"
        if g < 0:
            raise InputError(source, field, f"|G| must be >= 0, got {g:g}")
        if delta_s <= 0:
            raise InputError(source, field, f"delta must be > 0 s, got {delta_s:g}")
        if Delta_s < delta_s:
            raise InputError(source, field,
                             f"DELTA ({Delta_s:g} s) must be >= delta ({delta_s:g} s)")
        if te_s < Delta_s + delta_s - 1e-9:
            raise InputError(source, field, f"TE ({te_s:g} s) must be >= DELTA + delta")
        # Rounding to 1e-9 ms merges rows whose timings differ only by decimal round-off.
        key = (round(delta_s * 1e3, 9), round(Delta_s * 1e3, 9))
        groups.setdefault(key, []).append((lineno, vals))

    sequences = []
    for (delta_ms, Delta_ms), grp in groups.items():
        v = np.array([vals for _, vals in grp])
        g = v[:, 3]
        delta_s, Delta_s = delta_ms * 1e-3, Delta_ms * 1e-3
        b_s_per_m2 = GAMMA_RAD_PER_S_PER_T**2 * g**2 * delta_s**2 * (Delta_s - delta_s / 3.0)
        b = b_s_per_m2 * 1e-6
        d = v[:, :3].copy()
        k, bad_norm = _first_non_unit(d, b, FILE_UNIT_TOL)
        if k is not None:
            raise InputError(source, f"line {grp[k][0]}", "gradient direction must be a unit "
                             f"vector (zero only where |G| = 0), got norm {bad_norm:.6g}")
        norm = np.linalg.norm(d, axis=1)
        zero = norm == 0
        d[~zero] /= norm[~zero, None]
        segments = ((delta_ms, 1.0), (Delta_ms - delta_ms, 0.0), (delta_ms, -1.0))
        sequences.append(Sequence(f"{delta_ms:g}/{Delta_ms:g}", segments, b, d))
    return sequences


def write_camino_scheme(path, sequences: SequenceLike[Sequence]) -> None:
    """Write PGSE sequences to a Camino STEJSKALTANNER scheme file (SI units, TE = Delta + delta).

    Raises ValueError for a non-PGSE sequence (Camino STEJSKALTANNER cannot describe it).
    """
    out = [_CAMINO_HEADER]
    for seq in sequences:
        if not seq.is_pgse:
            raise ValueError(f"write_camino_scheme: sequence {seq.name!r} is not PGSE")
        delta_s, Delta_s = seq.delta_ms * 1e-3, seq.Delta_ms * 1e-3
        factor = GAMMA_RAD_PER_S_PER_T**2 * delta_s**2 * (Delta_s - delta_s / 3.0)
        g = np.sqrt(seq.b_s_per_mm2 * 1e6 / factor)
        for (gx, gy, gz), gm in zip(seq.directions, g):
            # repr() is the shortest text that reads back to the same double.
            row = (gx, gy, gz, gm, Delta_s, delta_s, Delta_s + delta_s)
            out.append(" ".join(repr(float(x)) for x in row))
    Path(path).write_text("\n".join(out) + "\n")


# -- FSL -----------------------------------------------------------------------------------------


def _read_table(path, source: str) -> list[list[float]]:
    text = read_text_file(path, "file")
    table = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            table.append([float(x) for x in line.split()])
        except ValueError:
            raise InputError(source, f"line {lineno}", f"not numbers: {line.strip()!r}") from None
    return table


def read_fsl(bvals_path, bvecs_path, delta_ms: float, Delta_ms: float, *,
             name: str | None = None) -> Sequence:
    """Read FSL bvals/bvecs into one PGSE sequence.

    bvals: whitespace-separated b-values in s/mm^2 (any line layout). bvecs: 3 rows x N
    (FSL convention, also used when N = 3) or N rows x 3. Directions are renormalised
    (accepted to 1e-3); zero vectors only where b = 0. The default name is "delta/Delta".
    """
    src_b, src_v = str(bvals_path), str(bvecs_path)
    b = np.array([x for row in _read_table(bvals_path, src_b) for x in row], dtype=float)
    if b.size == 0:
        raise InputError(src_b, None, "no b-values")
    if not np.all(np.isfinite(b)):
        raise InputError(src_b, "bvals", "must be finite")
    if np.any(b < 0):
        k = int(np.flatnonzero(b < 0)[0])
        raise InputError(src_b, f"bvals[{k}]", f"must be >= 0, got {b[k]:g}")
    table = _read_table(bvecs_path, src_v)
    lengths = {len(r) for r in table}
    if len(lengths) != 1:
        raise InputError(src_v, "bvecs", "rows have different lengths")
    v = np.array(table, dtype=float)
    if v.shape[0] == 3:
        v = v.T
    elif v.shape[1] != 3:
        raise InputError(src_v, "bvecs",
                         f"must be 3 rows x N or N rows x 3, got {v.shape[0]} x {v.shape[1]}")
    if v.shape[0] != b.size:
        raise InputError(
            f"{src_b}, {src_v}", "bvals/bvecs",
            f"{b.size} b-values in {src_b} but {v.shape[0]} directions in {src_v}"
        )
    if not np.all(np.isfinite(v)):
        raise InputError(src_v, "bvecs", "must be finite")
    v = _normalise_file_directions(v, b, src_v, "bvecs")
    # The timings are arguments, not file content: errors name the call.
    delta = _finite_scalar(delta_ms, "read_fsl", "delta_ms")
    Delta = _finite_scalar(Delta_ms, "read_fsl", "Delta_ms")
    if delta <= 0:
        raise InputError("read_fsl", "delta_ms", f"must be > 0, got {delta:g}")
    if Delta < delta:
        raise InputError("read_fsl", "delta_ms", f"must be <= Delta_ms ({Delta:g}), got {delta:g}")
    segments = ((delta, 1.0), (Delta - delta, 0.0), (delta, -1.0))
    return Sequence(name if name is not None else f"{delta:g}/{Delta:g}", segments, b, v)
