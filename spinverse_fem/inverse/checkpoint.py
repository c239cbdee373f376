"""Checkpoints of an inversion: everything needed to continue a run bit-for-bit the same way,
written atomically (temp file + rename) by rank 0 after every optimiser segment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np

from spinverse_fem.errors import InputError
from spinverse_fem.inverse.driver import HISTORY_KEYS, RunState
from spinverse_fem.inverse.optimisers import AdamState
from spinverse_fem.io.atomic import atomic_h5


def write_checkpoint(path: Path, state: RunState, fingerprint: str) -> None:
    """Atomic (temp file + rename): a killed run never leaves a half-written checkpoint."""
    with atomic_h5(path) as f:
        f["x"] = state.x
        f.attrs["stage"] = state.stage
        f.attrs["stage_iteration"] = state.stage_iteration
        f.attrs["global_iteration"] = state.global_iteration
        f.attrs["elapsed"] = state.elapsed
        f.attrs["done"] = state.done
        f.attrs["fingerprint"] = fingerprint
        f["modes"] = np.asarray(state.modes, dtype=np.int64)
        for i, k in enumerate(state.stage_kappa):
            f[f"stage_kappa/{i}"] = k
        for k, v in state.history.items():
            f[f"history/{k}"] = np.asarray(v, dtype=float)
        if state.basis_x is not None:
            f["basis_x"] = state.basis_x
            f.attrs["basis_iteration"] = state.basis_iteration
        if state.adam is not None:
            for k in ("v", "m", "s"):
                f[f"adam/{k}"] = getattr(state.adam, k)
            f.attrs["adam_t"] = state.adam.t


def read_checkpoint(path: Path, fingerprint: str | None, num_parameters: int | None = None,
                    num_stages: int | None = None) -> RunState:
    """The RunState of a checkpoint. InputError naming the file and the field for a file that
    is not a readable HDF5 checkpoint (truncated, damaged, a dataset or attribute missing or of
    the wrong type or shape), belongs to another run (fingerprint; None: not checked, e.g. to
    refuse a damaged file before the targets that the fingerprint needs are computed), or does
    not fit the run: x of length num_parameters, stage in [0, num_stages] (when given)."""
    src = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(src, None, f"cannot read checkpoint ({e}); remove it to start "
                         "afresh") from None
    field = None

    def need(name, fn):
        """fn() with `name` as the field any failure is reported against."""
        nonlocal field
        field = name
        return fn()

    try:
        with f:
            fp = need("fingerprint", lambda: f.attrs.get("fingerprint"))
            if isinstance(fp, bytes):
                fp = fp.decode("utf-8", errors="replace")
            if fingerprint is not None and fp != fingerprint:
                raise InputError(src, "fingerprint", "checkpoint belongs to a different "
                                 "configuration or target; remove it or use another --out")
            st = RunState(x=need("x", lambda: _floats(f["x"], 1)))
            st.stage = need("stage", lambda: _int_attr(f, "stage"))
            st.stage_iteration = need("stage_iteration", lambda: _int_attr(f, "stage_iteration"))
            st.global_iteration = need("global_iteration",
                                       lambda: _int_attr(f, "global_iteration"))
            st.elapsed = need("elapsed", lambda: float(f.attrs["elapsed"]))
            st.done = need("done", lambda: bool(f.attrs["done"]))
            st.modes = need("modes", lambda: [int(m) for m in _ints(f["modes"])])
            if "stage_kappa" in f:
                keys = need("stage_kappa", lambda: sorted(f["stage_kappa"].keys(), key=int))
                st.stage_kappa = [need(f"stage_kappa/{k}", lambda k=k: _floats(
                    f[f"stage_kappa/{k}"], 1)) for k in keys]
            st.history = {k: need(f"history/{k}", lambda k=k: list(_floats(f[f"history/{k}"], 1)))
                          for k in HISTORY_KEYS}
            if "basis_x" in f:
                st.basis_x = need("basis_x", lambda: _floats(f["basis_x"], 1))
                st.basis_iteration = need("basis_iteration",
                                          lambda: _int_attr(f, "basis_iteration"))
            if "adam" in f:
                st.adam = AdamState(v=need("adam/v", lambda: _floats(f["adam/v"], 1)),
                                    m=need("adam/m", lambda: _floats(f["adam/m"], 1)),
                                    s=need("adam/s", lambda: _floats(f["adam/s"], 1)),
                                    t=need("adam_t", lambda: _int_attr(f, "adam_t")))
    except InputError:
        raise
    except (KeyError, OSError, ValueError, TypeError, RuntimeError) as e:
        missing = isinstance(e, KeyError) or "doesn't exist" in str(e)
        raise InputError(src, field, ("missing" if missing else f"cannot be read ({e})")
                         + ": the checkpoint is damaged or incomplete; remove it to start "
                         "afresh") from None
    _check_consistent(st, src, num_parameters, num_stages)
    return st


def _floats(dataset, ndim: int) -> np.ndarray:
    if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "iuf":
        raise ValueError(f"expected a numeric dataset, got {dataset!r}")
    a = np.asarray(dataset[()], dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"expected {ndim} dimension(s), got shape {a.shape}")
    return a


def _ints(dataset) -> np.ndarray:
    a = _floats(dataset, 1)
    if not np.all(a == np.round(a)):
        raise ValueError("expected integers")
    return a.astype(np.int64)


def _int_attr(f, name: str) -> int:
    v = f.attrs[name]
    if isinstance(v, (bytes, str)) or not float(v) == int(v):
        raise ValueError(f"expected an integer, got {v!r}")
    return int(v)


def _check_consistent(st: RunState, src: str, num_parameters, num_stages) -> None:
    def bad(field, message):
        return InputError(src, field, message + "; remove the checkpoint to start afresh")

    if num_parameters is not None and st.x.shape != (num_parameters,):
        raise bad("x", f"has {st.x.size} values, the run has {num_parameters} parameters")
    if not np.all(np.isfinite(st.x)):
        raise bad("x", "contains non-finite values")
    if num_stages is not None and not 0 <= st.stage <= num_stages:
        raise bad("stage", f"is {st.stage}, the run has {num_stages} stages")
    if min(st.stage, st.stage_iteration, st.global_iteration) < 0:
        raise bad("stage_iteration", "negative stage or iteration counters")
    lengths = {len(v) for v in st.history.values()}
    if len(lengths) > 1:
        raise bad("history", f"the history series have different lengths {sorted(lengths)}")
    if st.basis_x is not None and st.basis_x.shape != st.x.shape:
        raise bad("basis_x", f"has {st.basis_x.size} values, the run has {st.x.size} parameters")
    if st.adam is not None:
        for name in ("v", "m", "s"):
            if getattr(st.adam, name).shape != st.x.shape:
                raise bad("x", f"has {st.x.size} values, but adam/{name} has "
                          f"{getattr(st.adam, name).size}: the datasets do not belong together")


def fingerprint_of(cfg_text: str, targets) -> str:
    """A hash of the configuration text and the target signals: a checkpoint is resumed only
    by the run it belongs to."""
    h = hashlib.sha256(cfg_text.encode())
    for t in targets:
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()[:16]
