"""The app layer under faults: stale and damaged runs, flags on rows that are gone, hostile cells in
CSV exports, cleaned copies of JSONL/Parquet tables and of folders with symlinks, undo across
projects, damaged or locked state.db, deleted checkpoints, and dead or impostor job workers."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import jobs
from app import services as svc
from tests.conftest import write_tabular_project
from engine import Project
from engine.core.errors import ProponentError
from engine.storage.statedb import StateDB, database_error

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
REPO = Path(__file__).resolve().parents[1]
METHOD = "grad-dot"  # a per-example run that takes well under a second on this project
# class names a user may well have, and that Markdown and spreadsheets read as syntax
CLASSES = ["=1+2", "*bold*", "[a](b)"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A small tabular project (hostile class names) with a recorded model and one finished run."""
    from engine.core.train import record_training

    root = write_tabular_project(tmp_path_factory.mktemp("faults") / "tab", n_train=40, n_test=12)
    for split in ("train", "test"):
        df = pd.read_csv(root / f"{split}.csv", dtype=str)
        df["label"] = [CLASSES[int(v)] for v in df["label"]]
        df.to_csv(root / f"{split}.csv", index=False)
    p = Project.load(root)
    record_training(p)
    jid = jobs.start_job(p, "attribute", {"method": METHOD, "settings": {}, "device": "cpu"}, background=False)
    assert jobs.get_job(p, jid)["status"] == "done", jobs.get_job(p, jid)
    return p


def _clone(p: Project, dest: Path) -> Project:
    """The whole project folder, runs and state included (run keys hash content, so they still match)."""
    shutil.copytree(p.root, dest)
    return Project.load(dest)


def _app(monkeypatch, project, page=None, tmp_path=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROPONENT_PROJECT", str(project.root))
    monkeypatch.setenv("PROPONENT_SYNC_JOBS", "1")
    if tmp_path is not None:
        monkeypatch.setenv("PROPONENT_STATE_DIR", str(tmp_path / "appstate"))
    at = AppTest.from_file(MAIN, default_timeout=180)
    if page:
        at.switch_page(f"views/{page}.py")
    at.run()
    return at


def _no_traceback(at):
    assert not at.exception, [e.value for e in at.exception]


def _key(p: Project) -> str:
    return svc.done_runs(p)[0]["key"]


# ----------------------------------------------------------------------------- A: report
def test_report_skips_flags_on_rows_that_no_longer_exist(ran, tmp_path):
    from app.report.build import build_report

    p = _clone(ran, tmp_path / "p")
    n = len(p.train_dataset)
    db = svc.db_for(p)
    db.set_flag("train", 1, flag="mislabeled")
    db.set_flag("train", n + 4, flag="mislabeled", note="set before rows were deleted")
    html = build_report(p, _key(p), method=METHOD, n_queries=1)
    assert f"1 flag(s) name training rows that no longer exist" in html and f"#{n + 4}" in html
    assert "Review flagged 1 training examples" in html


# ----------------------------------------------------------------------------- B, C: runs
def test_a_run_of_other_data_is_stale_and_not_offered(ran, tmp_path, monkeypatch):
    p = _clone(ran, tmp_path / "p")
    key = _key(p)
    lines = (p.root / "train.csv").read_text().splitlines(keepends=True)
    (p.root / "train.csv").write_text("".join(lines[:1] + lines[2:]))  # one training row deleted
    q = Project.load(p.root)
    assert svc.done_runs(q) == []
    row = next(r for r in svc.list_runs(q) if r["key"] == key)
    assert row["status"] == "done" and "changed" in row["stale"]
    at = _app(monkeypatch, q, "explore", tmp_path)
    _no_traceback(at)
    assert any("No finished attribution run" in w.value for w in at.warning)
    at = _app(monkeypatch, q, None, tmp_path)
    _no_traceback(at)
    assert any("stale: " in h.value and key in h.value for h in at.get("html"))


def test_a_run_whose_scores_do_not_fit_or_are_damaged_is_not_available(ran, tmp_path):
    p = _clone(ran, tmp_path / "p")
    key = _key(p)
    f = p.state_dir / "runs" / key / "scores.npy"
    n_test, n_train = len(p.test_dataset), len(p.train_dataset)
    good = f.read_bytes()
    np.save(f, np.zeros((n_test, n_train - 1), dtype=np.float32))  # another project's shape
    assert svc.done_runs(p) == [] and "not" in svc.list_runs(p)[0]["stale"]
    bad = {"truncated": good[:200], "garbage": b"not a numpy file at all",
           "pickled": None}
    for what, data in bad.items():
        if data is None:
            np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            f.write_bytes(data)
        assert svc.done_runs(p) == [], what
        with pytest.raises(ProponentError, match="scores.npy"):
            svc.load_run(p, key)
    f.write_bytes(good)
    assert [r["key"] for r in svc.done_runs(p)] == [key]
    assert svc.load_run(p, key)["scores"].shape == (n_test, n_train)


# ----------------------------------------------------------------------------- D: CSV injection
def test_flag_exports_never_hold_a_formula_but_keep_numbers(ran, tmp_path):
    p = _clone(ran, tmp_path / "p")
    db = svc.db_for(p)
    db.set_flag("train", 0, flag="mislabeled", relabel="+1-1", note='=HYPERLINK("http://x","y")')
    db.set_flag("train", 1, flag="leak", note="@SUM(1+1)")
    db.set_flag("train", 2, flag="ok", note="\tcmd")
    db.set_flag("train", 3, flag="ok", note="-2+3", relabel="-1")
    suspects = pd.DataFrame({"index": [0, 1, 2, 3], "suggested": ["=cmd|' /C calc'!A0", "b", "c", "d"],
                             "suspicion": [-0.5, 0.25, -1e-3, 2.0]})
    for text in (svc.export_flags_csv(p, db, suspects), svc.selection_csv(p, db, [0, 1, 2, 3], suspects)):
        rows = list(csv.DictReader(io.StringIO(text)))
        cells = [v for r in rows for k, v in r.items() if k not in ("score", "index")]
        assert not [c for c in cells if c and c[0] in "=+-@\t\r" and c != "-1"], cells
        by = {r["index"]: r for r in rows}
        assert by["0"]["note"] == "'=HYPERLINK(\"http://x\",\"y\")" and by["0"]["relabel"] == "'+1-1"
        assert by["0"]["suggested"].startswith("'=") and by["1"]["note"] == "'@SUM(1+1)"
        assert by["2"]["note"] == "'\tcmd" and by["3"]["note"] == "'-2+3"
        assert by["3"]["relabel"] == "-1"  # a plain number is not a formula
        assert [float(by[i]["score"]) for i in "0123"] == [-0.5, 0.25, -1e-3, 2.0]
        assert by["0"]["score"] == "-0.5"
        assert "'=1+2" in [r["label"] for r in rows]  # the class name "=1+2", as text


# ----------------------------------------------------------------------------- E: cleaned copy formats
def _table_project(ran, dest: Path, kind: str) -> Project:
    """A copy of the project whose training table is ``kind`` (csv, jsonl or parquet)."""
    shutil.copytree(ran.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    if kind != "csv":
        for split in ("train", "test"):
            df = pd.read_csv(dest / f"{split}.csv")
            if kind == "jsonl":
                df.to_json(dest / f"{split}.jsonl", orient="records", lines=True)
            else:
                df.to_parquet(dest / f"{split}.parquet", index=False)
            (dest / f"{split}.csv").unlink()
        toml = (dest / "project.toml").read_text()
        (dest / "project.toml").write_text(toml.replace("train.csv", f"train.{kind}").replace("test.csv",
                                                                                               f"test.{kind}"))
    return Project.load(dest)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_cleaned_copy_keeps_the_table_format_and_every_value(ran, tmp_path, kind):
    p = _table_project(ran, tmp_path / "p", kind)
    db = svc.db_for(p)
    db.set_flag("train", 3, flag="mislabeled")
    src, skip = p.train_csv, 1 if kind == "csv" else 0  # skip: the CSV header

    def check(out, relabelled: int | None, new: str | None):
        dst = Path(out["folder"]) / src.name
        if kind == "parquet":
            import pyarrow.parquet as pq

            a, b = pq.read_table(src).to_pandas(), pq.read_table(dst).to_pandas()
            expect = a.drop(index=3).reset_index(drop=True)
            if relabelled is not None:
                expect.loc[relabelled - 1, "label"] = new
            pd.testing.assert_frame_equal(b, expect, check_exact=True)
        else:
            old_lines, new_lines = src.read_text().splitlines(), dst.read_text().splitlines()
            assert len(new_lines) == len(old_lines) - 1
            for j, line in enumerate(new_lines):
                i = j - skip + (j - skip >= 3)  # the training row this line holds
                if i != relabelled:
                    assert line == old_lines[i + skip], (j, line)  # byte for byte: no float re-serialised
                elif kind == "jsonl":
                    row, was = json.loads(line), json.loads(old_lines[i])
                    assert row == {**was, "label": new}
                else:
                    assert next(csv.reader([line])) == next(csv.reader([old_lines[i + skip]]))[:-1] + [new]
        q = Project.load(out["folder"])
        assert len(q.train_dataset) == len(p.train_dataset) - 1
        if relabelled is not None:
            assert str(q.class_name(int(q.train_dataset.y[relabelled - 1]))) == new

    out = svc.export_cleaned(p, db, tmp_path / "cleaned")
    assert (out["removed"], out["relabelled"], out["n_train"]) == (1, 0, len(p.train_dataset) - 1)
    check(out, None, None)
    new = next(c for c in CLASSES if c != str(p.class_name(int(p.train_dataset.y[5]))))
    db.set_flag("train", 5, flag="mislabeled", relabel=new)
    out = svc.export_cleaned(p, db, tmp_path / "cleaned")
    assert (out["removed"], out["relabelled"]) == (1, 1)
    check(out, 5, new)


# ----------------------------------------------------------------------------- F: symlinks
def test_cleaned_copy_never_follows_a_link_out_of_the_project(ran, tmp_path):
    p = _table_project(ran, tmp_path / "p", "csv")
    outside = tmp_path / "outside_secret"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the export")
    (p.root / "docs").mkdir()
    (p.root / "docs" / "readme.txt").write_text("mine")
    os.symlink(outside, p.root / "linked_out")
    os.symlink(outside / "secret.txt", p.root / "docs" / "secret_link.txt")
    os.symlink(".", p.root / "self")  # a loop
    os.symlink("readme.txt", p.root / "docs" / "alias.txt")  # inside: copied as the file
    os.symlink("missing.txt", p.root / "docs" / "broken.txt")
    db = svc.db_for(p)
    db.set_flag("train", 0, flag="mislabeled")
    out = svc.export_cleaned(p, db, tmp_path / "cleaned")
    folder = Path(out["folder"])
    skipped = " ".join(out["skipped"])
    for name in ("linked_out", "secret_link.txt", "self", "broken.txt"):
        assert name in skipped and not (folder / name).exists() and not list(folder.rglob(name))
    assert (folder / "docs" / "alias.txt").read_text() == "mine" and not (folder / "docs" / "alias.txt").is_symlink()
    assert not [f for f in folder.rglob("*") if f.is_symlink()]
    assert b"not for the export" not in svc.zip_folder(folder)
    assert not list(tmp_path.glob("*.partial"))
    # a folder of the user's own with a link out: the zip leaves the link out
    os.symlink(outside / "secret.txt", folder / "docs" / "late_link.txt")
    names = zipfile.ZipFile(io.BytesIO(svc.zip_folder(folder))).namelist()
    assert "cleaned/docs/readme.txt" in names and not [n for n in names if "late_link" in n or "secret" in n]


def test_a_failed_cleaned_copy_leaves_no_partial_folder(ran, tmp_path):
    p = _table_project(ran, tmp_path / "p", "csv")
    (p.root / "truth.json").write_text("{not json")
    with pytest.raises(ProponentError, match="truth.json"):
        svc.export_cleaned(p, svc.db_for(p), tmp_path / "cleaned")
    assert not list(tmp_path.glob("cleaned*"))


# ----------------------------------------------------------------------------- G: undo
def test_undo_never_reverts_a_decision_of_another_project(ran, tmp_path, monkeypatch):
    a, b = _clone(ran, tmp_path / "a"), _clone(ran, tmp_path / "b")
    at = _app(monkeypatch, a, "triage", tmp_path)
    _no_traceback(at)
    i = at.session_state["rv_id"]
    svc.db_for(b).set_flag("train", i, flag="leak", note="checked by hand in B")
    at.button(key="rv_mislabeled").click().run()
    assert svc.flag_state(svc.db_for(a))[i]["flag"] == "mislabeled"
    # the user opens B from the Project page (app.ui.set_project)
    at.switch_page("views/project.py").run()
    at.toggle(key="t_open").set_value(True).run()
    at.radio(key="src").set_value("Folder on the server").run()
    at.text_input(key="folder").set_value(str(b.root)).run()
    at.button(key="open_folder").click().run()
    _no_traceback(at)
    at.switch_page("views/triage.py").run()
    _no_traceback(at)
    assert at.button(key="rv_undo_btn").disabled
    # a session that reached B without set_project: the entry names project A, so it is refused too
    at = _app(monkeypatch, a, "triage", tmp_path)
    at.button(key="rv_ok").click().run()
    at.session_state["project_root"] = str(b.root)
    at.run()
    _no_traceback(at)
    assert at.button(key="rv_undo_btn").disabled
    kept = svc.flag_state(svc.db_for(b))[i]
    assert (kept["flag"], kept["note"]) == ("leak", "checked by hand in B")


# ----------------------------------------------------------------------------- H: one line, not a traceback
def test_a_damaged_state_db_is_one_line_on_every_page(ran, tmp_path, monkeypatch):
    p = _clone(ran, tmp_path / "p")
    for f in p.state_dir.glob("state.db*"):
        f.unlink()
    (p.state_dir / "state.db").write_bytes(b"this is not a database" * 100)
    for page in (None, "explore", "triage"):
        at = _app(monkeypatch, p, page, tmp_path)
        _no_traceback(at)
        errs = [e.value for e in at.error]
        assert errs and "state.db" in errs[-1] and "\n" not in errs[-1], (page, errs)


def test_deleted_checkpoints_are_one_line(ran, tmp_path, monkeypatch):
    from engine.workflows.triage import ensemble_probabilities

    p = _clone(ran, tmp_path / "p")
    shutil.rmtree(p.checkpoint_dir)
    q = Project.load(p.root)
    with pytest.raises(ProponentError, match="checkpoints"):
        ensemble_probabilities(q)
    for page in (None, "triage", "explore"):
        at = _app(monkeypatch, q, page, tmp_path)
        _no_traceback(at)
        assert at.error or at.warning, page


def _locked(monkeypatch):
    """Every flag write fails as it does when another process holds state.db's write lock."""
    def fail(self, *a, **k):
        raise database_error(sqlite3.OperationalError("database is locked"), self.path)
    monkeypatch.setattr(StateDB, "set_flag", fail)
    monkeypatch.setattr(StateDB, "set_flags", fail)


def test_a_click_on_a_locked_database_says_it_was_not_saved(ran, tmp_path, monkeypatch):
    p = _clone(ran, tmp_path / "p")
    at = _app(monkeypatch, p, "triage", tmp_path)
    _no_traceback(at)
    i = at.session_state["rv_id"]
    _locked(monkeypatch)
    at.button(key="rv_mislabeled").click().run()
    _no_traceback(at)
    assert any("Not saved" in e.value and "locked" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state["rv_id"] == i and not at.session_state["rv_undo"]  # still on it; nothing to undo
    assert svc.flag_state(svc.db_for(p)).get(i) is None
    at.toggle(key="t_bulk").set_value(True).run()
    at.number_input(key="bulk_topn").set_value(2).run()
    at.button(key="bulk_apply").click().run()
    _no_traceback(at)
    assert any("Not saved: flag mislabeled on 2 example(s)" in e.value for e in at.error), [e.value for e in at.error]
    # a flag pill on Explore (a widget callback)
    at.switch_page("views/explore.py").run()
    _no_traceback(at)
    pills = next(w for w in at.pills if w.key.split("@")[0] == "proponent_flags")
    first = pills.options[0]
    pills.set_value([int(first.lstrip("#"))]).run()
    _no_traceback(at)
    assert any("Not saved" in e.value for e in at.error), [e.value for e in at.error]
    assert svc.flag_state(svc.db_for(p)) == {}


# ----------------------------------------------------------------------------- markdown
def test_class_names_show_as_written_in_captions(ran, tmp_path, monkeypatch):
    p = _clone(ran, tmp_path / "p")
    at = _app(monkeypatch, p, "explore", tmp_path)
    _no_traceback(at)
    true_label = next(m.value for m in at.markdown if m.value.startswith("True label"))
    assert "\\" in true_label and not any(c in true_label for c in CLASSES)  # each one escaped
    at = _app(monkeypatch, p, "triage", tmp_path)
    cap = next(c.value for c in at.caption if c.value.startswith("Suspect 1 of"))
    assert not any(c in cap for c in CLASSES)
    from app.ui import md

    assert md("*bold* [a](b) =1+2") == r"\*bold\* \[a\]\(b\) =1\+2"


def test_a_text_card_keeps_blank_lines_inside_its_block():
    from streamlit.testing.v1 import AppTest

    def script():
        from app import ui

        ui.text_card("first paragraph\n\n**not bold** <b>no tag</b>\n\n    not code")

    at = AppTest.from_function(script)
    at.run()
    _no_traceback(at)
    v = at.markdown[0].value
    assert "\n\n" not in v and v.count("<br>") == 4 and "&lt;b&gt;" in v and v.endswith("</div>")


# ----------------------------------------------------------------------------- I: jobs
def _job(root: Path, status: str, pid: int, result=None) -> str:
    jid = jobs.create_job(root, "attribute", {"method": METHOD, "settings": {}})
    StateDB(root / ".proponent" / "state.db").upsert_job(jid, status=status, pid=pid, result=result)
    return jid


def test_a_killed_worker_fails_its_run_row(ran, tmp_path):
    p = _clone(ran, tmp_path / "p")
    db = svc.db_for(p)
    key = svc.run_key_for(p, METHOD, {})
    db.upsert_run(key, status="running")  # what fit_method wrote before the worker was SIGKILLed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = _job(p.root, "running", os.getpid(), {"run_key": key})  # a live job of the same run: kept
    jid = _job(p.root, "running", dead.pid, {"run_key": key})
    assert jobs.refresh(p, jid)["status"] == "failed"
    assert db.get_run(key)["status"] == "running"
    db.upsert_job(other, status="done")
    jid = _job(p.root, "running", dead.pid, {"run_key": key})
    assert jobs.refresh(p, jid)["status"] == "failed"
    run = db.get_run(key)
    assert run["status"] == "failed" and jid in run["message"]
    # the worker notes its run key before the run's row exists
    seen = {}

    def dispatch(project, kind, params, rep):
        seen.update(jobs.get_job(p, rep.job_id)["result"] or {})
        return {}

    import app.jobs.queue as queue

    orig, queue._dispatch = queue._dispatch, dispatch
    try:
        queue.run_job(p.root, jobs.create_job(p, "attribute", {"method": METHOD, "settings": {}}))
    finally:
        queue._dispatch = orig
    assert seen == {"run_key": key}


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="process identity is read from /proc")
def test_a_reused_pid_is_not_taken_for_the_worker(tmp_path):
    root = tmp_path / "proj"
    (root / ".proponent").mkdir(parents=True)
    procs = []

    def proc(code: str, *args: str):
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=str(REPO)))
        return procs[-1].pid

    try:
        unrelated = subprocess.Popen(["sleep", "60"])
        procs.append(unrelated)
        jid = _job(root, "running", unrelated.pid)
        assert jobs.refresh(root, jid)["status"] == "failed"
        # a worker started as `python -m app.jobs.runner ROOT JOB`, and one forked by the warm launcher
        # (the launcher's command line) that named itself after its job, are kept running
        jid = jobs.create_job(root, "attribute", {"method": "a"})
        pid = proc("import time; time.sleep(60)", "app.jobs.runner", str(root), jid)
        StateDB(root / ".proponent" / "state.db").upsert_job(jid, status="running", pid=pid)
        jid2 = jobs.create_job(root, "attribute", {"method": "b"})
        tag = jobs.queue.worker_tag(jid2)
        pid2 = proc(f"open('/proc/self/comm', 'w').write({tag!r}); import time; time.sleep(60)", "app.jobs.launcher")
        StateDB(root / ".proponent" / "state.db").upsert_job(jid2, status="running", pid=pid2)
        time.sleep(1.0)  # the second has named itself
        assert jobs.refresh(root, jid)["status"] == "running" and jobs.refresh(root, jid2)["status"] == "running"
        # another job's runner, and a launcher-forked process named for another job, are not this job's worker
        jid3 = _job(root, "running", pid)
        jid4 = _job(root, "running", pid2)
        assert jobs.refresh(root, jid3)["status"] == "failed" and jobs.refresh(root, jid4)["status"] == "failed"
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
