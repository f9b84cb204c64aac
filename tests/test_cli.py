"""The `proponent` command line: the public contract (README, docs/design.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROPONENT_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def project(digits_project, tmp_path):
    dest = tmp_path / "digits"
    shutil.copytree(digits_project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    return dest


def test_prepare_and_train(tmp_path):
    r = cli("prepare", "digits", "--dir", tmp_path / "d", "--no-train")
    assert (tmp_path / "d" / "project.toml").is_file() and (tmp_path / "d" / "truth.json").is_file()
    assert not (tmp_path / "d" / "checkpoints").exists()
    r = cli("train", tmp_path / "d", "--models", "2")
    assert "test accuracy" in r.stdout
    log = json.loads((tmp_path / "d" / "checkpoints" / "trajectory.json").read_text())
    assert {c["model_id"] for c in log["checkpoints"]} == {0, 1}
    first = log["checkpoints"][0]
    assert (tmp_path / "d" / "checkpoints" / first["weights"]).is_file()
    assert (tmp_path / "d" / "checkpoints" / first["optimizer_state"]).is_file()
    assert first["lr"] > 0 and first["step"] > 0 and "stage" in first
    assert not r.stderr.strip()  # progress bars stay quiet when not on a terminal


def test_attribute_json_and_export(project, tmp_path):
    out = tmp_path / "s.npy"
    r = cli("attribute", project, "--method", "grad-dot", "--export", out, "--json", "--top", "3")
    doc = json.loads(r.stdout)
    S = np.load(out)
    assert S.shape == (360, 1445) and doc["shape"] == [360, 1445]
    q0 = doc["queries"][0]
    assert [p["train_index"] for p in q0["proponents"]] == list(np.argsort(-S[0])[:3])
    assert q0["proponents"][0]["score"] >= q0["proponents"][1]["score"] > q0["opponents"][0]["score"]


def test_triage_json_schema_and_planted_flips(project):
    r = cli("triage", project, "--method", "trak", "--json")
    doc = json.loads(r.stdout)
    assert doc["method"] == "trak"
    items = doc["items"]
    assert len(items) == 1445
    assert set(items[0]) >= {"index", "score", "label", "suggested_label"}
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
    truth = json.loads((project / "truth.json").read_text())
    flipped = {f["train_index"]: f["true_label"] for f in truth["flipped"]}
    top = items[: len(flipped)]
    hits = [it for it in top if it["index"] in flipped]
    assert len(hits) / len(flipped) > 0.6  # most planted flips rank at the top
    # the suggested label recovers the true label for most flipped examples found
    assert np.mean([it["suggested_label"] == flipped[it["index"]] for it in hits]) > 0.6


def test_unknown_method_is_one_line_error(project):
    r = cli("attribute", project, "--method", "nope", check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown method 'nope'" in r.stderr and "trak" in r.stderr


def test_bad_setting_is_one_line_error(project):
    r = cli("attribute", project, "--method", "trak", "--set", "proj_dim=lots", check=False)
    assert r.returncode == 2 and "proj_dim" in r.stderr and "Traceback" not in r.stderr


def test_info_lists_methods():
    r = cli("info", "--json")
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"trak", "grad-dot", "grad-cos", "tracin", "knn", "exact-if"} <= names


@pytest.mark.parametrize("argv, project, opts", [
    (["--server.port", "8599"], None, ["--server.port", "8599"]),
    (["--server.port=8599"], None, ["--server.port", "8599"]),
    (["proj", "--server.port=8599", "--server.headless", "true"], "proj",
     ["--server.port", "8599", "--server.headless", "true"]),
    (["--server.port", "8599", "proj"], "proj", ["--server.port", "8599"]),
])
def test_app_options_never_become_the_project(argv, project, opts):
    from engine.cli import split_app_args

    assert split_app_args(argv) == (project, opts)


def test_app_command_defaults_and_overrides(digits_project):
    from engine.cli import app_command, split_app_args

    args, env = app_command(*split_app_args([str(digits_project.root), "--server.port=8599"]))
    pairs = dict(zip(args[5::2], args[6::2]))
    assert pairs == {"--server.address": "127.0.0.1", "--browser.gatherUsageStats": "false",
                     "--client.toolbarMode": "minimal", "--runner.postScriptGC": "false",
                     "--server.fileWatcherType": "none", "--server.port": "8599"}
    assert env["PROPONENT_PROJECT"] == str(Path(digits_project.root).resolve())
    args, _ = app_command(None, ["--server.address", "0.0.0.0"])
    assert args.count("--server.address") == 1 and args[args.index("--server.address") + 1] == "0.0.0.0"


def test_app_bad_options_are_one_line(tmp_path):
    r = cli("app", "a", "b", check=False)
    assert r.returncode == 2 and "one project folder" in r.stderr and "Traceback" not in r.stderr
    r = cli("app", "--server.port", check=False)
    assert r.returncode == 2 and "needs a value" in r.stderr


@pytest.mark.parametrize("stage, unit", [
    ("solve (cg)", "iterations"), ("calibrate: retrain", "retrains"), ("train model 1/3", "steps"),
    ("featurize 1/2", "examples"), ("ekfac: training gradients", "examples"), ("score", "queries"),
    ("score training chunks", "examples"),
    ("gif queries", "queries"), ("layout (umap)", "layouts"), ("train gradients", "examples"), (None, "examples")])
def test_progress_says_what_it_counts(stage, unit):
    from engine.core.progress import unit_of

    assert unit_of(stage) == unit
