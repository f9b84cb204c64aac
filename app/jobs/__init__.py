"""Background jobs: rows of the project's SQLite ``jobs`` table run by worker processes, forked by
a warm launcher (app/jobs/launcher.py) or started as ``python -m app.jobs.runner PROJECT JOB_ID``."""
import importlib

# resolved on first use (PEP 562), so importing app.jobs.launcher, which the app does before its
# heavy imports, does not import the queue and the engine behind it
_QUEUE_NAMES = {'ACTIVE', 'KINDS', 'active_jobs', 'cancel_job', 'create_job', 'find_active', 'get_job', 'job_signature', 'list_jobs', 'refresh', 'run_job', 'start_job', 'wait', 'warm_launcher'}


def __getattr__(name: str):
    if name in _QUEUE_NAMES:
        return getattr(importlib.import_module("app.jobs.queue"), name)
    raise AttributeError(f"module 'app.jobs' has no attribute {name!r}")
