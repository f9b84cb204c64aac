"""``proponent bench PROJECT``: every method's accuracy and cost, beside the peers, in one run.

Metrics (docs/design.md, "Evaluation"): LDS with its noise ceiling, leave-one-out correlation,
mislabel detection (AUROC, precision@k), leak detection (recall@1/@5 of the planted twin;
precision and recall of the leak detector's flags) and cost (fit/score time and peak memory,
featurization throughput, growth as the training set doubles). Peers run on the same
checkpoints and the same queries. The JSON holds the raw figures and a generic "tables" list
that ``scripts/make_benchmarks_md.py`` renders into docs/benchmarks.md.

- ``config``: the command line and the configuration it resolves to;
- ``run``: the stages of one run;
- ``peer_runs``: peers in their own processes, and TRAK against traker;
- ``tables``: the tables of a result.
"""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys

from engine.core.progress import TerminalProgress
from engine.core.project import Project
from engine.evaluate.bench.config import (
    DEFAULT_METRICS,
    build_parser,
    check_recipe,
    machine_description,
    resolve_config,
)
from engine.evaluate.bench.peer_runs import run_peer_limited, trak_vs_traker
from engine.evaluate.bench.run import run_bench
from engine.evaluate.bench.tables import emit_document, make_tables

__all__ = ["cli_main", "run_bench", "resolve_config", "build_parser", "make_tables", "run_peer_limited",
           "trak_vs_traker"]


def cli_main(argv: list[str]) -> int:
    if "--suite" in argv:  # generated validation projects instead of one project
        from engine.evaluate.bench.suite import suite_cli

        return suite_cli(argv)
    a = build_parser().parse_args(argv)
    cfg = resolve_config(a)
    project = Project.load(a.project)
    check_recipe(project, cfg, explicit_metrics=a.metrics != ",".join(DEFAULT_METRICS))
    os.environ.setdefault("PROPONENT_THREADS", "1")
    result = run_bench(project, cfg, progress=TerminalProgress(),
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    command = a.command or "proponent bench " + " ".join(shlex.quote(x) for x in argv)
    tables = make_tables(result)
    doc = {"title": a.title or f"proponent bench: {project.name}" + (" (quick)" if cfg["quick"] else ""),
           "date": _dt.date.today().isoformat(), "machine": machine_description(), "command": command,
           "tables": tables, "notes": f"Wall time of this invocation: {result['seconds'] / 60:.1f} min (method runs and "
                                      f"retrained margins already in the project's cache are reused; cost figures are "
                                      f"always fresh fits).", **result}
    emit_document(doc, a.json)
    return 0
