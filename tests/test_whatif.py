"""The what-if API: predicted edits (GIF / IF) against real retraining, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.errors import ProponentError
from engine.methods.gif.solvers import SolverNotConverged
from engine.autodiff.measurement import correct_class_margin
from engine.core.train import predict_logits
from engine.workflows.whatif import compare_edits, predict_edit, retrain_edit

from tests.test_gif import make_project


@pytest.fixture(scope="module")
def logreg(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("whatif") / "logreg", seed=3)


def _margins(project, model):
    t = project.test_dataset
    return correct_class_margin(predict_logits(model, t.x).double(), t.y).numpy()


def test_predicted_removal_and_relabel_match_retrain(logreg):
    base = _margins(logreg, logreg.load_model())
    rng = np.random.default_rng(0)
    n = len(logreg.train_dataset)
    pred, true = [], []
    for action in ("remove", "relabel", "remove", "relabel"):
        idx = rng.choice(n, 10, replace=False)
        new = None
        if action == "relabel":
            y = logreg.train_dataset.y.numpy()[idx]
            new = [logreg.classes[(int(c) + 1) % logreg.num_classes] for c in y]
        p = predict_edit(logreg, idx, action, new, method="if", tol=1e-8, return_model=True)
        r = retrain_edit(logreg, idx, action, new, return_model=True)
        assert p["converged"] and p["residual"] <= 1.5e-8 and p["warning"] is None
        assert p["before"] == r["before"]
        pred.append(_margins(logreg, p["model"]) - base)
        true.append(_margins(logreg, r["model"]) - base)
        # the reported metrics are those of the edited model
        logits = predict_logits(p["model"], logreg.test_dataset.x)
        assert p["after"]["accuracy"] == pytest.approx(float((logits.argmax(1) == logreg.test_dataset.y).float().mean()))
        before_pred = predict_logits(logreg.load_model(), logreg.test_dataset.x).argmax(1)
        flips = {f["test_index"] for f in p["flips"]}
        assert flips == set(torch.nonzero(before_pred != logits.argmax(1)).flatten().tolist())
        cmp = compare_edits(p, r)
        assert 0 <= cmp["prediction_agreement"] <= 1 and cmp["flips_found"] <= cmp["flips_retrained"]
    c = np.corrcoef(np.concatenate(pred), np.concatenate(true))[0, 1]
    assert c > 0.9, c


def test_gif_full_ratio_equals_if_and_partial_differs(logreg):
    idx = np.arange(5, 17)
    a = predict_edit(logreg, idx, "remove", method="gif", ratio=1.0, tol=1e-9, return_model=True)
    b = predict_edit(logreg, idx, "remove", method="if", tol=1e-9, return_model=True)
    assert torch.allclose(a["update"], b["update"], rtol=1e-6, atol=1e-9)
    assert a["parameters_updated"] == a["parameters_total"]
    c = predict_edit(logreg, idx, "remove", method="gif", ratio=0.34, tol=1e-9, return_model=True)
    assert c["parameters_updated"] < c["parameters_total"]
    for m in ("frozen", "projected"):
        d = predict_edit(logreg, idx, "remove", method=m, ratio=0.34, tol=1e-9)
        assert d["converged"] and d["parameters_updated"] == c["parameters_updated"]


def test_unconverged_solve_is_reported_not_returned(logreg):
    idx = np.arange(10)
    with pytest.raises(SolverNotConverged, match="residual"):
        predict_edit(logreg, idx, "remove", method="if", tol=1e-14, max_iter=1)
    out = predict_edit(logreg, idx, "remove", method="if", tol=1e-14, max_iter=1, allow_unconverged=True)
    assert out["converged"] is False and out["residual"] > 1e-14 and "not converge" in out["warning"]


@pytest.mark.parametrize("call, match", [
    (dict(indices=[10**6]), "does not exist"),
    (dict(indices=[-1]), "does not exist"),
    (dict(indices=[]), "no training rows"),
    (dict(indices=[3, 3]), "listed twice"),
    (dict(indices=[1], action="delete"), "action"),
    (dict(indices=[1], action="relabel"), "new_labels"),
    (dict(indices=[1, 2], action="relabel", new_labels=[0]), "2 rows"),
    (dict(indices=[1], action="relabel", new_labels=["cat"]), "not a class"),
    (dict(indices=[1], method="magic"), "method"),
])
def test_bad_input_is_one_line_error(logreg, call, match):
    with pytest.raises(ProponentError, match=match) as info:
        predict_edit(logreg, **call)
    assert "\n" not in str(info.value)
