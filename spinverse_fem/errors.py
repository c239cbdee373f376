"""User-facing errors: one clear message naming the file and the field."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (config, protocol, mesh or signal file).

    The command line turns it into one message on stderr and exit code 2.
    """

    def __init__(self, source: str, field: str | None, message: str):
        self.source = str(source)
        self.field = field
        self.message = message
        where = f"{self.source}: {field}" if field else self.source
        super().__init__(f"{where}: {message}")


class SolverError(RuntimeError):
    """A numerical solver did not converge or failed a correctness check (exit code 2)."""
