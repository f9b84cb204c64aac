"""Errors that reach the user as one line: file, row and problem."""
from __future__ import annotations


class ProponentError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None):
        self.file = file
        self.row = row
        parts = []
        if file is not None:
            parts.append(str(file))
        if row is not None:
            # rows are 0-based positions among the CSV's data rows, the same numbering as the
            # indexes in every output; the line number is given too for editors.
            parts.append(f"row {row} (line {row + 2})")
        parts.append(message)
        super().__init__(": ".join(parts))


class ValidationError(ProponentError):
    """The project folder is not valid."""


class Cancelled(ProponentError):
    """A run was cancelled; what was written so far is kept and the run resumes."""

    exit_code = 130
