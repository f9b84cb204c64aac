"""Background jobs: rows of the project's SQLite ``jobs`` table run by worker processes, forked by
a warm launcher (app/jobs/launcher.py) or started as ``python -m app.jobs.runner PROJECT JOB_ID``."""
from app.jobs.queue import (  # noqa: F401
                            ACTIVE,
                            KINDS,
                            active_jobs,
                            cancel_job,
                            create_job,
                            find_active,
                            get_job,
                            job_signature,
                            list_jobs,
                            refresh,
                            run_job,
                            start_job,
                            wait,
                            warm_launcher,
)
