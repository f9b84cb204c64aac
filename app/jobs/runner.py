"""Worker process of one background job: ``python -m app.jobs.runner PROJECT_ROOT JOB_ID``.

Cancel is cooperative first: the job's stages poll the status between chunks and stop at the next
one (finished chunks are kept). A stage inside one long library call (a UMAP layout, a kernel
solve, a retrain's epoch) cannot poll, so a watchdog thread here ends the process
``CANCEL_GRACE_S`` after the request if it is still running. Every store is written atomically
(temp file, then rename), so what is on disk stays whole and a rerun resumes from it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from app.jobs.queue import run_job, worker_tag
from engine.storage.statedb import StateDB

CANCEL_GRACE_S = 1.5
POLL_S = 0.25


def watch_cancel(root: str, job_id: str, grace: float = CANCEL_GRACE_S, poll: float = POLL_S) -> threading.Thread:
    """A daemon thread that ends this process when the job has been 'cancelling' for ``grace`` s."""
    db = StateDB(Path(root) / ".proponent" / "state.db")

    def _watch():
        since = None
        while True:
            time.sleep(poll)
            try:
                j = db.get_job(job_id)
            except Exception:  # a busy database: look again at the next poll
                continue
            if j is None or j["status"] not in ("queued", "running", "cancelling"):
                return
            if j["status"] != "cancelling":
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= grace:
                db.upsert_job(job_id, status="cancelled",
                              message=f"cancelled (stopped {grace:g} s after the request, inside '{j.get('stage')}')")
                os._exit(1)

    t = threading.Thread(target=_watch, name="cancel-watchdog", daemon=True)
    t.start()
    return t


def name_process(job_id: str) -> None:
    """Name this process after its job (Linux: /proc/self/comm), before the job's row says 'running':
    a worker forked by the warm launcher has the launcher's command line, and the queue tells it from
    an unrelated process that later got its pid by this name (app.jobs.queue._is_worker)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(worker_tag(job_id))
    except OSError:  # no /proc: the queue trusts the pid, as before
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m app.jobs.runner PROJECT_ROOT JOB_ID", file=sys.stderr)
        return 2
    name_process(argv[1])
    watch_cancel(argv[0], argv[1])
    j = run_job(argv[0], argv[1])
    return 0 if j and j["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
