"""Bad input ends in one line and exit code 2, never a traceback, and loses nothing: the CLI's file
errors (exports, state.db, cached results, bench --json), a model.py that exits, and out-of-range
numbers on the command line."""
from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

from engine.cli import main
from tests.conftest import write_tabular_project

METHOD = ["--method", "grad-dot"]


@pytest.fixture
def proj(logreg_project, tmp_path):
    """A trained copy of the small logistic-regression project, without state."""
    dest = tmp_path / "p"
    shutil.copytree(logreg_project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    return dest


def run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def one_line(code, err, *names):
    assert code == 2, (code, err)
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in names:
        assert str(n) in err[0], (n, err)
    return err[0]


def no_run_stored(proj):
    return not list((proj / ".proponent").rglob("scores.npy"))


# ---------------------------------------------------------------------------- --export
def test_export_never_overwrites_a_users_rows_csv(proj, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rows.csv").write_text("my notes\n")
    line = one_line(*run(capsys, "attribute", proj, *METHOD, "--export", out / "scores.npy"), out / "rows.csv")
    assert "not written by Proponent" in line
    assert (out / "rows.csv").read_text() == "my notes\n"
    assert not (out / "scores.npy").exists()
    assert no_run_stored(proj)  # refused before the run, not after it


@pytest.mark.parametrize("content", ["text", "int-npy", "1d-npy"])
def test_export_never_overwrites_a_users_npy(proj, tmp_path, capsys, content):
    out = tmp_path / "mine.npy"
    if content == "text":
        out.write_text("hello\n")
    else:
        np.save(out, np.arange(6).reshape(2, 3) if content == "int-npy" else np.ones(4))
    before = out.read_bytes()
    one_line(*run(capsys, "attribute", proj, *METHOD, "--export", out), out, "not a score matrix")
    assert out.read_bytes() == before
    assert not (tmp_path / "rows.csv").exists() and no_run_stored(proj)


def test_export_again_to_the_same_path_replaces_the_previous_export(proj, tmp_path, capsys):
    out = tmp_path / "out" / "scores.npy"
    assert main(["attribute", str(proj), *METHOD, "--export", str(out)]) == 0
    first = np.load(out)
    rows = (out.parent / "rows.csv").read_text()
    assert rows.splitlines()[0] == "split,index,file,label"
    assert main(["attribute", str(proj), *METHOD, "--export", str(out)]) == 0
    assert np.array_equal(np.load(out), first) and (out.parent / "rows.csv").read_text() == rows
    capsys.readouterr()


def test_export_path_problems_are_one_line_before_the_run(proj, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile.npy"
    afile.write_text("keep me")
    one_line(*run(capsys, "attribute", proj, *METHOD, "--export", folder), folder, "is a folder")
    one_line(*run(capsys, "attribute", proj, *METHOD, "--export", afile / "x.npy"), afile, "not a folder")
    one_line(*run(capsys, "attribute", proj, *METHOD, "--export", ""), "--export", "empty")
    one_line(*run(capsys, "attribute", proj, *METHOD, "--export", folder / "rows.csv"), "rows.csv")
    assert afile.read_text() == "keep me" and not list(folder.iterdir())
    assert no_run_stored(proj)


def test_export_into_an_unwritable_folder_is_one_line(proj, tmp_path, capsys, monkeypatch):
    import engine.cli as cli

    out = tmp_path / "locked" / "s.npy"
    out.parent.mkdir()
    real = cli.os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if str(p) == str(out.parent) else real(p, mode))
    one_line(*run(capsys, "attribute", proj, *METHOD, "--export", out), out, "cannot write")
    assert no_run_stored(proj)


def test_write_blocks_refused_writes_are_one_line_naming_the_file(tmp_path, monkeypatch):
    import engine.storage.arrays as arrays
    from engine.core.errors import ProponentError
    from engine.storage.blocks import iter_row_blocks, write_blocks

    m = np.ones((3, 2))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ProponentError, match="afile"):
        write_blocks(afile / "s.npy", m.shape, iter_row_blocks(m))
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(ProponentError, match="is a folder"):
        write_blocks(tmp_path / "d.npy", m.shape, iter_row_blocks(m))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(arrays.tempfile, "mkstemp", refuse)
    with pytest.raises(ProponentError, match="permission denied") as e:
        write_blocks(tmp_path / "s.npy", m.shape, iter_row_blocks(m))
    assert "s.npy" in str(e.value) and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------- state.db
def test_a_corrupt_state_db_is_one_line_and_kept(proj, capsys):
    db = proj / ".proponent" / "state.db"
    db.parent.mkdir(exist_ok=True)
    db.write_text("junk\n")
    line = one_line(*run(capsys, "attribute", proj, *METHOD), db, "move it away")
    assert "not a readable SQLite database" in line
    assert db.read_text() == "junk\n"  # never deleted nor rewritten


def test_a_folder_in_place_of_state_db_is_one_line(proj, capsys):
    db = proj / ".proponent" / "state.db"
    db.mkdir(parents=True)
    one_line(*run(capsys, "attribute", proj, *METHOD), db, "is a folder")
    assert db.is_dir()


def test_a_read_only_state_db_is_one_line(proj, capsys, monkeypatch):
    """As another user would see a state.db it may read but not write (root ignores file modes, so the
    database is opened read-only the way SQLite does for such a file)."""
    from engine.storage.statedb import StateDB

    from engine import Project

    db = proj / ".proponent" / "state.db"
    StateDB.for_project(Project.load(proj)).upsert_run("x", method="m", settings={}, checkpoint_hash="h")
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda path, **kw: real(f"file:{path}?mode=ro", uri=True, **kw))
    one_line(*run(capsys, "attribute", proj, *METHOD), db, "read-only")


# ---------------------------------------------------------------------------- cached results
@pytest.mark.parametrize("damage", ["truncated", "not-npy", "pickled"])
def test_a_damaged_cached_result_is_recomputed(proj, capsys, damage):
    assert main(["attribute", str(proj), *METHOD, "--export", str(proj.parent / "ref.npy")]) == 0
    want = np.load(proj.parent / "ref.npy")
    (stored,) = (proj / ".proponent" / "runs").glob("grad-dot-*/scores.npy")
    if damage == "truncated":
        stored.write_bytes(stored.read_bytes()[:300])
    elif damage == "not-npy":
        stored.write_text("garbage")
    else:
        np.save(stored, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["attribute", str(proj), *METHOD, "--export", str(proj.parent / "again.npy")]) == 0
    assert np.array_equal(np.load(proj.parent / "again.npy"), want)
    assert np.array_equal(np.load(stored), want.astype(np.float32))
    stored.write_bytes(stored.read_bytes()[:300])
    assert main(["triage", str(proj), *METHOD, "--json"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_read_back_never_unpickles_and_checks_shapes(tmp_path):
    from engine.api import _read_back

    good = tmp_path / "good.npy"
    np.save(good, np.ones((2, 3)))
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert _read_back({"s": good}, {"s": (2, 3)})["s"].shape == (2, 3)
    assert _read_back({"s": good}, {"s": (3, 2)}) is None
    assert _read_back({"s": obj}, {"s": (1,)}) is None
    assert _read_back({"s": tmp_path / "missing.npy"}, {"s": (1,)}) is None


def _derived(name: str):
    """(compute(project) → comparable value, glob of the cached file under .proponent/) for each result
    cached outside a run's scores."""
    from engine.api import cached_scores
    from engine.workflows.counterfactual import query_scores
    from engine.workflows.leaks import detect_leaks
    from engine.workflows.mislabel import label_probabilities

    return {
        "trak-kernel": (lambda p: cached_scores(p, "trak", {"proj_dim": 16}, use_cache=False)["scores"],
                        "features/**/kernel.npy"),
        "trak-lambda": (lambda p: cached_scores(p, "trak", {"proj_dim": 16}, use_cache=False)["scores"],
                        "features/**/lambda.npy"),
        "cv-probs": (lambda p: label_probabilities(p, folds=2)[0], "cache/cv_probs_*.npy"),
        "leak-null": (lambda p: detect_leaks(p, "grad-dot")["threshold"], "runs/grad-dot-*/leak_null_*.npy"),
        "query-scores": (lambda p: query_scores(p, 1, "grad-dot"), "runs/grad-dot-*/scores.npy"),
    }[name]


def _store_first(name: str, p) -> None:
    """What must be cached before the damaged read (one query's scores read a stored run)."""
    if name == "query-scores":
        from engine.api import cached_scores

        cached_scores(p, "grad-dot")


@pytest.mark.parametrize("name", ["trak-kernel", "trak-lambda", "cv-probs", "leak-null", "query-scores"])
@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_a_damaged_derived_cache_is_recomputed(proj, name, damage):
    """Kernels, cross-validated probabilities, leak nulls and the scores one query reads back: a damaged
    file is a miss (the same result again, the file replaced), never an error or a wrong answer."""
    from engine import Project

    compute, pattern = _derived(name)
    p = Project.load(proj)
    _store_first(name, p)
    want = np.array(compute(p))
    (stored,) = (proj / ".proponent").glob(pattern)
    good = np.load(stored)
    if damage == "truncated":
        stored.write_bytes(stored.read_bytes()[:100])
    else:
        np.save(stored, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    again = np.array(compute(Project.load(proj)))
    if name == "query-scores":  # the miss scores the one query afresh in float64; the run stores float32
        np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())
    else:
        assert np.array_equal(again, want)
    if name != "query-scores":  # one query's read never writes the whole run back
        assert np.array_equal(np.load(stored), good)


# ---------------------------------------------------------------------------- bench --json
@pytest.mark.parametrize("form", ["--json", "--json="])
def test_bench_json_path_is_checked_before_the_bench_runs(proj, tmp_path, capsys, monkeypatch, form):
    import engine.cli as cli

    monkeypatch.setattr(cli, "cli_main", lambda argv: pytest.fail("the bench ran"))
    args = [form + str(tmp_path)] if form.endswith("=") else [form, str(tmp_path)]
    one_line(*run(capsys, "bench", proj, *args), tmp_path, "is a folder")
    one_line(*run(capsys, "bench", "--suite", *args), tmp_path, "is a folder")


# ---------------------------------------------------------------------------- the last resort
@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied", "/x/y.npy"),
                                 IsADirectoryError(21, "Is a directory", "/x/dir"),
                                 NotADirectoryError(20, "Not a directory", "/x/f/g"),
                                 FileExistsError(17, "File exists", "/x/f"),
                                 FileNotFoundError(2, "No such file or directory", "/x/gone")])
def test_unforeseen_file_errors_are_one_line(proj, capsys, monkeypatch, exc):
    import engine.cli as cli

    def boom(a):
        raise exc

    monkeypatch.setattr(cli, "cmd_cache", boom)
    line = one_line(*run(capsys, "cache", proj), exc.filename, exc.strerror)
    assert line == f"proponent: error: {exc.filename}: {exc.strerror}"


def test_unforeseen_database_errors_are_one_line_and_bugs_keep_their_traceback(proj, capsys, monkeypatch):
    import engine.cli as cli

    def locked(a):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(cli, "cmd_cache", locked)
    one_line(*run(capsys, "cache", proj), "database is locked")

    def bug(a):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_cache", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["cache", str(proj)])


# ---------------------------------------------------------------------------- model.py exits
EXIT_AT_IMPORT = "import sys\nsys.exit(3)\n"
EXIT_IN_FACTORY = '''
import sys
def build(input_shape, num_classes):
    sys.exit(3)
'''


@pytest.mark.parametrize("model", [EXIT_AT_IMPORT, EXIT_IN_FACTORY])
def test_a_model_py_that_exits_is_one_line_naming_it(tmp_path, capsys, model):
    root = write_tabular_project(tmp_path / "p", model=model)
    line = one_line(*run(capsys, "info", root), root / "model.py", "sys.exit(3)")
    assert line.startswith("proponent: error: ")


def test_proponents_own_exits_still_stand(proj, capsys):
    with pytest.raises(SystemExit) as e:  # the bench's own argument parser
        main(["bench", str(proj), "--no-such-option"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("args, option", [
    (["triage", "{p}", "--limit", "-1"], "--limit"),
    (["triage", "{p}", "--limit", "0"], "--limit"),
    (["attribute", "{p}", "--top", "-1"], "--top"),
    (["attribute", "{p}", "--top", "0"], "--top"),
    (["leaks", "{p}", "--method", "grad-dot", "--threshold", "nan"], "--threshold"),
    (["leaks", "{p}", "--method", "grad-dot", "--threshold", "inf"], "--threshold"),
    (["leaks", "{p}", "--fpr", "nan"], "--fpr"),
])
def test_out_of_range_numbers_are_refused_by_the_parser(proj, capsys, args, option):
    with pytest.raises(SystemExit) as e:
        main([a.format(p=proj) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"argument {option}" in err[-1] and "Traceback" not in "\n".join(err)
    assert no_run_stored(proj)


# ---------------------------------------------------------------------------- values that used to be ignored
def test_a_setting_given_twice_is_one_line(proj, capsys):
    one_line(*run(capsys, "attribute", proj, "--method", "trak", "--set", "proj_dim=16", "--set", "proj_dim=32"),
             "--set proj_dim is given twice")
    assert no_run_stored(proj)


@pytest.mark.parametrize("criterion", [["--older-than", "3"], ["--max-size", "10"], ["--all"]])
def test_prune_criteria_without_prune_are_one_line(proj, capsys, criterion):
    one_line(*run(capsys, "cache", proj, *criterion), "add --prune")


@pytest.mark.parametrize("flag, value", [("--processes", "0"), ("--processes", "-2"), ("--queries", "-1"),
                                         ("--subsets", "1"), ("--seeds", "0")])
def test_bench_counts_out_of_range_are_refused(proj, capsys, flag, value):
    with pytest.raises(SystemExit) as e:  # argparse's usage error, before any work
        main(["bench", str(proj), flag, value])
    assert e.value.code == 2 and f"{flag}: must be" in capsys.readouterr().err


def test_a_state_folder_that_is_a_file_is_one_line(proj, capsys):
    (proj / ".proponent").write_text("mine")
    one_line(*run(capsys, "attribute", proj, *METHOD), proj / ".proponent", "is a file, not a folder")
    assert (proj / ".proponent").read_text() == "mine"
