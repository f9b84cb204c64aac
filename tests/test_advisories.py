"""A default that is wrong for a project is explained in one line (CLI, app, run meta), never silently used."""
from __future__ import annotations

import numpy as np
import pytest

from engine import Project
from engine.core.train import record_training
from engine.methods import get_method
from engine.methods.base import coerce_settings
from tests.conftest import write_tabular_project
from tests.test_cli import cli

MLP = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))
'''
CONSTANT = 'optimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\nepochs = 2\nbatch_size = 16\nseed = 0\ncheckpoints_per_epoch = 1\n'
ANNEALED = ('optimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\nepochs = 4\nbatch_size = 16\nseed = 0\n'
            'checkpoints_per_epoch = 1\nlr_schedule = "cosine"\n')


def _project(root, training):
    write_tabular_project(root, n_train=60, n_test=10, model=MLP, training=training)
    p = Project.load(root)
    record_training(p)
    return Project.load(root)


def _notes(p, method, settings=None):
    cls = get_method(method)
    return cls.advisories(p, coerce_settings(cls, settings))


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory):
    return _project(tmp_path_factory.mktemp("adv") / "constant", CONSTANT)


@pytest.fixture(scope="module")
def annealed_run(tmp_path_factory):
    return _project(tmp_path_factory.mktemp("adv") / "annealed", ANNEALED)


def test_short_trajectory_and_unannealed_run_are_explained(constant_run):
    tracin = _notes(constant_run, "tracin")
    assert len(tracin) == 1 and "only 2 checkpoint" in tracin[0] and "\n" not in tracin[0]
    ekfac = _notes(constant_run, "ekfac", {"trajectory_points": 1})
    assert len(ekfac) == 1 and "peak learning rate" in ekfac[0] and "source" in ekfac[0]
    assert _notes(constant_run, "ekfac") == []  # the default follows the run
    gif = _notes(constant_run, "gif", {"hvp_examples": 20})
    assert len(gif) == 1 and "20 of 60" in gif[0]


def test_fitting_defaults_say_nothing(annealed_run):
    for m in ("tracin", "ekfac", "gif", "trak"):
        assert _notes(annealed_run, m) == [], m
    # a chosen setting can still be the poor fit
    assert _notes(annealed_run, "tracin", {"max_checkpoints": 2})


def test_cli_prints_the_note_and_the_run_keeps_it(constant_run):
    r = cli("attribute", constant_run.root, "--method", "tracin")
    notes = [l for l in r.stderr.splitlines() if l.startswith("note: ")]
    assert len(notes) == 1 and "tracin: only 2 checkpoint" in notes[0]
    from engine.api import cached_scores

    meta = cached_scores(constant_run, "tracin", None, device="cpu")["meta"]
    assert meta["advisories"] == _notes(constant_run, "tracin")
    assert np.isfinite(cached_scores(constant_run, "tracin", None, device="cpu")["scores"]).all()


def test_attribute_page_shows_the_note(constant_run, monkeypatch):
    from tests.test_app import _app

    at = _app(monkeypatch, constant_run, "attribute")
    at.selectbox(key="method").set_value("tracin").run()
    assert not at.exception
    assert any("tracin: only 2 checkpoint" in i.value for i in at.info)
    at.selectbox(key="method").set_value("trak").run()
    assert not any("checkpoint" in i.value for i in at.info)
