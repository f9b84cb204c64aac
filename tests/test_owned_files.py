"""Proponent never deletes or overwrites what it did not create: `prepare --dir` over a user's files,
`cache --prune` over entries it did not write (or behind a symlink), and `train` over a checkpoint
folder holding a user's file. Each refusal is one line naming the file, exit code 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.cli import main
from tests.conftest import write_tabular_project


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("PROPONENT_THREADS", "1")


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *names: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- A: prepare --dir


def test_prepare_refuses_to_overwrite_a_users_file(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.py").write_text("# my model\n")
    rc, _, err = run(capsys, "prepare", "wine", "--dir", mine, "--no-train")
    assert rc == 2
    one_line_error(err, str(mine / "model.py"))
    assert (mine / "model.py").read_text() == "# my model\n"
    assert not (mine / "project.toml").exists()  # refused before writing anything
    assert sorted(p.name for p in mine.iterdir()) == ["model.py"]  # no staging folder left behind


def test_prepare_refuses_over_an_edited_project_and_reruns_over_its_own(tmp_path, capsys):
    d = tmp_path / "w"
    assert run(capsys, "prepare", "wine", "--dir", d, "--no-train")[0] == 0
    # the same files again: nothing to lose, so no --force needed (an interrupted prepare resumes)
    assert run(capsys, "prepare", "wine", "--dir", d, "--no-train")[0] == 0
    (d / "data" / "test.csv").write_text("my,edits\n")
    rc, _, err = run(capsys, "prepare", "wine", "--dir", d, "--no-train")
    assert rc == 2
    one_line_error(err, str(d / "data" / "test.csv"), "--force")
    assert (d / "data" / "test.csv").read_text() == "my,edits\n"


def test_prepare_force_overwrites_only_its_own_files(tmp_path, capsys):
    m2 = tmp_path / "m2"
    (m2 / "data").mkdir(parents=True)
    (m2 / "data" / "other.csv").write_text("keep\n")
    (m2 / "notes.md").write_text("mine\n")
    assert run(capsys, "prepare", "wine", "--dir", m2, "--no-train")[0] == 0
    assert (m2 / "data" / "train.csv").is_file() and (m2 / "project.toml").is_file()
    (m2 / "model.py").write_text("# edited\n")
    assert run(capsys, "prepare", "wine", "--dir", m2, "--no-train", "--force")[0] == 0
    assert (m2 / "data" / "other.csv").read_text() == "keep\n"
    assert (m2 / "notes.md").read_text() == "mine\n"
    assert (m2 / "data" / "train.csv").is_file() and (m2 / "data" / "test.csv").is_file()
    assert (m2 / "model.py").read_text() != "# edited\n"  # prepare's own file, rewritten by --force
    assert not [p for p in m2.iterdir() if "partial" in p.name]


# ----------------------------------------------------------------------------- B: cache --prune


@pytest.fixture(scope="module")
def cached_project(tmp_path_factory):
    """A small trained tabular project with one real cached run (grad-dot)."""
    from engine import Project
    from engine.api import cached_scores
    from engine.core.train import record_training

    root = write_tabular_project(tmp_path_factory.mktemp("owned") / "tab")
    p = Project.load(root)
    record_training(p)
    cached_scores(p, "grad-dot")
    return root


@pytest.fixture
def project(cached_project, tmp_path):
    dest = tmp_path / "tab"
    shutil.copytree(cached_project, dest)
    return dest


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / ".proponent" / "runs").iterdir() if p.name.startswith("grad-dot-"))


def test_prune_leaves_entries_it_did_not_write(project, capsys):
    runs = project / ".proponent" / "runs"
    assert _run_dirs(project)
    (runs / "NOTES.txt").write_text("mine\n")
    (runs / "my-folder").mkdir()
    (runs / "my-folder" / "x.txt").write_text("mine too\n")
    rc, out, _ = run(capsys, "cache", project, "--prune", "--all")
    assert rc == 0
    assert (runs / "NOTES.txt").read_text() == "mine\n"
    assert (runs / "my-folder" / "x.txt").read_text() == "mine too\n"
    assert "removed runs/NOTES.txt" not in out and "skipped runs/NOTES.txt" in out
    assert not _run_dirs(project)  # what it did write is pruned


def test_prune_never_follows_a_symlinked_cache_folder_or_entry(project, tmp_path, capsys):
    ext = tmp_path / "ext"
    (ext / "grad-dot-0123456789ab").mkdir(parents=True)  # looks like a run, but lies outside the project
    (ext / "grad-dot-0123456789ab" / "u.txt").write_text("precious\n")
    (ext / "u.txt").write_text("precious\n")
    state = project / ".proponent"
    shutil.rmtree(state / "runs")
    (state / "runs").symlink_to(ext, target_is_directory=True)
    (state / "features").mkdir(exist_ok=True)
    (state / "features" / "trak_0123456789abcdef").symlink_to(ext, target_is_directory=True)
    rc, out, err = run(capsys, "cache", project, "--prune", "--all")
    assert rc == 0, err
    assert (ext / "u.txt").read_text() == "precious\n"
    assert (ext / "grad-dot-0123456789ab" / "u.txt").read_text() == "precious\n"
    assert (state / "runs").is_symlink() and (state / "features" / "trak_0123456789abcdef").is_symlink()
    assert "skipped runs" in out and "symlink" in out


@pytest.mark.parametrize("where", ["my_notes.txt", "work/plot.png"])
def test_prune_leaves_a_run_holding_a_users_file(project, capsys, where):
    """A file saved inside a run's folder would go with the folder: that entry is skipped, whole."""
    (folder,) = _run_dirs(project)
    (folder / where).parent.mkdir(exist_ok=True)
    (folder / where).write_text("mine\n")
    rc, out, _ = run(capsys, "cache", project, "--prune", "--all")
    assert rc == 0
    assert (folder / where).read_text() == "mine\n" and (folder / "scores.npy").is_file()
    assert f"skipped runs/{folder.name}" in out and where in out
    (folder / where).unlink()
    assert run(capsys, "cache", project, "--prune", "--all")[0] == 0
    assert not folder.exists()  # once the user's file is out, the run is pruned as before


@pytest.mark.parametrize("flag", ["--older-than", "--max-size"])
def test_prune_refuses_negative_values(project, capsys, flag):
    rc, _, err = run(capsys, "cache", project, "--prune", flag, "-5")
    assert rc == 2
    one_line_error(err, flag)
    assert _run_dirs(project)  # nothing removed


def test_prune_unknown_run_key_is_an_error(project, capsys):
    rc, _, err = run(capsys, "cache", project, "--prune", "--run", "no-such-key")
    assert rc == 2
    one_line_error(err, "no-such-key")
    assert _run_dirs(project)


# ----------------------------------------------------------------------------- C: train


@pytest.mark.parametrize("where", ["notes.txt", "model_0/notes.txt"])
def test_train_refuses_to_replace_a_checkpoint_folder_holding_a_users_file(project, capsys, where):
    ck = project / "checkpoints"
    trajectory = (ck / "trajectory.json").read_bytes()
    (ck / where).write_text("mine\n")
    rc, _, err = run(capsys, "train", project)
    assert rc == 2
    one_line_error(err, str(ck / where))
    assert (ck / where).read_text() == "mine\n"
    assert (ck / "trajectory.json").read_bytes() == trajectory
    assert not (project / "checkpoints.partial").exists()


def test_train_still_replaces_its_own_checkpoint_folder(project, capsys):
    ck = project / "checkpoints"
    before = (ck / "trajectory.json").read_bytes()
    rc, out, err = run(capsys, "train", project)
    assert rc == 0, err
    assert (ck / "trajectory.json").is_file() and "recorded" in out
    assert (ck / ".proponent-owned").is_file() and before


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"checkpoints": [{"model_id": 0}]}'])
def test_train_and_import_replace_a_damaged_trajectory_log(project, tmp_path, capsys, damage):
    """The commands that write a new log are the fix for a damaged one: they must not refuse to run."""
    import json

    ck = project / "checkpoints"
    log = json.loads((ck / "trajectory.json").read_text())
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    shutil.copy(ck / log["checkpoints"][-1]["weights"], theirs / "a.safetensors")
    (theirs / "manifest.csv").write_text("file,step,lr\na.safetensors,5,0.05\n")
    (ck / "trajectory.json").write_text(damage)
    rc, _, err = run(capsys, "attribute", project, "--method", "tracin")
    one_line_error(err, str(ck / "trajectory.json"))  # everything that reads the log still refuses it
    rc, out, err = run(capsys, "import", project, "--checkpoints", theirs)
    assert rc == 0, err
    assert [c["step"] for c in json.loads((ck / "trajectory.json").read_text())["checkpoints"]] == [5]
    (ck / "trajectory.json").write_text(damage)
    rc, out, err = run(capsys, "train", project)
    assert rc == 0, err
    assert json.loads((ck / "trajectory.json").read_text())["checkpoints"]


def test_written_checkpoints_are_readable_like_any_other_file(project, tmp_path, capsys):
    """Weights follow the umask as the user's other files do (safetensors alone creates them 0600)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    ck = project / "checkpoints"
    assert run(capsys, "train", project)[0] == 0
    weights = sorted(ck.rglob("*.safetensors"))
    assert weights
    shutil.copy(weights[-1], theirs / "a.safetensors")
    (theirs / "manifest.csv").write_text("file,step,lr\na.safetensors,5,0.05\n")
    assert run(capsys, "import", project, "--checkpoints", theirs)[0] == 0
    written = sorted(ck.rglob("*.safetensors"))
    assert len(written) > len(weights)
    for f in written:
        assert f.stat().st_mode & 0o777 == want, (f, oct(f.stat().st_mode))
