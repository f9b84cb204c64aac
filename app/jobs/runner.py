"""Worker process of one background job: ``python -m app.jobs.runner PROJECT_ROOT JOB_ID``."""
from __future__ import annotations

import sys

from app.jobs.queue import run_job


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m app.jobs.runner PROJECT_ROOT JOB_ID", file=sys.stderr)
        return 2

    j = run_job(argv[0], argv[1])
    return 0 if j and j["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
