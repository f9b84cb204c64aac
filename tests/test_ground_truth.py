"""Math checked against ground truth: exact influence and leave-one-out retraining on a convex model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Project, attribute
from engine.evaluate.metrics import pearson, spearman
from engine.autodiff import correct_class_margin
from engine.core.train import train_model


@pytest.fixture(scope="module")
def loo(logreg_project):
    """Real leave-one-out: margin(full) − margin(without i) for 20 removed examples, all test queries."""
    p = logreg_project
    full = p.load_model()
    with torch.no_grad():
        base = correct_class_margin(full(p.test_dataset.x), p.test_dataset.y).double().numpy()
    n = len(p.train_dataset)
    removed = np.random.default_rng(0).choice(n, 20, replace=False)
    effects = np.empty((len(removed), len(base)))
    for j, i in enumerate(removed):
        m = train_model(p, indices=np.setdiff1d(np.arange(n), [i]))
        with torch.no_grad():
            effects[j] = base - correct_class_margin(m(p.test_dataset.x), p.test_dataset.y).double().numpy()
    return removed, effects


def test_exact_influence_matches_leave_one_out(logreg_project, loo):
    removed, effects = loo
    S = attribute(logreg_project, "exact-if")
    pred = S[:, removed].T  # [removed, queries]
    r = pearson(pred.ravel(), effects.ravel())
    assert r >= 0.9, f"exact influence vs LOO Pearson {r:.3f}"
    # scores are on the scale of margin drops, not only correlated
    scale = np.linalg.lstsq(pred.ravel()[:, None], effects.ravel(), rcond=None)[0][0]
    assert 0.7 < scale < 1.4, scale


@pytest.mark.parametrize("method", ["trak", "grad-dot", "grad-cos", "tracin", "exact-if"])
def test_orientation_matches_leave_one_out(logreg_project, loo, method):
    """Positive scores must be proponents: removing them lowers the margin (per query, on average)."""
    removed, effects = loo
    S = attribute(logreg_project, method)
    per_query = [spearman(S[q, removed], effects[:, q]) for q in range(S.shape[0])]
    assert np.nanmean(per_query) > 0.3, (method, np.nanmean(per_query))


def test_knn_is_similarity_not_influence(logreg_project):
    S = attribute(logreg_project, "knn")
    assert S.shape == (20, 80)
    assert np.all(S <= 1 + 1e-9) and np.all(S >= -1 - 1e-9)


def test_trak_without_projection_matches_closed_form(logreg_project):
    """With no projection and λ→0, TRAK is φ_q (ΦᵀΦ)⁻¹ φ_iᵀ · Q_i with the full margin gradients."""
    from engine.autodiff import GradientComputer, correct_class_probability

    p = logreg_project
    S = attribute(p, "trak", settings={"proj_dim": 0, "damping": 1e-6, "feature_dtype": "float32"})
    model = p.load_model()
    comp = GradientComputer(model)
    phi = comp.full(p.train_dataset.x, p.train_dataset.y, "margin").double().numpy()
    phq = comp.full(p.test_dataset.x, p.test_dataset.y, "margin").double().numpy()
    with torch.no_grad():
        q = 1 - correct_class_probability(model(p.train_dataset.x), p.train_dataset.y).double().numpy()
    # margin gradients of a softmax model are orthogonal to "add a constant to every class", so ΦᵀΦ is
    # singular and the λ→0 limit is the pseudo-inverse on its row space
    ref = phq @ np.linalg.pinv(phi.T @ phi) @ phi.T * q[None, :]
    np.testing.assert_allclose(S, ref, rtol=1e-3, atol=1e-6 * np.abs(ref).max())


def test_trak_handles_more_dimensions_than_examples(logreg_project):
    """k ≥ n: the k×k ΦᵀΦ is singular (traker's default λ=0 then gives scores uncorrelated with
    retraining). Proponent solves the n×n dual form and picks λ from the spectrum, so projected
    scores stay close to the unprojected ones."""
    from tests.conftest import MLP_MODEL, write_tabular_project
    from engine.core.train import record_training

    root = write_tabular_project(logreg_project.root.parent / "kn", n_train=30, n_test=10, model=MLP_MODEL)
    p = Project.load(root)
    record_training(p)
    n_params = sum(t.numel() for t in p.build_model().parameters())
    assert 100 > len(p.train_dataset) and n_params > 100
    S_proj = attribute(p, "trak", settings={"proj_dim": 100, "projection": "rademacher"})
    S_full = attribute(p, "trak", settings={"proj_dim": 0})
    assert np.isfinite(S_proj).all()
    agree = np.mean([spearman(S_proj[q], S_full[q]) for q in range(S_full.shape[0])])
    assert agree > 0.7, agree
    # the dual (n×n) and primal (k×k) forms give the same Ψ
    from engine.methods.trak import solve_kernel
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(30, 256))
    psi_dual, lam = solve_kernel(phi, 0.5, 0.0)
    psi_primal = phi @ np.linalg.inv(phi.T @ phi + 0.5 * np.eye(256))
    np.testing.assert_allclose(psi_dual, psi_primal, rtol=1e-6, atol=1e-9)


def test_exact_if_hessian_reports_examples_and_stops_on_cancel(logreg_project, tmp_path):
    from engine.core.errors import Cancelled
    from engine.methods import get_method

    seen = []
    cls = get_method("exact-if")
    att = cls(cls.Settings(batch_size=16), workdir=tmp_path / "w", progress=lambda st, d, t: seen.append((st, d, t)))
    att.fit(logreg_project)
    n = len(logreg_project.train_dataset)
    hess = [(d, t) for st, d, t in seen if st == "hessian"]
    assert hess[0] == (0, n) and hess[-1] == (n, n) and len(hess) == 1 + -(-n // 16)
    calls = []
    stop = cls(cls.Settings(batch_size=16), workdir=tmp_path / "w2",
               cancel=lambda: calls.append(1) or len(calls) > 2)
    with pytest.raises(Cancelled, match="Hessian cancelled after 32 of"):
        stop.fit(logreg_project)
