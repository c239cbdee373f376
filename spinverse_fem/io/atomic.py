"""Atomic file writes: the only place in the package that creates temporary files and replaces.

Every writer here writes into a temporary file `.<name>.<16 hex digits>.tmp` in the target's
folder and moves it onto the target with os.replace only when everything (the writing, the
close) succeeded. On any failure the temporary file is removed and the target is left as it was
(an existing target keeps its old content). A run killed by a signal can leave a temporary file
behind; `remove_stale_temp_files` recognises those by their name. The file written gets the mode
the user's umask gives (0o666 & ~umask), as a new file from open() would, also when it replaces
an existing file.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

_TOKEN_HEX = 16


def _temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(_TOKEN_HEX // 2)}.tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh empty temporary file next to `path`; it replaces `path` when the block ends
    without an exception. The caller writes it by name and must close it inside the block.

    The target's folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / _temp_name(path.name)
        try:
            # mode 0o666 with O_CREAT lets the kernel apply the umask (and default ACLs), unlike
            # mkstemp's 0o600; O_EXCL so a name clash never overwrites someone else's file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Yield an h5py.File open for writing that becomes `path` only if the block and the close
    succeed.

    The file is built in memory and written out in one piece afterwards: HDF5 writes its
    metadata lazily, so on a full disk a file written in place fails in h5py's close and object
    deallocation (a cascade of errors, then a segmentation fault). Here a full disk is one
    OSError from the final write, and the temporary file is removed.
    """
    buffer = io.BytesIO()
    with atomic_path(path) as tmp:
        with h5py.File(buffer, "w") as f:
            yield f
        with open(tmp, "wb") as out:
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)


def _json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write `data` (dicts, lists, tuples, str, numbers, bool, None) to `path` as JSON, atomically:
    indent 2, sorted keys, NaN and +-inf written as null."""
    # allow_nan=False: a non-finite number missed by _json_safe raises instead of writing the
    # non-standard token NaN that other JSON readers refuse
    text = json.dumps(_json_safe(data), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(path, text + "\n")


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """fig.savefig to `path` atomically; the format is `format=` or else the suffix of `path`
    (the temporary file's own suffix, .tmp, means nothing to matplotlib). The figure stays
    open."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", None) or path.suffix[1:]
    if not fmt:
        raise ValueError(f"{path}: no suffix to take the figure format from; pass format=")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)


def remove_stale_temp_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temporary files an interrupted atomic write of `folder/name` left behind and
    return their paths. Call it only when no other process is writing that target."""
    pattern = re.compile(re.escape(f".{name}.") + f"[0-9a-f]{{{_TOKEN_HEX}}}" + r"\.tmp")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if pattern.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
