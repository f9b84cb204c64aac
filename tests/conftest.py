"""Shared fixtures: small ready projects made in temporary folders (never the repo's samples)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PROPONENT_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def digits_project(tmp_path_factory):
    """The digits sample, data + one recorded model (15 checkpoints). Read-only for tests:
    copy it (``copy_project``) before changing anything."""
    from engine.samples import prepare_sample

    root = tmp_path_factory.mktemp("digits")
    prepare_sample("digits", root / "digits", train=True, models=1)
    from engine import Project

    return Project.load(root / "digits")


@pytest.fixture(scope="session")
def digits_ensemble_project(tmp_path_factory):
    """The digits sample with 3 independently trained models."""
    from engine.samples import prepare_sample

    root = tmp_path_factory.mktemp("digits3")
    prepare_sample("digits", root / "digits", train=True, models=3)
    from engine import Project

    return Project.load(root / "digits")


@pytest.fixture
def copy_project(tmp_path):
    """Copy a project folder (without its .proponent state) into a fresh temporary folder."""
    def _copy(project, name="copy"):
        from engine import Project

        dest = tmp_path / name
        shutil.copytree(project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
        return Project.load(dest)
    return _copy
