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

This module imports only the standard library, so the app can start the launcher before its own
heavy imports (app/main.py does, first thing) and the two import at the same time.

Fork safety: the launcher only imports. It opens no database, runs no torch or numba kernel and
starts no thread pool of its own, so a worker forked from it starts as clean as a fresh process.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# what a job imports, loaded before the first request (torch._dynamo: torch.func's first call
# imports it, 2-3 s; sklearn.manifold: the default t-SNE map layout)
WARM_MODULES = ("app.jobs.runner", "torch._dynamo", "sklearn.manifold", "sklearn.neighbors")


def warm() -> None:
    """Import what a job needs, plus ``PROPONENT_LAUNCHER_PRELOAD`` (comma-separated modules, for
    example the heavy libraries a project's model.py imports)."""
    import importlib

    extra = tuple(m.strip() for m in os.environ.get("PROPONENT_LAUNCHER_PRELOAD", "").split(",") if m.strip())
    for name in WARM_MODULES + extra:
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
                    if stdout.fileno() > 2:  # the protocol pipe is the launcher's, not the worker's
                        os.close(stdout.fileno())
                    _worker(root, job_id, log)
                reply = {"pid": pid}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    return 0


# ----------------------------------------------------------------------------- the app's side
def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Launcher:
    """Client of the warm launcher process (app/jobs/launcher.py), which forks job workers with the
    engine already imported. ``launch`` returns the worker's pid, or None when the launcher cannot
    be used (not Linux, disabled by ``PROPONENT_WARM_LAUNCHER=0``, failed to start, or died); the
    caller then starts a fresh worker process as before, so a job never depends on it."""

    READY_TIMEOUT_S = 60.0
    REPLY_TIMEOUT_S = 10.0

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buf = b""

    @staticmethod
    def enabled() -> bool:
        # fork after importing torch is safe on Linux; macOS' system frameworks are not fork-safe
        return sys.platform.startswith("linux") and os.environ.get("PROPONENT_WARM_LAUNCHER", "1") != "0"

    def start(self) -> None:
        """Start the launcher in the background (its imports run while the user looks at a page)."""
        if not self.enabled():
            return
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc, self._ready, self._buf = None, False, b""
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "app.jobs.launcher"], cwd=str(REPO), env=worker_env(),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, bufsize=0)
        except OSError:
            self._proc = None

    def _read_line(self, timeout: float) -> dict | None:
        """The launcher's next JSON reply within ``timeout`` s (any other line is skipped), else None."""
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                return msg

    def _stop_locked(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._proc, self._ready, self._buf = None, False, b""

    def would_wait(self) -> bool:
        """True while the launcher is still importing: a launch now would wait for it."""
        if not self.enabled():
            return False
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                return True  # launch() starts it first
            if self._ready:
                return False
            msg = self._read_line(0.0)
            if msg and msg.get("ready"):
                self._ready = True
            return not self._ready

    def launch(self, root: Path, job_id: str, log: Path) -> int | None:
        if not self.enabled():
            return None
        with self._lock:
            self._start_locked()
            if self._proc is None:
                return None
            if not self._ready:
                msg = self._read_line(self.READY_TIMEOUT_S)
                if not (msg and msg.get("ready")):
                    self._stop_locked()
                    return None
                self._ready = True
            try:
                self._proc.stdin.write((json.dumps({"root": str(root), "job": job_id, "log": str(log)}) + "\n").encode())
                self._proc.stdin.flush()
            except OSError:
                self._stop_locked()
                return None
            reply = self._read_line(self.REPLY_TIMEOUT_S)
            if not reply or "pid" not in reply:
                self._stop_locked()
                return None
            return int(reply["pid"])


LAUNCHER = Launcher()


def warm_launcher() -> None:
    """Start the warm launcher now, so the first job does not wait for its imports."""
    LAUNCHER.start()


if __name__ == "__main__":
    # the protocol gets its own copy of the pipe, and fd 1 becomes stderr: a library that prints while
    # it is imported cannot corrupt the replies
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    code = serve(stdout=protocol)
    try:
        protocol.close()
    except BrokenPipeError:
        pass
    sys.exit(code)
