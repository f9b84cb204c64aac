"""The one memory meter: the process's resident set sampled in the background.

Peak memory is the resident set read from /proc every 5 ms (peak above the level at the start,
and the absolute peak); off Linux, the process-lifetime maximum.
"""
from __future__ import annotations

import os
import resource
import threading

__all__ = ["MemorySampler", "rss_bytes", "peak_rss_mb"]


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): ``VmHWM``, which starts afresh at ``exec``.
    ``ru_maxrss`` does not: Linux carries it over ``fork`` + ``exec``, so a measured child started
    by a 1.5 GB parent reported 1.5 GB however little it used (found in scripts/bench_scale.py)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: lifetime max only
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemorySampler:
    """``with MemorySampler() as m: ...`` then ``m.peak_mb`` (absolute) and ``m.extra_mb`` (above the start)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=1.0)
        self.peak = max(self.peak, rss_bytes())
        return False

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def extra_mb(self) -> float:
        return max(0, self.peak - self.start) / 2**20
