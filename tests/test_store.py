"""State (SQLite) and array stores: flags are never lost, writes are atomic."""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.core.errors import ProponentError
from engine.storage.arrays import ChunkedArray, atomic_save_npy, cast_float
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
    traceback): the store's space is reserved before its first chunk, so the failure comes before
    anything is half-made; the store finished before stays, and the next run resumes from it."""
    import errno
    import shutil

    import engine.storage.arrays as store
    from engine.cli import main

    proj = tmp_path / "digits"
    shutil.copytree(digits_project.root, proj, ignore=shutil.ignore_patterns(".proponent"))
    from engine import Project

    Project.load(proj).state_dir  # decode the images into their cache first: only stores reserve space below
    real, calls = store.os.posix_fallocate, {"n": 0}

    def filling(fd, offset, size):
        calls["n"] += 1
        if calls["n"] > 1:  # Grad-Dot's loss store is reserved and written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, size)

    monkeypatch.setattr(store.os, "posix_fallocate", filling)
    code = main(["attribute", str(proj), "--method", "grad-dot", "--set", "proj_dim=64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left on device" in err[0] and "Traceback" not in err[0], err
    assert "data.npy" in err[0] and not list(proj.rglob("*.tmp"))
    kept = list(proj.rglob("data.npy"))
    assert len(kept) == 1 and kept[0].parent.name == "loss"
    finished = kept[0].stat().st_mtime_ns
    monkeypatch.setattr(store.os, "posix_fallocate", real)
    assert main(["attribute", str(proj), "--method", "grad-dot", "--set", "proj_dim=64"]) == 0
    assert kept[0].stat().st_mtime_ns == finished  # resumed: the finished store was not rewritten
    assert len(list(proj.rglob("data.npy"))) == 2


def test_a_reset_store_deletes_only_its_own_files(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    np.save(folder / "chunk_000003.npy", np.zeros((4, 2)))  # the older layout's chunk: this store's to remove
    a = ChunkedArray(folder, 10, 4, meta={"k": 1})
    a.write_chunk(0, np.ones((4, 2)))
    assert not (folder / "chunk_000003.npy").exists()
    (folder / "notes.txt").write_text("the user's")
    (folder / "chunk_backup.csv").write_text("the user's too")
    np.save(folder / "chunk_mine.npy", np.zeros(3))
    np.save(folder / "data_mine.npy", np.zeros(3))
    b = ChunkedArray(folder, 10, 4, meta={"k": 2})  # another request: its old files go
    assert not (folder / "data.npy").exists() and b.missing_chunks() == [0, 1, 2]
    assert (folder / "notes.txt").read_text() == "the user's"
    assert (folder / "chunk_backup.csv").is_file() and (folder / "chunk_mine.npy").is_file()
    assert (folder / "data_mine.npy").is_file()


def test_store_is_one_preallocated_array_with_a_done_mask(tmp_path):
    """The whole array exists (space reserved) before the first chunk; a chunk whose rows were
    written but whose done byte was not (a process killed in between) counts as missing and is
    rewritten."""
    s = ChunkedArray(tmp_path / "s", 10, 4, meta={"k": 1}, width=3, dtype="float32")
    data = tmp_path / "s" / "data.npy"
    assert data.stat().st_size >= 10 * 3 * 4 and np.load(data, mmap_mode="r").shape == (10, 3)
    assert s.missing_chunks() == [0, 1, 2]
    s.write_chunk(1, np.full((4, 3), 2.0))
    s.write_chunk(2, np.full((2, 3), 3.0))
    assert (tmp_path / "s" / "done.bin").read_bytes() == b"\x00\x01\x01"
    # a killed writer: chunk 0's rows landed in the array, its done byte did not
    mm = np.load(data, mmap_mode="r+")
    mm[0:4] = 7.0
    mm.flush()
    del mm
    again = ChunkedArray(tmp_path / "s", 10, 4, meta={"k": 1}, width=3, dtype="float32")
    assert again.missing_chunks() == [0]
    with pytest.raises(RuntimeError, match="chunk 0"):
        again.read_chunk(0)
    again.write_chunk(0, np.ones((4, 3)))
    np.testing.assert_array_equal(again.to_array()[:, 0], [1, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(again.read_rows(np.array([9, 0, 5]))[:, 1], [3, 1, 2])
    with pytest.raises(ProponentError, match="more than the"):
        again.to_array(max_bytes=64)
    # another width under the same request starts over rather than mixing
    assert ChunkedArray(tmp_path / "s", 10, 4, meta={"k": 1}, width=5).missing_chunks() == [0, 1, 2]


def test_float16_store_scales_a_chunk_beyond_float16s_range(tmp_path):
    s = ChunkedArray(tmp_path / "h", 6, 3, width=2, dtype="float16")
    small = np.array([[0.5, -1.25], [3.0, 4.0], [1e-3, 2.0]])
    big = np.array([[1e6, -3e7], [2.5e5, 1.0], [7.0, 8e8]])
    s.write_chunk(0, small)
    s.write_chunk(1, big)
    assert np.load(tmp_path / "h" / "data.npy", mmap_mode="r").dtype == np.float16
    assert s.scale(0) == 1.0 and s.scale(1) > 1 and np.log2(s.scale(1)).is_integer()
    back = s.to_array()
    assert back.dtype == np.float32 and np.isfinite(back).all()
    np.testing.assert_allclose(back, np.vstack([small, big]), rtol=1e-3, atol=1e-3 * s.scale(1) / 2**10)


def test_bfloat16_store_keeps_float32s_range_in_half_the_bytes_written_in_parts(tmp_path):
    """A bfloat16 store (the curvature methods' training gradients) keeps tiny and huge values that
    float16 would flush to zero or overflow, rounds each to 8 significant bits (nearest even, as
    torch), takes half a float32 store's bytes, and can be written a part of a chunk at a time."""
    import torch

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((7, 5)) * np.logspace(-30, 30, 7)[:, None]).astype(np.float32)
    rows[0, 0], rows[1, 1] = 1e-38, -3e38  # float32's extremes: float16 has neither
    s = ChunkedArray(tmp_path / "b", 7, 4, width=5, dtype="bfloat16")
    s.write_rows(0, 0, rows[:2])
    # values already rounded by the writer (EK-FAC's pass), handed over as their bits: stored as they are
    s.write_bfloat16_rows(0, 2, torch.from_numpy(rows[2:4]).bfloat16().view(torch.int16).numpy())
    with pytest.raises(ValueError, match="16-bit integers"):
        s.write_bfloat16_rows(0, 2, rows[2:4])  # float32 values are not bits
    with pytest.raises(ValueError, match="outside chunk"):
        s.write_bfloat16_rows(0, 3, np.zeros((2, 5), np.int16))
    assert s.missing_chunks() == [0, 1]
    s.mark_done(0)
    s.write_chunk(1, rows[4:])
    want = torch.from_numpy(rows).to(torch.bfloat16).float().numpy()
    back = s.to_array()
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, want)
    assert np.all(back != 0) and np.isfinite(back).all()
    np.testing.assert_allclose(back, rows, rtol=2.0**-8)  # at most half a unit in the 8th bit
    assert not np.array_equal(back, rows)  # really rounded: not a float32 store under another name
    np.testing.assert_array_equal(s.read_rows(np.array([6, 1])), want[[6, 1]])
    np.testing.assert_array_equal(np.vstack([b for *_, b in s.iter_chunks(max_bytes=2 * 5 * 4)]), want)
    # as torch bfloat16 tensors straight from the bits (bfloat16 products), in parts of at most max_bytes
    parts = list(s.iter_bfloat16(max_bytes=3 * 5 * 2))
    assert [(lo, hi) for lo, hi, _ in parts] == [(0, 3), (3, 4), (4, 7)]
    assert all(t.dtype == torch.bfloat16 for *_, t in parts)
    np.testing.assert_array_equal(torch.cat([t for *_, t in parts]).float().numpy(), want)
    # reuse: every part read into one buffer (a part is valid until the next is asked for), same values
    seen, pointers = [], set()
    for lo, hi, t in s.iter_bfloat16(max_bytes=3 * 5 * 2, reuse=True):
        seen.append((lo, hi, t.float().numpy().copy()))
        pointers.add(t.data_ptr())
    assert [(lo, hi) for lo, hi, _ in seen] == [(0, 3), (3, 4), (4, 7)] and len(pointers) == 1
    np.testing.assert_array_equal(np.vstack([v for *_, v in seen]), want)
    f32 = ChunkedArray(tmp_path / "f", 7, 4, width=5)
    with pytest.raises(ValueError, match="bfloat16 stores"):
        next(f32.iter_bfloat16())
    with pytest.raises(ValueError, match="bfloat16 stores"):
        f32.write_bfloat16_rows(0, 0, np.zeros((1, 5), np.int16))
    assert s.data_path.stat().st_size - 128 == (f32.data_path.stat().st_size - 128) // 2 == 7 * 5 * 2
    # another dtype asked of the same folder starts over rather than reading bits as something else
    again = ChunkedArray(tmp_path / "b", 7, 4, width=5, dtype="float32")
    assert again.missing_chunks() == [0, 1]
    with pytest.raises(ValueError, match="bfloat16"):
        ChunkedArray(tmp_path / "x", 7, 4, width=5, dtype="int8")


def _open_state_db(path, barrier, results):
    barrier.wait()  # both processes open the new database at the same moment
    try:
        StateDB(path).list_runs()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        results.put(f"{type(e).__name__}: {e}")


def test_two_processes_creating_the_state_db_at_once_both_succeed(tmp_path):
    """Switching a new SQLite file to WAL takes a lock its busy timeout does not wait for: two
    processes (torchrun's ranks, the app and a worker) opening a new state.db at once failed with
    'database is locked' in about a quarter of the opens before the retry."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    failures = []
    for i in range(20):
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open_state_db, args=(tmp_path / f"s{i}.db", barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failures += [r for r in (results.get(timeout=10) for _ in procs) if r != "ok"]
    assert not failures, failures


@pytest.mark.parametrize("src,dst", [(np.float32, np.float16), (np.float64, np.float16), (np.float16, np.float32),
                                     (np.float16, np.float64)])
def test_half_casts_are_bit_identical_to_numpy(src, dst):
    """The store's float16 casts go through torch for speed; they must equal numpy's astype bit for
    bit: rounding to nearest even, overflow to inf, subnormals, signed zeros and NaN."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(48_989) * 10.0 ** rng.integers(-9, 6, 48_989)
    x = np.concatenate([x, [np.inf, -np.inf, np.nan, 0.0, -0.0, 65504, 65520, 65519.9, 6e-8, 3e-8, 2.98e-8]])
    a = x.astype(src).reshape(-1, 7)  # 49,000 values
    with np.errstate(over="ignore"):
        want = a.astype(dst)
    got = cast_float(a, dst)
    assert got.dtype == np.dtype(dst) and got.shape == a.shape
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dst).itemsize]
    assert np.array_equal(got.view(bits), want.view(bits))


def test_a_chunk_written_in_parts_counts_once_marked_and_reads_come_in_blocks(tmp_path):
    """write_rows puts part of a float32 chunk on disk without marking it done; iter_chunks(max_bytes)
    reads a chunk in blocks; reads land in the process's own memory (no memory map of data.npy stays
    open behind a returned block: its pages counted in resident memory on top of the copy)."""
    s = ChunkedArray(tmp_path / "p", 10, 4, width=3)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    s.write_rows(1, 0, rows[4:6])
    assert s.missing_chunks() == [0, 1, 2]  # half a chunk is not a chunk
    s.write_rows(1, 2, rows[6:8])
    s.mark_done(1)
    s.write_chunk(0, rows[:4])
    s.write_chunk(2, rows[8:])
    assert s.complete
    with pytest.raises(ValueError, match="outside chunk 2"):
        s.write_rows(2, 1, rows[:2])
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        ChunkedArray(tmp_path / "h", 4, 2, width=3, dtype="float16").write_rows(0, 0, rows[:2])
    blocks = list(s.iter_chunks(max_bytes=2 * 3 * 4))  # two rows a block, never across a chunk
    assert [(lo, hi) for lo, hi, _ in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    np.testing.assert_array_equal(np.vstack([b for *_, b in blocks]), rows)
    assert [(lo, hi) for lo, hi, _ in s.iter_chunks()] == [(0, 4), (4, 8), (8, 10)]
    held = [s.read_chunk(1), s.to_array(), blocks[0][2]]
    assert all(h.flags.owndata and h.flags.writeable for h in held)
    assert str(s.data_path) not in Path("/proc/self/maps").read_text()
    np.testing.assert_array_equal(s.read_rows(np.array([9, 0, 5])), rows[[9, 0, 5]])


def test_all_finite_sees_nan_and_inf_and_not_an_overflowing_sum():
    """The stores' check of a gradient block: a sum carries NaN and ±inf; finite entries whose sum
    overflows float32 are still finite (checked entry by entry)."""
    import torch

    from engine.autodiff.compute import all_finite

    block = torch.randn(64, 300)
    assert all_finite(block) and all_finite(torch.empty(0, 5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        b = block.clone()
        b[17, 123] = bad
        assert not all_finite(b)
    both = block.clone()
    both[0, 0], both[1, 1] = float("inf"), float("-inf")  # their sum is NaN, still caught
    assert not all_finite(both)
    huge = torch.full((4, 4), 3e38)
    assert not torch.isfinite(huge.sum()) and all_finite(huge)


def test_background_writes_run_in_order_stop_at_the_first_failure_and_raise_it_in_the_caller(tmp_path):
    """EK-FAC's training-gradient store is written on a background thread while the next part is
    computed. The done mark, submitted after a chunk's rows, must never land after a failed row
    write; the failure reaches the caller; queued writes are bounded; a failing body still drains."""
    from engine.storage.background import BackgroundWriter

    done = []
    with BackgroundWriter() as w:
        for i in range(50):
            w.submit(done.append, i)
    assert done == list(range(50))  # all of them, in order, by the end of the block

    def fail(i):
        raise OSError(28, f"No space left on device (write {i})")

    done.clear()
    hold = threading.Event()
    with pytest.raises(OSError, match="write 1"):
        with BackgroundWriter() as w:
            w.submit(lambda: (done.append(0), hold.wait(5)))
            w.submit(fail, 1)
            w.submit(done.append, "mark after the failed write")  # queued before the failure happens
            hold.set()
            w.close()
    assert done == [0]  # nothing after the failure ran
    with pytest.raises(OSError, match="write 1"):
        w.submit(done.append, 3)  # and a closed writer refuses more work (its failure first)

    # bounded: with depth 2 and the thread held by a first task, a fourth submit waits
    gate, entered = threading.Event(), threading.Event()
    w = BackgroundWriter(depth=2)
    w.submit(lambda: (entered.set(), gate.wait()))
    assert entered.wait(5)
    w.submit(done.append, "a")
    w.submit(done.append, "b")
    fourth = threading.Thread(target=w.submit, args=(done.append, "c"))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive()  # blocked: two tasks already wait
    gate.set()
    fourth.join(5)
    w.close()
    assert done[-3:] == ["a", "b", "c"]

    # the body fails (a cancel, Ctrl-C): what it queued still finishes, and the body's error propagates
    done.clear()
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter() as w:
            w.submit(done.append, "rows")
            w.submit(done.append, "mark")
            raise KeyboardInterrupt
    assert done == ["rows", "mark"]
