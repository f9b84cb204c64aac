"""torchrun: `torchrun --nproc_per_node 2 -m engine.cli attribute …` on the CPU (gloo) splits the
fit over two processes and gives the single-process result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from tests.conftest import MLP_MODEL, ROOT, write_tabular_project

# 2,300 rows: three feature chunks of 1,024 (rank 0 writes chunks 0 and 2, rank 1 chunk 1) and
# three gradient blocks for the curvature methods
TRAINING = ('optimizer = "sgd"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.001\nepochs = 3\nbatch_size = 64\n'
            'seed = 0\ncheckpoints_per_epoch = 1\n')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from engine import Project
    from engine.core.train import record_training

    root = write_tabular_project(tmp_path_factory.mktemp("dist") / "tab", n_train=2300, n_test=24, d=6, classes=3,
                                 seed=5, model=MLP_MODEL, training=TRAINING)
    record_training(Project.load(root))
    return root


def _copy(root, dest):
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".proponent"))
    return dest


def _env():
    env = {**os.environ, "PROPONENT_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run_cli(cmd, timeout=600):
    """Run a command in its own process group, killed whole on a timeout (torchrun's workers too). Its TMPDIR is
    a folder of the test's own, removed afterwards: torch's elastic agent leaves a torchelastic_* folder in the
    temporary directory after every run."""
    with tempfile.TemporaryDirectory(prefix="proponent-torchrun-") as tmp:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**_env(), "TMPDIR": tmp}, cwd=str(ROOT), start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _attribute(project, method, *, ranks: int, extra=()):
    head = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
             "-m", "engine.cli"] if ranks > 1 else [sys.executable, "-m", "engine.cli"])
    r = _run_cli(head + ["attribute", str(project), "--method", method, "--json", "--top", "5", *extra])
    # the start and the end: a failing rank's own error is not always last
    assert r.returncode == 0, r.stderr[:4000] + "\n…\n" + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout[-2000:]  # rank 0 alone prints the result
    return json.loads(lines[0])


def _run(project, key):
    from engine import Project
    from engine.api import run_dir

    folder = run_dir(Project.load(project), key)
    with sqlite3.connect(Project.load(project).state_dir / "state.db") as db:
        meta = json.loads(db.execute("select meta from runs where key = ?", (key,)).fetchone()[0])
    return {n: np.load(folder / f"{n}.npy") for n in ("scores", "self_scores", "suspicion")}, meta


@pytest.mark.parametrize("method", ["trak", "ekfac"])
def test_two_gloo_ranks_equal_one_process(trained, tmp_path, method):
    single = _copy(trained, tmp_path / "single")
    multi = _copy(trained, tmp_path / "multi")
    one = _attribute(single, method, ranks=1)
    two = _attribute(multi, method, ranks=2)
    assert one["run"] == two["run"]
    a, meta_a = _run(single, one["run"])
    b, meta_b = _run(multi, two["run"])
    assert a["scores"].shape == (24, 2300)
    for name in a:
        # the partial sums meet in another order: equal to float32 rounding, not bit for bit
        np.testing.assert_allclose(b[name], a[name], rtol=2e-4, atol=2e-4 * np.abs(a[name]).max(), err_msg=name)
    for q1, q2 in zip(one["queries"], two["queries"]):
        assert [p["train_index"] for p in q1["proponents"][:3]] == [p["train_index"] for p in q2["proponents"][:3]]
    assert "distributed" not in meta_a
    if method == "trak":
        # the work was split, not repeated: each rank featurized its own chunks, together every row once
        assert meta_b["distributed"]["world_size"] == 2
        assert meta_b["distributed"]["rows_featurized"] == [1024 + 252, 1024]
    else:  # the training-gradient pass was split the same way (its covariances are summed over ranks)
        assert meta_b["distributed"]["gradient_rows"] == [1024 + 252, 1024]


def test_method_that_does_not_shard_runs_on_rank_zero(trained, tmp_path):
    multi = _copy(trained, tmp_path / "knn")
    out = _attribute(multi, "knn", ranks=2)
    assert len(out["queries"]) == 24 and out["shape"] == [24, 2300]


def test_other_commands_refuse_torchrun(trained, tmp_path):
    r = _run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                  "-m", "engine.cli", "triage", str(trained), "--json"], timeout=300)
    assert r.returncode != 0
    assert "only 'attribute' splits its work over torchrun" in r.stderr
