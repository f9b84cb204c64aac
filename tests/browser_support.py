"""Shared by the browser tests: Chromium's flags, a free port, the app server, and 'wait until idle'."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(project_dir: Path, log_path: Path, extra_env: dict | None = None, wait_s: float = 90.0,
              threads: str | None = "1"):
    """`proponent app PROJECT` on a free loopback port; yields its base URL. The server runs in its
    own session so the whole process group ends with the test. ``threads``: PROPONENT_THREADS for
    its jobs (tests pin 1 to share the machine; None leaves the default, as a user runs it)."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    if threads is not None:
        env["PROPONENT_THREADS"] = threads
    env.pop("PROPONENT_SYNC_JOBS", None)
    cmd = [sys.executable, "-m", "engine.cli", "app", str(project_dir), "--server.port", str(port),
           "--server.headless", "true", "--server.fileWatcherType", "none"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while time.time() - t0 < wait_s:
            try:
                if urllib.request.urlopen(base + "/_stcore/health", timeout=1).read().strip() == b"ok":
                    break
            except OSError:
                time.sleep(0.1)
            if proc.poll() is not None:
                raise RuntimeError(Path(log_path).read_text())
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def wait_idle(page, timeout: float = 120.0, settle: float = 0.4) -> None:
    """Wait until [data-testid='stApp'] exists and its script is not running, stably for ``settle`` s."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout * 1000)
    t0 = time.time()
    quiet_since = None
    while time.time() - t0 < timeout:
        state = page.get_attribute("[data-testid='stApp']", "data-test-script-state")
        running = state in ("running", "initial", "rerunRequested") or page.locator("[data-testid='stStatusWidget'] "
                                                                                    "button:has-text('Stop')").count()
        if not running:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= settle:
                return
        else:
            quiet_since = None
        time.sleep(0.1)
    raise TimeoutError(f"app still running after {timeout}s")
