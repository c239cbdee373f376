"""What the commands share about their output files: the inputs no output may replace, stale
temporary files of a killed run, and one message for a write that failed."""

from __future__ import annotations

from spinverse_fem.errors import InputError


def config_inputs(args_config, cfg) -> list[tuple[str, object]]:
    """(label, path) of the configuration and every file it reads (grid, ground truth,
    protocol files): what no output may replace."""
    return [("configuration", args_config),
            *((f"file of {field}", path) for field, path in cfg.input_files)]


def remove_stale(comm, folder, names) -> None:
    """Remove (rank 0) the temporary files a killed earlier run left for these outputs."""
    from spinverse_fem.io.atomic import remove_stale_temp_files

    if comm.rank != 0:
        return
    removed = [p for name in names for p in remove_stale_temp_files(folder, name)]
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) of an interrupted earlier run: "
              + ", ".join(str(p) for p in removed), flush=True)


def write_failed(path, e: OSError) -> InputError:
    """An output that could not be written (disk full, quota, permissions changed)."""
    return InputError(str(path), "--out", f"cannot write ({e.strerror or e}); nothing was "
                      "written")
