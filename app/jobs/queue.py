"""Background jobs that survive a page reload.

A job is a row of the project's SQLite ``jobs`` table (engine.storage.arrays.StateDB) and a separate
worker process (``python -m app.jobs.runner PROJECT JOB_ID``). The worker writes its progress
(stage, done, total, examples/s, ETA) to the row; pages poll the row. Cancelling sets the
status to ``cancelling``; the worker sees it through the Attributor ``cancel`` callback,
stops at the next chunk (finished chunks are kept, a rerun resumes) and marks the job
``cancelled``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from app import services as svc
from app.jobs.launcher import LAUNCHER, REPO, worker_env, warm_launcher  # noqa: F401
from engine.api import cached_scores
from engine.core.errors import Cancelled, ProponentError
from engine.core.progress import RateTracker
from engine.storage.arrays import jsonable
from engine.storage.statedb import StateDB
from engine.workflows.counterfactual import counterfactual_check
from engine.workflows.embeddings import DEFAULT_REDUCER, compute_embedding
from engine.workflows.leaks import detect_copies, detect_leaks
from engine.workflows.mislabel import recommended_ranking
from engine.workflows.whatif import compare_edits, predict_edit, retrain_edit

ACTIVE = ("queued", "running", "cancelling")
KINDS = ("attribute", "embedding", "verify", "whatif", "leaks", "copies", "query", "suspect", "triage")


def _db(root: str | Path) -> StateDB:
    return StateDB(Path(root) / ".proponent" / "state.db")


def _root(project) -> Path:
    """A Project or a project folder (str / Path; note a Path's own ``.root`` is "/")."""
    if isinstance(project, (str, os.PathLike)):
        return Path(project)
    return Path(project.root)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child (finished, not reaped) counts as dead
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# a worker forked by the warm launcher keeps the launcher's command line, so app.jobs.runner names the
# process (its comm, at most 15 characters) after its job: WORKER_TAG + the job id's random part
WORKER_TAG = "pjob-"


def worker_tag(job_id: str) -> str:
    return (WORKER_TAG + str(job_id).rsplit("-", 1)[-1])[:15]


def _is_worker(pid: int, job_id: str, status: str) -> bool | None:
    """Whether live process ``pid`` is the worker of ``job_id`` and not an unrelated process that got
    its pid later (after a reboot, or on a busy machine): its command line is ``-m app.jobs.runner ...
    JOB_ID``, or (forked by the warm launcher, app/jobs/launcher.py) the launcher's, with the process
    named after the job once the runner started. None where it cannot be told (no /proc): the caller
    then trusts the pid, as before."""
    if int(pid) == os.getpid():
        return True  # a job run in this process (background=False)
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{int(pid)}/comm") as f:
            comm = f.read().strip()
    except FileNotFoundError:
        return False if Path("/proc/self/cmdline").exists() else None  # it ended since the check
    except OSError:
        return None
    if "app.jobs.runner" in args:
        return str(job_id) in args
    if "app.jobs.launcher" in args:
        # just forked, before the runner named itself, the job is still queued
        return comm == worker_tag(job_id) or (status == "queued" and not comm.startswith(WORKER_TAG))
    return False


def _worker_alive(j: dict) -> bool:
    return _alive(j["pid"]) and _is_worker(j["pid"], j["id"], j["status"]) is not False


def _run_key_of(j: dict) -> str | None:
    """The run (runs table) a job computes, as its worker recorded it (see :func:`run_job`)."""
    res = j.get("result") if isinstance(j.get("result"), dict) else {}
    return res.get("run_key") or (res.get("key") if j.get("kind") == "attribute" else None)


def _fail_run(db: StateDB, j: dict, message: str) -> None:
    """The job's worker is gone: its run row, if still 'running', is failed too (a killed worker cannot
    say so, and the row would read 'running' for ever), unless another live job computes it."""
    key = _run_key_of(j)
    if not key:
        return
    run = db.get_run(key)
    if run is None or run["status"] != "running":
        return
    for other in db.list_jobs(200):
        if (other["id"] != j["id"] and other["status"] in ACTIVE and _run_key_of(other) == key
                and other.get("pid") and _worker_alive(other)):
            return
    db.upsert_run(key, status="failed", message=message)


def job_signature(kind: str, params: dict) -> str:
    return json.dumps({"kind": kind, **params}, sort_keys=True, default=str)


def find_active(project, kind: str, params: dict) -> dict | None:
    sig = job_signature(kind, params)
    for j in list_jobs(project):
        if j["status"] in ACTIVE and job_signature(j["kind"], j.get("params") or {}) == sig:
            return j
    return None


def create_job(project, kind: str, params: dict) -> str:
    if kind not in KINDS:
        raise ProponentError(f"unknown job kind {kind!r}")
    job_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:8]
    _db(_root(project)).upsert_job(job_id, kind=kind, params=params, status="queued", stage="queued", done=0, total=0)
    return job_id


def start_job(project, kind: str, params: dict, *, background: bool = True) -> str:
    """Queue a job and start its worker process (or run it here when ``background`` is False).
    An identical job already running is returned instead of starting a second one."""
    prior = find_active(project, kind, params)
    if prior is not None:
        refresh(project, prior["id"])
        prior = get_job(project, prior["id"])
        if prior and prior["status"] in ACTIVE:
            return prior["id"]
    job_id = create_job(project, kind, params)
    root = _root(project)
    if not background:
        run_job(root, job_id)
        return job_id
    log_dir = root / ".proponent" / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir / f"{job_id}.log").resolve()
    if LAUNCHER.would_wait():
        # the launcher is still importing (the app just started): the page returns now with the job
        # queued, and the worker starts as soon as the launcher is ready (a fresh process would not be sooner)
        threading.Thread(target=_start_worker, args=(root.resolve(), job_id, log_path), daemon=True,
                         name=f"start-{job_id}").start()
    else:
        _start_worker(root.resolve(), job_id, log_path)
    return job_id


def _start_worker(root: Path, job_id: str, log_path: Path) -> None:
    pid = LAUNCHER.launch(root, job_id, log_path)
    if pid is None:  # no warm launcher: a fresh worker process
        with open(log_path, "wb") as log:
            pid = subprocess.Popen([sys.executable, "-m", "app.jobs.runner", str(root), job_id], cwd=str(REPO),
                                   env=worker_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True).pid
    _db(root).upsert_job(job_id, pid=pid)


def get_job(project, job_id: str) -> dict | None:
    return _db(_root(project)).get_job(job_id)


def list_jobs(project, limit: int = 50) -> list[dict]:
    return _db(_root(project)).list_jobs(limit)


# a queued job whose worker never got a pid (the app ended while its launcher was still importing)
NEVER_STARTED_S = 180.0


def refresh(project, job_id: str) -> dict | None:
    """The job's row, marking it failed if its worker died without saying so."""
    db = _db(_root(project))
    j = db.get_job(job_id)
    if j and j["status"] == "queued" and not j.get("pid") and time.time() - float(j["created"]) > NEVER_STARTED_S:
        db.upsert_job(job_id, status="failed", message="the worker process never started; run it again")
        return db.get_job(job_id)
    if j and j["status"] in ACTIVE and j.get("pid") and not _worker_alive(j):
        time.sleep(0.2)
        j = db.get_job(job_id)
        if j["status"] in ACTIVE:
            status = "cancelled" if j["status"] == "cancelling" else "failed"
            message = j.get("message") or "the worker process ended unexpectedly"
            db.upsert_job(job_id, status=status, message=message)
            _fail_run(db, j, f"its job {job_id} ended without finishing: {message}")
            j = db.get_job(job_id)
    return j


def active_jobs(project) -> list[dict]:
    out = []
    for j in list_jobs(project):
        if j["status"] in ACTIVE:
            j = refresh(project, j["id"])
            if j and j["status"] in ACTIVE:
                out.append(j)
    return out


def cancel_job(project, job_id: str) -> None:
    db = _db(_root(project))
    j = db.get_job(job_id)
    if j and j["status"] in ACTIVE:
        db.upsert_job(job_id, status="cancelling", message="cancel requested")


def wait(project, job_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
    t0 = time.time()
    while True:
        j = refresh(project, job_id)
        if j is None or j["status"] not in ACTIVE:
            return j
        if time.time() - t0 > timeout:
            raise TimeoutError(f"job {job_id} still {j['status']} after {timeout}s")
        time.sleep(poll)


# ----------------------------------------------------------------------------- the worker side
class JobReporter:
    """Progress callback (stage, done, total) writing to the jobs table at most every 0.3 s,
    plus the cancel callback reading the status back."""

    def __init__(self, db: StateDB, job_id: str, min_interval: float = 0.3):
        self.db, self.job_id, self.min_interval = db, job_id, min_interval
        self.rate = RateTracker()
        self._last = 0.0
        self._stage = None
        self._cancel_checked = 0.0
        self._cancelled = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        r, eta = self.rate.update(stage, done, total)
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.min_interval and done < total:
            return
        self._stage, self._last = stage, now
        self.db.upsert_job(self.job_id, stage=stage, done=int(done), total=int(total), rate=float(r),
                           eta=(float(eta) if eta == eta else None))

    def cancel(self) -> bool:
        if self._cancelled:
            return True
        now = time.monotonic()
        if now - self._cancel_checked < 0.2:
            return False
        self._cancel_checked = now
        j = self.db.get_job(self.job_id)
        self._cancelled = bool(j and j["status"] == "cancelling")
        return self._cancelled


def run_job(root: str | Path, job_id: str) -> dict:
    """Run a queued job to completion in this process, recording the outcome in its row."""
    db = _db(root)
    j = db.get_job(job_id)
    if j is None:
        raise ProponentError(f"no job {job_id}")
    if j["status"] == "cancelling":
        db.upsert_job(job_id, status="cancelled")
        return db.get_job(job_id)
    db.upsert_job(job_id, status="running", pid=os.getpid(), stage="loading project")
    rep = JobReporter(db, job_id)
    try:
        project = svc.open_project(root)
        params = j.get("params") or {}
        _record_run_key(db, job_id, project, j["kind"], params)
        result = _dispatch(project, j["kind"], params, rep)
        db.upsert_job(job_id, status="done", stage="done", result=result, eta=0.0,
                      message=None)
    except Cancelled as e:
        db.upsert_job(job_id, status="cancelled", message=str(e))
    except ProponentError as e:
        db.upsert_job(job_id, status="failed", message=str(e))
    except BaseException as e:  # the page shows one line; the log keeps the traceback
        traceback.print_exc()
        db.upsert_job(job_id, status="failed", message=f"{type(e).__name__}: {e}"[:500])
        if isinstance(e, KeyboardInterrupt):
            raise
    return db.get_job(job_id)


# job kinds whose worker computes (or reuses) the cached run of params' method and settings
RUN_KINDS = {"attribute": None, "leaks": None, "copies": "trak"}


def _record_run_key(db: StateDB, job_id: str, project, kind: str, params: dict) -> None:
    """Before the run's row exists, note in the job's result which run it computes: if the worker is
    killed, :func:`refresh` fails that row too."""
    if kind not in RUN_KINDS:
        return
    method = params.get("method") or RUN_KINDS[kind]
    try:
        key = svc.run_key_for(project, method, params.get("settings") or {})
    except ProponentError:  # an unknown method or bad settings: the job itself says so
        return
    db.upsert_job(job_id, result={"run_key": key})


def _dispatch(project, kind: str, params: dict, rep: JobReporter) -> dict:
    if kind == "attribute":
        t0 = time.perf_counter()
        res = cached_scores(project, params["method"], params.get("settings") or {}, device=params.get("device", "auto"),
                            progress=rep, cancel=rep.cancel)
        return {"key": res["key"], "method": params["method"], "seconds": time.perf_counter() - t0}
    if kind == "embedding":
        out = compute_embedding(project, params.get("kind", "influence"), params.get("reducer", DEFAULT_REDUCER),
                                progress=rep, cancel=rep.cancel, device=params.get("device", "auto"),
                                threads=params.get("threads"))
        return {"points": int(len(out["index"]))}
    if kind == "verify":
        out = counterfactual_check(project, **dict(params.get("kwargs", {})), progress=rep)
        return jsonable(out)
    if kind == "query":
        return svc.score_uploaded_query(project, params["qid"], params["method"], params.get("settings") or {},
                                        params["run"], int(params["label"]), device=params.get("device", "auto"),
                                        progress=rep, cancel=rep.cancel)
    if kind == "suspect":
        return svc.score_train_query(project, int(params["index"]), params["method"], params.get("settings") or {},
                                     params["run"], device=params.get("device", "auto"), progress=rep, cancel=rep.cancel)
    if kind == "leaks":
        out = detect_leaks(project, params["method"], params.get("settings") or None,
                           device=params.get("device", "auto"), progress=rep)
        return jsonable(out)
    if kind == "copies":
        out = detect_copies(project, params.get("method") or "trak", params.get("settings") or None,
                            device=params.get("device", "auto"), progress=rep)
        return jsonable(out)
    if kind == "triage":
        out = recommended_ranking(project, device=params.get("device", "auto"), progress=rep)
        return jsonable(out)
    if kind == "whatif":
        kw = dict(action=params.get("action", "remove"), new_labels=params.get("new_labels"))
        pred = predict_edit(project, params["indices"], **kw, progress=rep, allow_unconverged=True)
        out = {"predicted": jsonable(pred)}
        if params.get("retrain"):
            real = retrain_edit(project, params["indices"], **kw, progress=rep)
            out["retrained"] = jsonable(real)
            out["comparison"] = jsonable(compare_edits(pred, real))
        return out
    raise ProponentError(f"unknown job kind {kind!r}")
