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
        if state.adam is not None:
            for k in ("v", "m", "s"):
                f[f"adam/{k}"] = getattr(state.adam, k)
            f.attrs["adam_t"] = state.adam.t


def read_checkpoint(path: Path, fingerprint: str) -> RunState:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(str(path), None, f"cannot read checkpoint ({e})") from None
    with f:
        if f.attrs.get("fingerprint") != fingerprint:
            raise InputError(str(path), "fingerprint", "checkpoint belongs to a different "
                             "configuration or target; remove it or use another --out")
        st = RunState(x=np.asarray(f["x"]))
        st.stage = int(f.attrs["stage"])
        st.stage_iteration = int(f.attrs["stage_iteration"])
        st.global_iteration = int(f.attrs["global_iteration"])
        st.elapsed = float(f.attrs["elapsed"])
        st.done = bool(f.attrs["done"])
        st.modes = [int(m) for m in np.asarray(f["modes"])]
        if "stage_kappa" in f:
            st.stage_kappa = [np.asarray(f[f"stage_kappa/{i}"]) for i in
                              sorted(f["stage_kappa"].keys(), key=int)]
        st.history = {k: list(np.asarray(f[f"history/{k}"])) for k in HISTORY_KEYS}
        if "adam" in f:
            st.adam = AdamState(v=np.asarray(f["adam/v"]), m=np.asarray(f["adam/m"]),
                                s=np.asarray(f["adam/s"]), t=int(f.attrs["adam_t"]))
    return st


def fingerprint_of(cfg_text: str, targets) -> str:
    """A hash of the configuration text and the target signals: a checkpoint is resumed only
    by the run it belongs to."""
    h = hashlib.sha256(cfg_text.encode())
    for t in targets:
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()[:16]
