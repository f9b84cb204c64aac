"""Flags follow their examples when the data changes: rows removed, re-ordered or added move a flag
to its example's new index, a flag whose example is gone is kept aside (and returns with it), and a
flag is never applied to another example."""
from __future__ import annotations

import sqlite3

import pandas as pd
import pytest

from app.services.flags import db_for, flag_state, missing_flags
from engine import Project
from engine.storage.statedb import StateDB
from tests.conftest import write_tabular_project


@pytest.fixture
def root(tmp_path):
    return write_tabular_project(tmp_path / "t", n_train=30, n_test=8)


def rows(root) -> list[str]:
    return (root / "train.csv").read_text().splitlines()


def write_rows(root, lines: list[str]) -> None:
    (root / "train.csv").write_text("\n".join(lines) + "\n")


def flagged(root, split="train") -> dict:
    """{index: (flag, note)} as every page reads them."""
    return {k: (v["flag"], v["note"]) for k, v in flag_state(db_for(Project.load(root)), split).items()}


def content(root, index: int) -> str:
    return rows(root)[index + 1]


def test_a_flag_follows_its_row_when_rows_are_removed_and_reordered(root):
    db_for(Project.load(root)).set_flag("train", 5, flag="mislabeled", note="wrong label")
    db_for(Project.load(root)).set_flag("train", 20, flag="ok")
    mine5, mine20 = content(root, 5), content(root, 20)
    lines = rows(root)
    write_rows(root, [lines[0]] + lines[3:])  # the first two data rows deleted
    assert flagged(root) == {3: ("mislabeled", "wrong label"), 18: ("ok", None)}
    lines = rows(root)
    write_rows(root, [lines[0]] + lines[1:][::-1])  # every row re-ordered
    got = flagged(root)
    assert {content(root, i) for i in got} == {mine5, mine20}
    assert got[[i for i in got if content(root, i) == mine5][0]] == ("mislabeled", "wrong label")
    assert not missing_flags(db_for(Project.load(root)))


def test_a_flag_whose_row_is_deleted_is_kept_aside_and_returns_with_it(root):
    db_for(Project.load(root)).set_flag("train", 7, flag="leak", note="copy of test 2")
    original = rows(root)
    write_rows(root, original[:8] + original[9:])  # data row 7 (line 9) deleted
    assert flagged(root) == {}  # on no other row
    gone = missing_flags(db_for(Project.load(root)))
    assert [(v["flag"], v["note"]) for v in gone.values()] == [("leak", "copy of test 2")]
    write_rows(root, original[:1] + original[9:] + original[1:9])  # back, at another place
    assert flagged(root) == {len(original) - 1 - 8 + 7: ("leak", "copy of test 2")}
    assert not missing_flags(db_for(Project.load(root)))


def test_a_column_read_as_floats_after_an_edit_still_matches(root):
    """Deleting the one row with a fractional value turns a column from floats into integers."""
    lines = rows(root)
    write_rows(root, [lines[0] + ",count", lines[1] + ",0.5"] + [ln + f",{i}" for i, ln in enumerate(lines[2:])])
    test = (root / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join([test[0] + ",count"] + [ln + ",1" for ln in test[1:]]) + "\n")
    db_for(Project.load(root)).set_flag("train", 10, flag="ambiguous")
    lines = rows(root)
    write_rows(root, lines[:1] + lines[2:])
    assert pd.read_csv(root / "train.csv")["count"].dtype.kind == "i"
    assert flagged(root) == {9: ("ambiguous", None)}


def test_flags_from_before_fingerprints_are_taken_as_they_stand_then_follow(root):
    """A database written without identities (an older Proponent, or a tool given only the path)."""
    StateDB(root / ".proponent" / "state.db").set_flag("train", 4, flag="mislabeled")
    held = content(root, 4)
    assert flagged(root) == {4: ("mislabeled", None)}  # stamped in place
    lines = rows(root)
    write_rows(root, [lines[0], lines[10]] + lines[1:10] + lines[11:])  # one row moved to the top
    (i,) = flagged(root)
    assert content(root, i) == held and i == 5


def test_pair_flags_follow_both_rows(root):
    db_for(Project.load(root)).set_flag("pair", "2:9", flag="leak")
    lines = rows(root)
    write_rows(root, [lines[0]] + lines[2:])
    assert flagged(root, "pair") == {"2:8": ("leak", None)}


def test_a_newer_flag_on_the_target_row_wins_and_the_older_one_is_kept_aside(root):
    db_for(Project.load(root)).set_flag("train", 6, flag="mislabeled", note="old")
    lines = rows(root)
    write_rows(root, [lines[0]] + lines[2:])
    # the same example is flagged again at its new index before anything re-keyed the old flag
    p = Project.load(root)
    StateDB(p.state_dir / "state.db", identity=lambda s, i: (p.data_hash(), None)).set_flag(
        "train", 5, flag="ok", note="new")
    assert flagged(root) == {5: ("ok", "new")}
    assert [v["note"] for v in missing_flags(db_for(Project.load(root))).values()] == ["old"]


def test_every_move_is_in_the_audit_trail(root):
    db_for(Project.load(root)).set_flag("train", 3, flag="mislabeled")
    lines = rows(root)
    write_rows(root, [lines[0]] + lines[2:])
    db = db_for(Project.load(root))
    moves = [a for a in db.audit() if a["field"] == "item"]
    assert [(a["old"], a["new"]) for a in moves] == [("train:3", "train:2")]


def test_a_version_2_database_is_upgraded_and_keeps_its_flags(root):
    path = root / ".proponent" / "state.db"
    path.parent.mkdir(exist_ok=True)
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE flags (split TEXT NOT NULL, item TEXT NOT NULL, flag TEXT, relabel TEXT, "
                      "note TEXT, updated REAL NOT NULL, PRIMARY KEY (split, item));"
                      "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, split TEXT NOT NULL,"
                      " item TEXT NOT NULL, field TEXT NOT NULL, old TEXT, new TEXT, source TEXT);"
                      "CREATE TABLE runs (key TEXT PRIMARY KEY, method TEXT NOT NULL, settings TEXT NOT NULL, "
                      "checkpoint_hash TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, finished REAL, "
                      "fit_seconds REAL, score_seconds REAL, peak_mb REAL, device TEXT, message TEXT, meta TEXT);"
                      "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, params TEXT NOT NULL, status TEXT "
                      "NOT NULL, stage TEXT, done INTEGER DEFAULT 0, total INTEGER DEFAULT 0, rate REAL, eta REAL, "
                      "message TEXT, result TEXT, pid INTEGER, created REAL NOT NULL, updated REAL NOT NULL);"
                      "INSERT INTO flags VALUES ('train', '12', 'mislabeled', NULL, 'kept', 1.0);"
                      "PRAGMA user_version = 2;")
    con.close()
    held = content(root, 12)
    assert flagged(root) == {12: ("mislabeled", "kept")}
    lines = rows(root)
    write_rows(root, [lines[0]] + lines[4:])
    (i,) = flagged(root)
    assert content(root, i) == held


def test_a_click_on_a_locked_database_fails_within_the_app_timeout(root, monkeypatch):
    """The app's writes wait APP_BUSY_TIMEOUT_S for another process's lock, not SQLite's 30 s default."""
    import app.services.flags as flags
    from engine.core.errors import ProponentError

    db = db_for(Project.load(root))
    assert db.busy_timeout == flags.APP_BUSY_TIMEOUT_S < 30
    monkeypatch.setattr(flags, "APP_BUSY_TIMEOUT_S", 0.2)
    other = sqlite3.connect(root / ".proponent" / "state.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        with pytest.raises(ProponentError, match="locked by another process"):
            db_for(Project.load(root)).set_flag("train", 1, flag="ok")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert flagged(root) == {}
