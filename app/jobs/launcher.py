"""A warm job launcher: ``python -m app.jobs.launcher``, one per app server.

A job worker started from nothing spends 4-6 s importing (torch, numpy, scipy, pandas, the engine,
and torch's compiler front end, which ``torch.func`` pulls in on first use) before it does any
work: on digits that was a third of Run → first proponents. The launcher pays that once: it
imports everything a job needs, then forks one worker per request. A forked worker starts in
about 20 ms with the modules already loaded, in its own session (it outlives the app, as a
worker started by ``subprocess`` does), with its output in the job's log.

Protocol: one JSON line per request on stdin, ``{"root": ..., "job": ..., "log": ...}``; one line
back on stdout, ``{"pid": N}`` or ``{"error": "..."}``. The first line the launcher writes is
``{"ready": true}``, once its imports are done. EOF on stdin (the app ended) ends the launcher;
the workers it started keep running.

Fork safety: the launcher only imports. It opens no database, runs no torch or numba kernel and
starts no thread pool of its own, so a worker forked from it starts as clean as a fresh process.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback

# what a job imports, loaded before the first request (torch._dynamo: torch.func's first call
# imports it, 2-3 s; sklearn.manifold: the default t-SNE map layout)
WARM_MODULES = ("app.jobs.runner", "torch._dynamo", "sklearn.manifold", "sklearn.neighbors")


def warm() -> None:
    import importlib

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module missing only costs its import in the worker
            traceback.print_exc()


def _worker(root: str, job_id: str, log: str) -> None:
    """In the forked child: detach, send output to the job's log, run the job, never return."""
    rc = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the launcher ignores it; the job may wait on children
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        from app.jobs.runner import main

        rc = main([root, job_id])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def serve(stdin=None, stdout=None) -> int:
    try:
        return _serve(stdin or sys.stdin, stdout or sys.stdout)
    except (BrokenPipeError, KeyboardInterrupt):  # the app went away: nothing left to serve
        return 0


def _serve(stdin, stdout) -> int:
    warm()
    # finished workers are reaped by the kernel (no zombies); each worker restores the default
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    stdout.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    stdout.flush()
    for line in stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            root, job_id, log = str(req["root"]), str(req["job"]), str(req["log"])
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": f"bad request: {e}"}
        else:
            try:
                pid = os.fork()
            except OSError as e:
                reply = {"error": f"fork failed: {e}"}
            else:
                if pid == 0:
                    _worker(root, job_id, log)
                reply = {"pid": pid}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    code = serve()
    try:
        sys.stdout.close()
    except BrokenPipeError:
        pass
    sys.exit(code)
