"""Threads: importing the engine changes nothing; each workload picks its intra-op threads
(measured once per architecture and core count, cached), and PROPONENT_THREADS overrides."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import Project
from engine.api import fit_method
from engine.autodiff import threads as th
from engine.core.errors import ProponentError

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_touch_torch_threads():
    env = {k: v for k, v in os.environ.items() if k not in ("PROPONENT_THREADS", "OMP_NUM_THREADS")}
    code = ("import torch; torch.set_num_threads(3); import engine, engine.api, engine.cli, app.services;"
            "print(torch.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "3"


def test_intra_op_threads_restores():
    before = torch.get_num_threads()
    with th.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.fixture
def project(digits_project, tmp_path):
    dest = tmp_path / "digits"
    shutil.copytree(digits_project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    return Project.load(dest)


def test_env_overrides_and_bad_values_are_one_line(project, monkeypatch):
    monkeypatch.setenv("PROPONENT_THREADS", "2")
    assert th.gradient_threads(project) == {"threads": 2, "reason": "PROPONENT_THREADS=2", "seconds": {}}
    monkeypatch.setenv("PROPONENT_THREADS", "zero")
    with pytest.raises(ProponentError, match="PROPONENT_THREADS must be a whole number"):
        th.gradient_threads(project)


def test_choice_is_measured_once_and_cached(project, monkeypatch):
    monkeypatch.delenv("PROPONENT_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: 4)
    timed = []

    def fake_time(computer, x, y, counts, repeats=5):
        timed.extend(counts)
        return {n: {1: 0.02, 4: 0.05}[n] for n in counts}  # this model is faster on one thread

    monkeypatch.setattr(th, "_time_gradients", fake_time)
    first = th.gradient_threads(project)
    assert first["threads"] == 1 and sorted(timed) == [1, 4] and "measured" in first["reason"]
    table = json.loads((project.state_dir / "threads.json").read_text())
    assert list(table.values())[0]["threads"] == 1
    monkeypatch.setattr(type(project), "build_model", lambda self: (_ for _ in ()).throw(AssertionError("built")))
    second = th.gradient_threads(project)
    assert second == first and sorted(timed) == [1, 4]  # read from the cache: not timed, model not even built
    monkeypatch.undo()
    monkeypatch.delenv("PROPONENT_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: 4)
    monkeypatch.setattr(th, "_time_gradients", fake_time)
    (project.root / "model.py").write_text((project.root / "model.py").read_text() + "\n# edited\n")
    th.gradient_threads(project)
    assert sorted(timed) == [1, 1, 4, 4]  # another architecture file: measured again
    monkeypatch.setattr(th, "available_cores", lambda: 8)  # another machine size: measured again
    monkeypatch.setattr(th, "_time_gradients", lambda c, x, y, counts, repeats=5: {1: 0.05, 8: 0.01})
    assert th.gradient_threads(project)["threads"] == 8


@pytest.mark.parametrize("all_cores, want", [(0.089, 2), (0.095, 1), (0.12, 1)])
def test_all_cores_only_when_clearly_faster(project, monkeypatch, all_cores, want):
    """A near tie goes to one thread: on a busy machine many threads can be several times slower."""
    monkeypatch.delenv("PROPONENT_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: 2)
    monkeypatch.setattr(th, "_time_gradients", lambda c, x, y, counts, repeats=5: {1: 0.1, 2: all_cores})
    assert th.gradient_threads(project)["threads"] == want


def test_thread_counts_are_timed_in_turn(project):
    """Rounds alternate the counts, so a burst of outside load cannot land on one count's every repeat."""
    order = []

    class Computer:
        def per_example(self, x, y):
            if len(x) > 2:  # not the warm-up
                order.append(torch.get_num_threads())

    x, y = torch.zeros(8, 3), torch.zeros(8, dtype=torch.long)
    seconds = th._time_gradients(Computer(), x, y, (1, 2), repeats=3)
    assert order == [1, 2, 1, 2, 1, 2] and set(seconds) == {1, 2}


def test_real_timing_picks_a_valid_count(project, monkeypatch):
    monkeypatch.delenv("PROPONENT_THREADS", raising=False)
    out = th.gradient_threads(project)
    assert out["threads"] in (1, th.available_cores())
    assert set(out["seconds"]) <= {"1", str(th.available_cores())}


def test_fit_runs_under_the_chosen_count(project, monkeypatch):
    from engine.methods.grad_dot import GradDot

    seen = []
    orig = GradDot.fit

    def spy(self, p):
        seen.append(torch.get_num_threads())
        return orig(self, p)

    monkeypatch.setattr(GradDot, "fit", spy)
    monkeypatch.setenv("PROPONENT_THREADS", "1")
    torch.set_num_threads(2)
    att, _ = fit_method(project, "grad-dot")
    assert seen == [1] and att.meta["threads"] == 1
    assert torch.get_num_threads() == 2  # restored after the work
