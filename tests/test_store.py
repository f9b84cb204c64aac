"""State (SQLite) and array stores: flags are never lost, writes are atomic."""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.storage.arrays import ChunkedArray, atomic_save_npy
from engine.storage.statedb import StateDB

ROOT = Path(__file__).resolve().parents[1]


def test_flags_survive_restart_and_record_audit(tmp_path):
    db = StateDB(tmp_path / "state.db")
    db.set_flag("train", 5, flag="mislabeled", note="looks like a 7")
    db.set_flag("train", 5, relabel="7")
    db.set_flag("train", 5, flag="ok")
    again = StateDB(tmp_path / "state.db")  # a restarted server
    f = again.flags("train")["5"]
    assert (f["flag"], f["relabel"], f["note"]) == ("ok", "7", "looks like a 7")
    trail = [(a["field"], a["old"], a["new"]) for a in reversed(again.audit())]
    assert trail == [("flag", None, "mislabeled"), ("note", None, "looks like a 7"), ("relabel", None, "7"),
                     ("flag", "mislabeled", "ok")]
    assert again.path.with_name("state.db-wal").exists() or again._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "state.db"
    StateDB(path)

    def writer(offset):
        db = StateDB(path)  # a second tab / process has its own connection
        for i in range(50):
            db.set_flag("train", offset + i, flag="leak")

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(StateDB(path).flags("train")) == 200


def test_bad_flag_value_rejected(tmp_path):
    db = StateDB(tmp_path / "s.db")
    with pytest.raises(ValueError):
        db.set_flag("train", 1, flag="bogus")
    assert db.flags() == {}


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.npy"
    atomic_save_npy(path, np.arange(5))
    import engine.storage.arrays as store

    def broken_save(f, arr, allow_pickle=False):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(store.np, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save_npy(path, np.arange(10))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    assert not list(tmp_path.glob("*.tmp"))


def test_chunked_array_resets_on_different_request(tmp_path):
    a = ChunkedArray(tmp_path / "c", 10, 4, meta={"k": 1})
    a.write_chunk(0, np.ones((4, 2)))
    assert a.missing_chunks() == [1, 2]
    b = ChunkedArray(tmp_path / "c", 10, 4, meta={"k": 2})  # another model/projection: never mix
    assert b.missing_chunks() == [0, 1, 2]


def test_engine_never_imports_streamlit_or_app():
    for path in (ROOT / "engine").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert not n.split(".")[0] in ("streamlit", "app"), f"{path} imports {n}"


def test_zero_dim_arrays_stay_zero_dim(tmp_path):
    """TRAK stores its λ as a 0-d array and reads it back with float() when it refits from cache."""
    atomic_save_npy(tmp_path / "lam.npy", np.array(0.25))
    back = np.load(tmp_path / "lam.npy")
    assert back.shape == () and float(back) == 0.25


def test_full_disk_is_one_line_and_keeps_what_was_written(digits_project, tmp_path, monkeypatch, capsys):
    """A disk that fills up mid-run ends the command with one line naming the file (exit 2, no
    traceback); the chunks finished before stay, and the next run resumes from them."""
    import errno
    import shutil

    import engine.storage.arrays as store
    from engine.cli import main

    proj = tmp_path / "digits"
    shutil.copytree(digits_project.root, proj, ignore=shutil.ignore_patterns(".proponent"))
    real_save, calls = store.np.save, {"n": 0}

    def filling_save(f, arr, allow_pickle=False):
        calls["n"] += 1
        if calls["n"] > 1:  # the first chunk lands, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, arr, allow_pickle=allow_pickle)

    monkeypatch.setattr(store.np, "save", filling_save)
    code = main(["attribute", str(proj), "--method", "grad-dot", "--set", "proj_dim=64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left on device" in err[0] and "Traceback" not in err[0], err
    assert ".npy" in err[0] and not list(proj.rglob("*.tmp"))
    kept = list(proj.rglob("chunk_*.npy"))
    assert len(kept) == 1
    monkeypatch.setattr(store.np, "save", real_save)
    assert main(["attribute", str(proj), "--method", "grad-dot", "--set", "proj_dim=64"]) == 0
    assert kept[0].is_file()


def test_a_reset_store_deletes_only_its_own_chunks(tmp_path):
    a = ChunkedArray(tmp_path / "c", 10, 4, meta={"k": 1})
    a.write_chunk(0, np.ones((4, 2)))
    (tmp_path / "c" / "notes.txt").write_text("the user's")
    (tmp_path / "c" / "chunk_backup.csv").write_text("the user's too")
    np.save(tmp_path / "c" / "chunk_mine.npy", np.zeros(3))
    ChunkedArray(tmp_path / "c", 10, 4, meta={"k": 2})  # another request: its old chunks go
    assert not (tmp_path / "c" / "chunk_000000.npy").exists()
    assert (tmp_path / "c" / "notes.txt").read_text() == "the user's"
    assert (tmp_path / "c" / "chunk_backup.csv").is_file() and (tmp_path / "c" / "chunk_mine.npy").is_file()
