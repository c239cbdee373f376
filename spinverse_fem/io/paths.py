"""Where a command writes: refuse, before anything is computed or written, an output that would
destroy an input or cannot be written, and keep two runs out of one output folder.

    check_outputs(outputs, inputs, comm)   # outputs: Output(...) or paths; inputs: paths
    with OutputLock(folder, comm): ...      # one run per output folder

Every decision is taken on rank 0 and broadcast (`on_root`), so all ranks raise the same
InputError(output, option, message) and no rank waits for one that failed. The command line
turns that into one message and exit code 2.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from spinverse_fem.errors import InputError

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Output:
    """One output of a command: `path` as the user gave it, the option that named it (`field`,
    e.g. "--out"), `kind` "file" (written atomically: a temporary file in its folder, then
    renamed) or "dir" (a folder the command creates and fills with `files`)."""

    path: str | os.PathLike
    field: str = "--out"
    kind: str = "file"
    files: tuple[str, ...] = ()


def on_root(comm, fn):
    """fn() on rank 0, its result (or its InputError) on every rank.

    With comm None or one rank, fn() simply runs. Otherwise rank 0 runs it and broadcasts
    the outcome: a result, an InputError (raised on every rank, same file, field and message)
    or any other exception (re-raised on rank 0; the other ranks raise a RuntimeError saying
    rank 0 failed), so that no rank is left waiting.
    """
    if comm is None or comm.size == 1:
        return fn()
    outcome = None
    error = None
    if comm.rank == 0:
        try:
            outcome = ("ok", fn())
        except InputError as e:
            outcome = ("input", (e.source, e.field, e.message))
        except BaseException as e:  # noqa: BLE001  (re-raised below, after the broadcast)
            error = e
            outcome = ("other", f"{type(e).__name__}: {e}")
    outcome = comm.bcast(outcome, root=0)
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "input":
        raise InputError(*value)
    if error is not None:
        raise error
    raise RuntimeError(f"rank 0 failed: {value}")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when a and b name the same file: os.path.samefile when both exist (hard links,
    symbolic links, different spellings), else the fully resolved paths compared."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        try:
            return Path(a).resolve() == Path(b).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return False


def check_outputs(outputs, inputs=(), comm=None, *, create: bool = False) -> list[Path]:
    """Refuse outputs that cannot be written or would replace an input (InputError naming the
    output and its option, on every rank of comm).

    outputs: Output objects or plain paths (a file named by --out). inputs: paths (None
    entries are skipped) or (label, path) pairs, e.g. ("config", "run.toml").
    A file output must be a non-empty path that is not a folder, not a device or other special
    file, not the same file as any input, and whose folder exists or can be created (no file
    in the way, writable). A folder output ("dir") likewise, and none of its `files` may be an
    input or a folder. create: make the "dir" outputs (rank 0) once all checks passed.
    Returns the folders created (on every rank), for `remove_if_empty` after a failed run.
    """
    outs = [o if isinstance(o, Output) else Output(o) for o in outputs]
    ins = []
    for item in inputs:
        label, path = item if isinstance(item, tuple) else ("input", item)
        if path is not None and str(path) != "":
            ins.append((label, path))

    def verdict():
        for o in outs:
            _check_one(o, ins)
        created = []
        if create:
            for o in outs:
                if o.kind == "dir" and not Path(o.path).is_dir():
                    try:
                        Path(o.path).mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise InputError(str(o.path), o.field, "cannot create the output "
                                         f"folder ({e.strerror or e})") from None
                    created.append(Path(o.path))
        return created

    return on_root(comm, verdict)


def remove_if_empty(folders, comm=None) -> None:
    """Remove (rank 0) the folders check_outputs created if a failed run left them empty."""
    if comm is not None and comm.rank != 0:
        return
    for folder in folders:
        try:
            Path(folder).rmdir()
        except OSError:
            pass


def _check_one(o: Output, inputs) -> None:
    raw = str(o.path) if o.path is not None else ""
    if raw.strip() == "":
        raise InputError(repr(raw), o.field, "empty path: name an output "
                         + ("folder" if o.kind == "dir" else "file"))
    p = Path(raw).expanduser()
    src = str(o.path)
    if o.kind == "dir":
        if p.exists() and not p.is_dir():
            raise InputError(src, o.field, "is a file, not a folder: the output folder cannot "
                             "be created there (give a folder name, e.g. out/)")
        _check_folder(p, src, o.field)
        for name in o.files:
            _check_file(p / name, f"{src}/{name}", o.field, inputs)
    else:
        _check_file(p, src, o.field, inputs)
        _check_folder(p.parent, src, o.field)


def _check_file(p: Path, src: str, field: str, inputs) -> None:
    if p.is_dir():
        raise InputError(src, field, "is a folder; a file name is expected (e.g. "
                         f"{p / 'signals.h5'})")
    if p.exists() and not p.is_file():
        raise InputError(src, field, "is not a regular file (a device, socket or pipe); "
                         "refusing to replace it")
    for label, path in inputs:
        if same_file(p, path):
            raise InputError(src, field, f"is the same file as the {label} {path}: writing "
                             "it would destroy that input; choose another output")


def _check_folder(folder: Path, src: str, field: str) -> None:
    """The folder exists and is writable, or the part of it that exists lets it be created."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists():
        if existing.is_symlink():
            raise InputError(src, field, f"{existing} is a dangling symbolic link")
        parent = existing.parent
        if parent == existing:
            break
        existing = parent
    if not existing.is_dir():
        raise InputError(src, field, f"cannot create the folder {folder}: {existing} is a "
                         "file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "folder" if existing == folder else f"folder {existing} (to create {folder})"
        raise InputError(src, field, f"the {what} is not writable"
                         + (" (read-only file system)" if _read_only(existing) else ""))


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class OutputLock:
    """One run per output folder: an exclusive flock(2) on FOLDER/.lock, taken on rank 0 and
    held until `release()` (or the end of the `with` block); the kernel drops it when the
    process dies, however it dies, so a killed run never blocks the next one.

    The file records the holder's PID and host. A second run that finds the lock held is
    refused with InputError(folder, field, "... PID ... is writing into this folder") on every
    rank. A lock file whose holder is gone (a run killed by SIGKILL leaves the file, not the
    lock) is taken over; `note` then says whose it was. The file is removed on release.
    """

    def __init__(self, folder: str | os.PathLike, comm=None, field: str = "--out"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.comm = comm
        self.field = field
        self.note: str | None = None
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.note = on_root(self.comm, self._acquire_here)
        return self

    def _acquire_here(self) -> str | None:
        for _ in range(10):  # retried only when the file was replaced while we locked it
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise InputError(str(self.folder), self.field, f"cannot create the lock file "
                                 f"{self.path} ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise InputError(str(self.folder), self.field, "another run"
                                 + (f" ({holder})" if holder else "") + " is writing into this "
                                 f"folder (lock {self.path}); wait for it to finish or choose "
                                 "another --out") from None
            except OSError as e:  # a file system without flock
                os.close(fd)
                return (f"note: cannot lock {self.folder} ({e.strerror or e}); make sure no "
                        "other run writes into it")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            previous = _read_holder(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            self._fd = fd
            if previous:
                return (f"note: took over the lock of an earlier run ({previous}) that ended "
                        "without releasing it")
            return None
        raise InputError(str(self.folder), self.field, f"cannot take the lock {self.path}: "
                         "it keeps being replaced by another run")

    def release(self) -> None:
        """Remove the lock file and drop the lock (rank 0; no communication)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'PID n on host h' from a lock file's content ('' if empty or unreadable)."""
    try:
        parts = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
    except OSError:
        return ""
    if len(parts) >= 2 and parts[0].isdigit():
        return f"PID {parts[0]} on {parts[1]}"
    return ""
