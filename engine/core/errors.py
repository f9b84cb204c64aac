"""Errors that reach the user as one line: file, row and problem."""
from __future__ import annotations

from pathlib import PurePath

# lines before a table's first data row: a CSV's header; JSON Lines have none; Parquet has no lines
_LINES_BEFORE_ROW0 = {".csv": 1, ".tsv": 1, ".txt": 1, ".jsonl": 0, ".ndjson": 0, ".json": 0}


def line_of_row(file: str | None, row: int) -> int | None:
    """The 1-based line of 0-based data row ``row`` in ``file``, by its kind; None for files without lines."""
    suffix = PurePath(str(file)).suffix.lower() if file is not None else ".csv"
    before = _LINES_BEFORE_ROW0.get(suffix, None if suffix in (".parquet", ".pq") else 1)
    return None if before is None else row + 1 + before


class ProponentError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, lines: bool = True):
        self.file = file
        self.row = row
        parts = []
        if file is not None:
            parts.append(str(file))
        if row is not None:
            # rows are 0-based positions among the table's data rows, the same numbering as the
            # indexes in every output; the line number is given too for editors (``lines=False``:
            # the rows are not lines, e.g. the entries of a JSON list).
            line = line_of_row(file, row) if lines else None
            parts.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        parts.append(message)
        super().__init__(": ".join(parts))


class ValidationError(ProponentError):
    """The project folder is not valid."""


class Cancelled(ProponentError):
    """A run was cancelled; what was written so far is kept and the run resumes."""

    exit_code = 130
