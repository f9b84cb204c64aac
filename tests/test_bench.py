"""`proponent bench` end to end on a tiny project, and the benchmarks.md generator."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import Project
from engine.cli import main as cli
from engine.core.train import record_training

try:
    from tests.conftest import MLP_MODEL, write_tabular_project
except ImportError:  # pragma: no cover
    from conftest import MLP_MODEL, write_tabular_project

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tabular_project(tmp_path_factory.mktemp("bench") / "tiny", n_train=60, n_test=16, d=4, classes=3,
                                 model=MLP_MODEL,
                                 training='optimizer = "sgd"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.001\n'
                                          'epochs = 8\nbatch_size = 16\nseed = 0\ncheckpoints_per_epoch = 1\n')
    p = Project.load(root)
    record_training(p)
    return p


def test_bench_quick_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli(["bench", str(tiny.root), "--quick", "--methods", "grad-dot,knn,nonexistent-is-rejected"])
    assert rc != 0  # an unknown method is a one-line error
    assert "unknown method" in capsys.readouterr().err
    rc = cli(["bench", str(tiny.root), "--quick", "--methods", "grad-dot,knn", "--subsets", "6", "--loo", "3",
              "--queries", "8", "--metrics", "lds,loo,mislabel,leak,cost,counterfactual", "--cf-queries", "1",
              "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Accuracy and cost" in printed and "grad-dot" in printed.lower()
    doc = json.loads(out.read_text())
    for key in ("title", "date", "machine", "command", "tables", "project", "methods", "metrics", "config"):
        assert key in doc
    assert doc["command"].startswith("proponent bench ") and "--quick" in doc["command"]
    assert doc["config"]["subsets"] == 6 and doc["config"]["seeds"] == 2
    rows = {r["method"]: r for r in doc["methods"]}
    assert set(rows) == {"grad-dot", "knn"}
    for r in rows.values():
        assert "error" not in r, r
        assert -1 <= r["lds"] <= 1 and -1 <= r["loo"] <= 1
        assert 0 <= r["mislabel"]["auroc"] <= 1
        assert r["leak"]["recall@1"] is not None and r["cost"]["fit_seconds"] > 0
        assert set(r["counterfactual"]) == {"10", "40"}
    assert doc["metrics"]["lds"]["noise_ceiling"] is not None
    assert doc["metrics"]["mislabel"]["source"].startswith("flipped")
    assert doc["metrics"]["leak"]["source"].startswith("planted")
    t = doc["tables"][0]
    assert all(len(r) == len(t["columns"]) for r in t["rows"])
    # the ground truth is cached: a second run retrains nothing for LDS (same key → same file)
    gtdir = tiny.root / ".proponent" / "groundtruth"
    assert any(gtdir.glob("gt-*.npy"))


def test_make_benchmarks_md(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    doc = {"title": "T", "date": "2026-01-01", "machine": "m", "command": "proponent bench x",
           "tables": [{"title": "tab", "columns": ["a", "b"], "rows": [[1, 0.12345], ["x|y", None]], "notes": "n"}],
           "notes": ""}
    (bench / "a.json").write_text(json.dumps(doc))
    out = tmp_path / "b.md"
    script = ROOT / "scripts" / "make_benchmarks_md.py"
    r = subprocess.run([sys.executable, str(script), "--bench-dir", str(bench), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "| a | b |" in text and "| 1 | 0.1235 |" in text and "x\\|y" in text
    assert "2026-01-01" in text and "`proponent bench x`" in text
    r = subprocess.run([sys.executable, str(script), "--bench-dir", str(bench), "--out", str(out), "--check"])
    assert r.returncode == 0
    doc["tables"][0]["rows"].append([1])  # wrong number of cells
    (bench / "a.json").write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, str(script), "--bench-dir", str(bench), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "row 2" in r.stderr


def test_peer_runner_timeout_and_direct(tiny):
    from engine.evaluate.bench import run_peer_limited

    q = np.arange(4)
    res = run_peer_limited(tiny, "traker", "trak", queries=q, proj_dim=16, timeout=0.5)
    assert res.scores is None and "timed out" in res.skipped
    res = run_peer_limited(tiny, "traker", "trak", queries=q, proj_dim=16, timeout=None)
    assert res.skipped is None and res.scores.shape == (4, len(tiny.train_dataset))
    assert np.isfinite(res.scores).all()
