"""Store writes on a background thread, in order, so the next block is computed while this one reaches the disk.

A training-gradient store at scale is gigabytes (EK-FAC's unprojected bfloat16 gradients: 3.6 GB at
20,000 images), and each part is written and flushed (``fsync``) before its chunk is marked done. On
the shared CPU machine those writes took 0.7-3 s per 0.9 GB, time the gradient pass stood still for.
``os.pwrite`` and ``os.fsync`` release the GIL, so one writer thread overlaps them with the next
part's gradients.

Guarantees kept from the synchronous writes:
- order: tasks run one after another in the order submitted, so a chunk's done mark (submitted after
  its rows) is written only after its rows are on disk;
- failures: the first task that raises stops every later one (no done mark after a failed row write)
  and is raised in the caller's thread, at the next :meth:`submit` or at :meth:`close`;
- memory: at most ``depth`` submitted tasks wait (their arguments, a part each, are the only extra
  copies held).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_STOP = object()


class BackgroundWriter:
    """One writer thread running submitted calls in order; use as a context manager."""

    def __init__(self, depth: int = 2, name: str = "proponent-store-writer"):
        self._tasks: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is _STOP:
                return
            if self._error is not None:
                continue  # after a failure nothing else runs (the caller hears of it)
            fn, args = task
            try:
                fn(*args)
            except BaseException as e:  # handed to the caller's thread
                self._error = e

    def _raise_failure(self) -> None:
        if self._error is not None:  # kept: every later submit and close raises it too
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` (blocks while ``depth`` tasks wait); raises an earlier task's failure."""
        self._raise_failure()
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._tasks.put((fn, args))

    def close(self) -> None:
        """Wait for every queued task, stop the thread, and raise a failure that has not been raised."""
        if not self._closed:
            self._closed = True
            self._tasks.put(_STOP)
            self._thread.join()
        self._raise_failure()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
            return
        # the body failed (or was cancelled): still let what it queued finish, so written rows and done
        # marks stay consistent, and let the body's exception be the one that propagates
        try:
            self.close()
        except BaseException:
            pass
