"""The `proponent` command. Every user error ends in one line and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sqlite3
import sys
import sysconfig
from pathlib import Path

import numpy as np

from engine.api import cached_scores, run_dir
from engine.autodiff import distributed, resolve_device
from engine.autodiff.curvature import BF16_FACTOR_MIN_IN
from engine.autodiff.functional import TrackedParameters
from engine.autodiff.per_example import gradient_backend
from engine.autodiff.threads import gradient_threads
from engine.core.checkpoints import import_trajectory
from engine.core.errors import ProponentError
from engine.core.init_project import init_project
from engine.core.progress import TerminalProgress
from engine.core.project import ROWS_FILE, Project
from engine.core.samples import prepare_sample
from engine.core.train import accuracy, record_training
from engine.evaluate.bench import cli_main
from engine.evaluate.bench.config import at_least
from engine.methods import describe_settings, list_methods
from engine.methods.source import BF16_SELF_WALK_MIN_PARAMS
from engine.methods.trak import projection_summary
from engine.storage.arrays import clean_orphan_temp_files
from engine.storage.blocks import iter_row_blocks, write_blocks
from engine.storage.cache import cache_entries, cache_size, prune_cache, skipped_entries
from engine.storage.statedb import StateDB, is_database_fault
from engine.workflows.leaks import detect_copies, detect_leaks
from engine.workflows.triage import triage


def _project(path: str, **checks):
    return Project.load(path, **checks)


def _settings(pairs: list[str] | None) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise ProponentError(f"--set expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k.strip() in out:  # the last one would win without a word
            raise ProponentError(f"--set {k.strip()} is given twice ({out[k.strip()]!r} and {v.strip()!r})")
        out[k.strip()] = v.strip()
    return out


def _progress():
    return TerminalProgress()


# ---------------------------------------------------------------------------- output paths
def check_output_file(path: str, option: str) -> Path:
    """The file a command will write (``--export``, ``bench --json``), checked before the work starts: a
    name, not a folder, under folders that exist or can be made (not a file in their place) and that this
    user may write in. Missing folders are made when the file is written."""
    if not path or not path.strip():
        raise ProponentError(f"{option} needs a file name, got an empty one")
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise ProponentError(f"{option}: is a folder; give a file name inside it", file=str(target))
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ProponentError(f"{option}: {folder} is a file, not a folder, so {target.name} cannot be written under it",
                             file=str(target))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ProponentError(f"{option}: cannot write in the folder {folder} (permission denied)", file=str(target))
    return target


def _first_line(path: Path, limit: int = 4096) -> bytes | None:
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return None
    return head.split(b"\n", 1)[0].rstrip(b"\r")


def is_score_export(path: Path) -> bool:
    """Whether ``path`` is what ``attribute --export`` writes (and so may replace): a complete .npy of a
    C-ordered 2-D float64 matrix. Read from the header; the data is not touched."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        return (len(shape) == 2 and not fortran and dtype == np.dtype("<f8")
                and path.stat().st_size == offset + int(np.prod(shape)) * 8)
    except (OSError, ValueError, EOFError):
        return False


def check_export(p, path: str) -> Path:
    """``attribute --export PATH``: where the matrix and its ``rows.csv`` go, refused (one line, before the
    run) where either would replace a file Proponent did not write. A previous export (a 2-D float64 .npy;
    a rows.csv whose first line is the header Proponent writes) is replaced, so exporting again to the same
    path works."""
    export = check_output_file(path, "--export")
    if export.name == ROWS_FILE:
        raise ProponentError(f"--export: the score matrix cannot be named {ROWS_FILE}: {ROWS_FILE} is written "
                             f"beside it; give a name such as scores.npy", file=str(export))
    if (export.exists() or export.is_symlink()) and not (export.is_file() and is_score_export(export)):
        raise ProponentError("--export: exists and is not a score matrix Proponent exported (a 2-D float64 .npy); "
                             "not overwritten: move it away or give another --export path", file=str(export))
    rows = export.parent / ROWS_FILE
    if rows.exists() or rows.is_symlink():
        header = ",".join(["split", *p.rows("train").columns])
        if not rows.is_file() or _first_line(rows) != header.encode():
            raise ProponentError(f"--export writes {ROWS_FILE} beside the matrix, and this one was not written by "
                                 f"Proponent (its first line is not {header!r}); not overwritten: move it away or "
                                 f"export to another folder", file=str(rows))
    return export


# ---------------------------------------------------------------------------- argument types
positive_int = at_least(1)  # the bench's own count type: one rule, one message


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def cmd_prepare(a) -> int:
    if a.dir is not None and not a.dir.strip():
        raise ProponentError("--dir is empty; give a folder, or leave --dir out for sample_projects/NAME")
    dest = prepare_sample(a.sample, a.dir, train=not a.no_train, models=a.models, progress=_progress(), force=a.force)
    print(f"prepared {a.sample} at {dest}")
    return 0


def cmd_train(a) -> int:
    p = _project(a.project, check_trajectory=False)
    device = "cpu" if a.device == "auto" else a.device
    cks = record_training(p, models=a.models, device=device, progress=_progress())
    finals = p.final_checkpoints()
    accs = [accuracy(p.load_model(c), p.test_dataset.x, p.test_dataset.y) for c in finals]
    print(f"recorded {len(cks)} checkpoints of {len(finals)} model(s) in {p.checkpoint_dir}; "
          f"test accuracy {np.mean(accs):.3f}" + (f" (range {min(accs):.3f}–{max(accs):.3f})" if len(accs) > 1 else ""))
    return 0


def print_advisories(meta: dict) -> None:
    """A default that is a poor fit for the project: one line each on stderr (the run went ahead)."""
    for line in meta.get("advisories") or []:
        print(f"note: {line}", file=sys.stderr)


def advise_method(p, method: str | None, settings) -> None:
    if method is None or method == "recommended":
        return
    from engine.methods import get_method
    from engine.methods.base import coerce_settings

    cls = get_method(method)
    if cls.supports(p) is None:  # a method that cannot run says so itself, in its own one line
        print_advisories({"advisories": cls.advisories(p, coerce_settings(cls, settings))})


def cmd_attribute(a) -> int:
    p = _project(a.project)
    if a.export is not None:  # before the run: a refused path should not cost the whole computation
        check_export(p, a.export)
    # under torchrun (`torchrun --nproc_per_node N -m engine.cli attribute …`) the ranks share the fit
    distributed.start(resolve_device(a.device))
    if distributed.active():  # rank 0 creates the state folder and database before the others open them
        if distributed.is_main():
            StateDB.for_project(p)
        distributed.barrier()
    try:
        res = cached_scores(p, a.method, _settings(a.set), device=a.device,
                            progress=_progress() if distributed.is_main_process() else None, use_cache=not a.no_cache)
    finally:
        distributed.stop()
    if not distributed.is_main_process():
        return 0  # rank 0 reports and writes the outputs
    print_advisories(res.get("meta") or {})
    S = res["scores"]  # memory-mapped from the run's store; read a row at a time

    # rows.csv maps every printed index back to its file and label
    p.write_rows_csv(run_dir(p, res["key"]))
    if a.export is not None:
        export = check_export(p, a.export)  # again: the folder may have changed during the run
        # what an export killed while writing left in the user's folder: only its own two files' temporaries
        clean_orphan_temp_files(export.parent, names=(export.name, ROWS_FILE))
        write_blocks(export, S.shape, iter_row_blocks(S), dtype=np.float64)  # block by block, renamed when complete
        p.write_rows_csv(export.parent)
    if a.json:
        k = min(a.top, S.shape[1])
        out = {"method": a.method, "run": res["key"], "shape": list(S.shape),
               "sign": "positive = proponent (removing it lowers the query's correct-class margin)", "queries": []}
        for q in range(S.shape[0]):
            row = np.asarray(S[q], dtype=np.float64)
            top = np.argsort(-row, kind="stable")[:k]
            bot = np.argsort(row, kind="stable")[:k]
            out["queries"].append({
                "test_index": q,
                "proponents": [{"train_index": int(i), "score": float(row[i])} for i in top],
                "opponents": [{"train_index": int(i), "score": float(row[i])} for i in bot]})
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"{a.method}: scores {S.shape[0]} test × {S.shape[1]} train (run {res['key']})"
              + (f", written to {a.export}" if a.export is not None else ""))
    return 0


def cmd_triage(a) -> int:
    p = _project(a.project)
    advise_method(p, a.method, _settings(a.set))
    out = triage(p, a.method, _settings(a.set), device=a.device, progress=_progress(), limit=a.limit)
    if a.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        if out["method"] == "recommended":
            print("recommended ranking; evidence: " + "; ".join(f"{k}: {v}" for k, v in out["evidence_sources"].items()))
        print(f"{'rank':>4} {'index':>6} {'score':>12} {'label':>6} {'suggested':>9}")
        for r, it in enumerate(out["items"][: a.limit or 20]):
            print(f"{r:>4} {it['index']:>6} {it['score']:>12.4g} {str(it['label']):>6} {str(it['suggested_label']):>9}")
    return 0


def cmd_leaks(a) -> int:
    p = _project(a.project)
    if a.method is None:
        # no --method: the default detector (input evidence calibrated on a training null, TRAK corroborating)
        if a.threshold is not None:
            raise ProponentError("--threshold applies to one method's statistic; give --method, or use --fpr")
        kw = {"fpr": a.fpr} if a.fpr is not None else {}
        out = detect_copies(p, "trak", _settings(a.set), device=a.device, progress=_progress(), **kw)
    else:
        kw = {k: v for k, v in (("fpr", a.fpr), ("threshold", a.threshold)) if v is not None}
        advise_method(p, a.method, _settings(a.set))
        out = detect_leaks(p, a.method, _settings(a.set), device=a.device, progress=_progress(), **kw)
    if a.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        flagged = [x for x in out["pairs"] if x["flagged"]]
        print(f"{len(flagged)} suspected leaks among {len(out['pairs'])} test queries ({a.method or 'detector'})")
        for x in flagged:
            why = x["reason"] if a.method is None else f"score {x['score']:.4g}"
            print(f"  test {x['test_index']:>5} ↔ train {x['train_index']:>5}  {why}")
    return 0


def _describe_projection(pr: dict) -> str:
    if pr["kind"] == "none":
        return "none (the whole gradient)"
    if pr["kind"] != "factorized":
        return f"{pr['kind']}, k {pr['k']}"
    parts = [f"{L['layer'] or 'model'} " + (f"{L['sketch']} sketch {L['k']}" if "sketch" in L else f"{L['k_out']}×{L['k_in']}")
             for L in pr["layers"]]
    left = f"; left out: {', '.join(pr['left_out'])}" if pr["left_out"] else ""
    return f"factorized per layer, k {pr['k']} ({', '.join(parts)}{left})"


def cmd_info(a) -> int:
    if a.project:
        p = _project(a.project)
        info = p.summary()
        acc = p.accuracy_report()
        info["accuracy"] = acc["models"]
        info["warnings"] = [w for w in [acc["warning"], *p.data_warnings] if w]
        info["threads"] = gradient_threads(p)
        ds = p.train_dataset
        sample = ds.x[0:2] if len(ds) >= 2 else None  # two rows: what one example's activations take
        info["gradients"] = gradient_backend(p.build_model().eval(), TrackedParameters.of(p), sample)
        info["projection"] = projection_summary(p)  # TRAK's, at its defaults
        info["methods"] = {}
        for cls in list_methods():
            info["methods"][cls.name] = cls.supports(p) or "ok"
        if a.json:
            print(json.dumps(info))
        else:
            for k, v in info.items():
                if k in ("methods", "accuracy", "warnings", "threads", "gradients", "projection"):
                    continue
                print(f"{k:>12}: {v}")
            for r in info["accuracy"]:
                print(f"{'accuracy':>12}: model {r['model']} train {r['train']:.3f}, test {r['test']:.3f}")
            print(f"{'threads':>12}: {info['threads']['threads']} for gradient work ({info['threads']['reason']})")
            gr = info["gradients"]
            batch = (f"; {gr['batch']} rows per batch at {gr['budget_mb']:g} MB ({gr['saved_mb_per_example']:.3g} MB of "
                     f"activations saved per example)" if "batch" in gr else "")
            layout = "; image batches channels_last" if gr.get("layout") == "channels_last" else ""
            print(f"{'gradients':>12}: {gr['backend']} ({gr['reason']}){batch}{layout}")
            products = (f"bfloat16 (this CPU multiplies it fast; on models of {BF16_SELF_WALK_MIN_PARAMS:,}+ covered "
                        f"parameters EK-FAC's self-influence walk too, and the factor passes' products on layers of "
                        f"{BF16_FACTOR_MIN_IN}+ inputs)" if gr["bf16_products"] else "float32")
            print(f"{'products':>12}: EK-FAC and Source scores in {products}")
            print(f"{'projection':>12}: {_describe_projection(info['projection'])} (TRAK's default)")
            runnable = [n for n, v in info["methods"].items() if v == "ok"]
            print(f"{'can run':>12}: {', '.join(runnable) or 'none'}")
            for n, v in info["methods"].items():
                if v != "ok":
                    print(f"{'cannot run':>12}: {n}: {v}")
            for w in info["warnings"]:
                print(f"proponent: warning: {w}", file=sys.stderr)
        return 0
    methods = [{"name": c.name, "label": c.label, "description": c.description, "settings": describe_settings(c)}
               for c in list_methods()]
    if a.json:
        print(json.dumps(methods, default=str))
    else:
        for m in methods:
            print(f"{m['name']:<12} {m['description']}")
            for s in m["settings"]:
                print(f"{'':<14}{s['name']}={s['default']!r}: {s['help']}")
    return 0


def cmd_cache(a) -> int:
    p = _project(a.project)
    criteria = a.older_than is not None or a.max_size is not None or a.run or a.all
    if a.prune and not criteria:
        raise ProponentError("--prune needs what to remove: --older-than DAYS, --max-size MB, --run KEY or --all")
    if criteria and not a.prune:  # listing ignores them: say so rather than seem to have pruned
        raise ProponentError("--older-than, --max-size, --run and --all choose what --prune removes; add --prune "
                             "(and --dry-run to see the list first)")
    if a.prune:
        removed = prune_cache(p.root, older_than_days=a.older_than, max_total_mb=a.max_size, keys=a.run,
                              everything=a.all, dry_run=a.dry_run)
        verb = "would remove" if a.dry_run else "removed"
        skipped = skipped_entries(p.root)
        if a.json:
            print(json.dumps({"removed": [e.as_dict() for e in removed], "dry_run": a.dry_run,
                              "skipped": [e.as_dict() for e in skipped]}))
        else:
            for e in removed:
                print(f"{verb} {e.kind}/{e.key} ({e.bytes / 2**20:.1f} MiB)")
            for e in skipped:
                print(f"skipped {e.kind}{'/' + e.key if e.key else ''}: {e.reason}")
            print(f"{verb} {len(removed)} entries, {sum(e.bytes for e in removed) / 2**20:.1f} MiB; "
                  f"cache now {cache_size(p.root) / 2**20:.1f} MiB")
        return 0
    entries = cache_entries(p.root)
    if a.json:
        print(json.dumps({"bytes": sum(e.bytes for e in entries), "entries": [e.as_dict() for e in entries]}))
        return 0
    print(f"{'kind':<12} {'key':<28} {'method':<12} {'status':<10} {'MiB':>9} {'age (days)':>11}")
    for e in entries:
        d = e.as_dict()
        print(f"{e.kind:<12} {e.key:<28} {e.method or '':<12} {e.status or '':<10} {d['mb']:>9.1f} {d['age_days']:>11.1f}")
    print(f"total {sum(e.bytes for e in entries) / 2**20:.1f} MiB in {len(entries)} entries under {p.root / '.proponent'} "
          f"(state.db with flags is never pruned)")
    return 0


def cmd_import(a) -> int:
    p = _project(a.project, check_trajectory=False)
    n = import_trajectory(p, a.checkpoints)
    print(f"imported {n} checkpoints from {a.checkpoints} into {p.trajectory_path}; "
          f"trajectory methods (source, tracin) can now run")
    return 0


def cmd_init(a) -> int:
    result = init_project(a.dir, force=a.force)
    for line in result.report:
        print(line)
    return 0


def check_bench_json(argv: list[str]) -> None:
    """``bench --json PATH``: checked before the bench runs (minutes to hours), not when its results are
    written."""
    for i, tok in enumerate(argv):
        if tok == "--json" and i + 1 < len(argv):
            check_output_file(argv[i + 1], "--json")
        elif tok.startswith("--json="):
            check_output_file(tok.split("=", 1)[1], "--json")


def cmd_bench(a, rest: list[str]) -> int:
    check_bench_json(rest)
    return cli_main([a.project, *rest])


def split_app_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """``proponent app [PROJECT] [streamlit options]``: the project folder and the options passed on.
    Every Streamlit option takes a value, as ``--server.port 8599`` or ``--server.port=8599``, so a
    value after an option is never taken for the project."""
    project, opts, i = None, [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            if "=" in tok:
                name, value = tok.split("=", 1)
                opts += [name, value]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                opts += [tok, argv[i + 1]]
                i += 1
            else:
                raise ProponentError(f"streamlit option {tok} needs a value (for example {tok}=VALUE)")
        elif project is None:
            project = tok
        else:
            raise ProponentError(f"proponent app takes one project folder; {project!r} and {tok!r} were given")
        i += 1
    return project, opts


def app_command(project: str | None, opts: list[str]) -> tuple[list[str], dict]:
    """The Streamlit command line and environment of ``proponent app``: loopback unless
    --server.address says otherwise, no usage statistics, the minimal toolbar (no Deploy), no
    forced garbage collection after each script run and no source-file watcher.

    Streamlit runs ``gc.collect(2)`` after every script run by default. With torch, pandas and
    plotly loaded that is 0.2-0.3 s holding the GIL (300-430k objects), after every page switch,
    widget click and 0.5 s job-panel poll: profiled with py-spy while a TRAK job ran, it took 10 of
    the server's 10.9 CPU seconds, on a 2-core machine where the job needed both. Python's own
    generational collector still runs. The watcher would poll the app's source files for edits a
    user never makes."""
    main = Path(__file__).resolve().parents[1] / "app" / "main.py"
    env = dict(os.environ)
    if project:
        # validate up front so a bad folder is a one-line error, not a broken page
        _project(project)
        env["PROPONENT_PROJECT"] = str(Path(project).resolve())
    given = set(opts[0::2])
    defaults = {"--server.address": "127.0.0.1", "--browser.gatherUsageStats": "false",
                "--client.toolbarMode": "minimal", "--runner.postScriptGC": "false",
                "--server.fileWatcherType": "none"}
    args = [sys.executable, "-m", "streamlit", "run", str(main)]
    for name, value in defaults.items():
        if name not in given:
            args += [name, value]
    return args + opts, env


def cmd_app(a, rest: list[str]) -> int:
    """Run the Streamlit UI bound to 127.0.0.1 unless --server.address says otherwise."""
    args, env = app_command(a.project, rest)
    # replace this process, so a signal to `proponent app` reaches the server itself
    os.execve(sys.executable, args, env)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="proponent", description="Which training examples made my model do this?")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, method=True):
        p.add_argument("project", help="project folder (holding project.toml)")
        if method:
            p.add_argument("--method", "-m", default="trak", help="method name from the registry (proponent info)")
            p.add_argument("--set", action="append", metavar="NAME=VALUE", help="a method setting (repeatable)")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("prepare", help="write a ready sample project (data, model.py, project.toml, checkpoints)")
    p.add_argument("sample", help="sample name, e.g. digits")
    p.add_argument("--dir", help="where to write it (default: sample_projects/NAME)")
    p.add_argument("--models", type=positive_int, default=1, help="independently trained models to record")
    p.add_argument("--no-train", action="store_true", help="write the data only")
    p.add_argument("--force", action="store_true", help="regenerate data and checkpoints")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train per the recipe, recording the trajectory")
    common(p, method=False)
    p.add_argument("--models", type=positive_int, default=1, help="independently trained models (seeds seed..seed+N-1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("attribute", help="score every test query against every training example")
    common(p)
    p.add_argument("--export", help="write the [n_test, n_train] score matrix to this .npy file")
    p.add_argument("--json", action="store_true", help="print top proponents and opponents per query as JSON")
    p.add_argument("--top", type=positive_int, default=10, help="proponents/opponents per query in --json")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached run exists")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("triage", help="rank training examples by how likely they are mislabeled")
    common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=positive_int, default=None, help="keep only the N most suspicious")
    # no --method: the recommended ranking (attribution + out-of-sample label evidence + neighbours)
    p.set_defaults(func=cmd_triage, method=None)

    p = sub.add_parser("leaks", help="suspected train/test duplicates, with a calibrated flag")
    common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--fpr", type=finite_float, help="false-positive rate the flag threshold holds on clean queries (default: "
                                             "the copy detector 0.001, on text 0.01; with --method 0.01)")
    p.add_argument("--threshold", type=finite_float, help="explicit flag threshold of --method's statistic (overrides --fpr)")
    # no --method: the default detector (exact, perceptual-hash and input-cosine evidence; TRAK corroborates)
    p.set_defaults(func=cmd_leaks, method=None)

    p = sub.add_parser("info", help="describe a project, or list methods and their settings")
    p.add_argument("project", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("cache", help="list the cached runs and results of a project, or prune them by age or size")
    p.add_argument("project")
    p.add_argument("--prune", action="store_true", help="remove entries (with --older-than, --max-size, --run or --all)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="entries not used for this many days")
    p.add_argument("--max-size", type=float, metavar="MB", help="least recently used entries until the cache fits")
    p.add_argument("--run", action="append", metavar="KEY", help="this run key (repeatable)")
    p.add_argument("--all", action="store_true", help="every cached entry (flags and notes are kept)")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("import", help="turn a folder of your own saved checkpoints (+ manifest) into a trajectory")
    p.add_argument("project")
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="folder with the weight files and manifest.json/.csv (file, step, epoch, lr per checkpoint)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("init", help="inspect a data folder and write project.toml and a model.py template")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="overwrite an existing project.toml / model.py")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("bench", help="accuracy and cost of methods and peers (see docs/benchmarks.md)", add_help=False)
    p.add_argument("project")
    p.set_defaults(func=cmd_bench, passthrough=True)

    p = sub.add_parser("app", help="the Streamlit UI (127.0.0.1 unless --server.address is given)")
    p.add_argument("project", nargs="?")
    p.set_defaults(func=cmd_app, passthrough=True)
    return ap


_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.ENOSPC,
                errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


def file_error_line(e: BaseException) -> str | None:
    """``<file>: <problem>`` for an OSError of a file (permission, a folder or file in the way, a missing
    file, a full or read-only disk) or an SQLite database error; None for anything else (a bug: its
    traceback stands)."""
    if isinstance(e, sqlite3.DatabaseError):
        return f"state database: {e}" if is_database_fault(e) else None
    if not isinstance(e, OSError) or e.errno not in _FILE_ERRNOS:
        return None
    problem = e.strerror or os.strerror(e.errno)
    if e.filename is None:
        return problem
    return f"{e.filename}: {problem}" + (f" ({e.filename2})" if e.filename2 is not None else "")


_PROPONENT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("engine", "app"))


def _library_dirs() -> tuple[str, ...]:
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        with_path = sysconfig.get_paths().get(name)
        if with_path:
            dirs.add(with_path)
    return tuple(str(Path(d).resolve()) + os.sep for d in dirs if d)


def user_code_file(tb) -> str | None:
    """The innermost file of a traceback that is neither Proponent's nor Python's or an installed
    package's: the project's own code (model.py, or a module of the user's it imports)."""
    found, library = None, _library_dirs()
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name and not name.startswith("<"):
            full = str(Path(name).resolve())
            if not full.startswith(_PROPONENT_DIRS) and not full.startswith(library):
                found = full
        tb = tb.tb_next
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    try:
        if argv and argv[0] == "app" and not {"-h", "--help"} & set(argv[1:]):
            project, opts = split_app_args(argv[1:])
            return cmd_app(argparse.Namespace(project=project), opts)
        if argv and argv[0] == "bench" and "--suite" in argv:  # no project: generated validation projects
            check_bench_json(argv[1:])
            return cli_main(argv[1:])
        a, rest = ap.parse_known_args(argv)
        if rest and not getattr(a, "passthrough", False):
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        if distributed.launched_by_torchrun() and a.func is not cmd_attribute:
            raise ProponentError(f"only 'attribute' splits its work over torchrun's processes; run "
                                 f"'proponent {argv[0]}' without torchrun")
        try:
            return a.func(a, rest) if getattr(a, "passthrough", False) else a.func(a)
        except SystemExit as e:
            # the user's model.py (or code it imports) exited: one line naming it, not a silent exit code
            culprit = user_code_file(e.__traceback__)
            if culprit is None:
                raise  # Proponent's own exits (a passthrough command's usage error) stand
            raise ProponentError(f"called sys.exit({e.code!r}) while Proponent imported or ran it; a project's "
                                 f"model code must not exit (guard script code with "
                                 f"`if __name__ == \"__main__\":`)", file=culprit) from None
    except ProponentError as e:
        print(f"proponent: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("proponent: interrupted; finished chunks are kept and the next run resumes", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (OSError, sqlite3.DatabaseError) as e:
        # the last resort for a file problem no check foresaw: still one line and exit code 2
        line = file_error_line(e)
        if line is None:
            raise
        print(f"proponent: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
