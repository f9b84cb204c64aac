"""The evaluation harness against known answers: LDS, LOO, detection metrics, ground-truth cache, counterfactual."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Project
from engine.core.errors import ProponentError
from engine.evaluate import groundtruth as gt
from engine.evaluate.lds import lds, loo_correlation
from engine.evaluate.metrics import auroc, precision_at_k

try:
    from tests.conftest import write_tabular_project
except ImportError:  # pragma: no cover - tests run as a plain folder
    from conftest import write_tabular_project


# ----------------------------------------------------------------------------- LDS
def test_lds_of_exact_linear_predictor_is_one():
    rng = np.random.default_rng(0)
    n_train, n_q, M = 50, 7, 30
    W = rng.normal(size=(n_q, n_train))
    subsets = gt.random_subsets(n_train, M, 0.5, seed=1)
    assert subsets.shape == (M, n_train) and (subsets.sum(1) == 25).all()
    # a linear ground truth: each retrained margin is exactly Σ_{i∈S} W[q, i] (+ a per-query constant)
    margins = (subsets.astype(float) @ W.T + rng.normal(size=n_q))[:, None, :].repeat(2, axis=1)
    out = lds(W, subsets, margins)
    assert out["lds"] == pytest.approx(1.0)
    assert np.allclose(out["per_query"], 1.0)
    assert out["noise_ceiling"] == pytest.approx(1.0)  # two identical seeds
    assert out["n_subsets"] == M and out["n_seeds"] == 2
    # the sign matters: the negated predictor is perfectly anti-correlated
    assert lds(-W, subsets, margins)["lds"] == pytest.approx(-1.0)


def test_lds_random_scores_near_zero_and_noise_ceiling():
    rng = np.random.default_rng(1)
    n_train, n_q, M = 200, 40, 60
    W = rng.normal(size=(n_q, n_train))
    subsets = gt.random_subsets(n_train, M, 0.5, seed=2)
    clean = subsets.astype(float) @ W.T
    noise = rng.normal(scale=clean.std() * 1.0, size=(M, 2, n_q))
    margins = clean[:, None, :] + noise
    out = lds(rng.normal(size=(n_q, n_train)), subsets, margins)
    assert abs(out["lds"]) < 0.1
    true = lds(W, subsets, margins)
    # noise ceiling of seed 0 vs seed 1 with noise as large as the signal: about 0.5
    assert 0.3 < true["noise_ceiling"] < 0.7
    assert true["lds"] > true["noise_ceiling"]  # averaging 2 seeds beats one seed against another
    one_seed = lds(W, subsets, margins[:, :1])
    assert np.isnan(one_seed["noise_ceiling"])
    # a subset of queries
    part = lds(W[[3, 5]], subsets, margins, queries=[3, 5])
    assert part["per_query"] == pytest.approx(true["per_query"][[3, 5]])


def test_lds_rejects_bad_shapes():
    subsets = gt.random_subsets(10, 5, 0.5, 0)
    with pytest.raises(ProponentError):
        lds(np.zeros((3, 9)), subsets, np.zeros((5, 1, 3)))
    with pytest.raises(ProponentError):
        lds(np.zeros((3, 10)), subsets, np.zeros((4, 1, 3)))
    with pytest.raises(ProponentError):
        gt.random_subsets(10, 5, 1.5, 0)


def test_loo_correlation_known_answer():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(6, 30))
    idx = np.array([2, 7, 11, 19])
    eff = scores[:, idx].T * 3.0  # measured = 3 × predicted: Pearson 1
    out = loo_correlation(scores, idx, eff)
    assert out["loo"] == pytest.approx(1.0)
    per_seed = np.stack([eff, eff + rng.normal(scale=1e-9, size=eff.shape)])
    assert loo_correlation(scores, idx, per_seed)["noise_ceiling"] == pytest.approx(1.0)
    assert loo_correlation(-scores, idx, eff)["loo"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- detection metrics
def test_auroc_and_precision_at_k_known_answers():
    pos = np.array([0, 1, 0, 1, 0, 0, 1, 0], bool)
    perfect = pos.astype(float) + np.linspace(0, 0.1, 8)
    assert auroc(perfect, pos) == 1.0
    assert auroc(-perfect, pos) == 0.0
    assert precision_at_k(perfect, pos) == 1.0
    s = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.3, 0.05, 0.0])  # top 3: rows 0, 1, 3 → 2 positives
    assert precision_at_k(s, pos) == pytest.approx(2 / 3)
    assert precision_at_k(s, pos, k=2) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- ground-truth cache
@pytest.fixture
def tab_project(tmp_path):
    root = write_tabular_project(tmp_path / "tab", n_train=40, n_test=10, d=4)
    return Project.load(root)


import engine.core.train as _train  # noqa: E402

_REAL_TRAIN_MODEL = _train.train_model


class _SimulatedKill(RuntimeError):
    pass


def _count_trains(monkeypatch, fail_after: int | None = None):
    calls = {"n": 0}
    real = _REAL_TRAIN_MODEL

    def counting(*a, **kw):
        if fail_after is not None and calls["n"] >= fail_after:
            raise _SimulatedKill("simulated kill")
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(gt, "train_model", counting)
    return calls


def test_groundtruth_cache_reuse_and_resume(tab_project, monkeypatch):
    p = tab_project
    subsets = gt.random_subsets(len(p.train_dataset), 4, 0.5, seed=0)
    calls = _count_trains(monkeypatch, fail_after=5)  # dies during subset 2 (2 seeds per subset)
    with pytest.raises(_SimulatedKill):
        gt.retrain_margins(p, subsets=subsets, seeds=[0, 1], processes=1)
    assert calls["n"] == 5
    calls = _count_trains(monkeypatch)
    seen = []
    a = gt.retrain_margins(p, subsets=subsets, seeds=[0, 1], processes=1, progress=lambda s, d, t: seen.append((d, t)))
    assert calls["n"] == 4  # subsets 0 and 1 were kept; only 2 and 3 retrained
    assert seen[0] == (2, 4) and seen[-1] == (4, 4)
    assert a.shape == (4, 2, len(p.test_dataset))
    calls = _count_trains(monkeypatch)
    b = gt.retrain_margins(p, subsets=subsets, seeds=[0, 1], processes=1)
    assert calls["n"] == 0 and np.array_equal(a, b)
    # the cached values are the real margins of a model retrained on that subset
    from engine.core.train import train_model

    model = train_model(p, indices=np.flatnonzero(subsets[3]), seed=1)
    assert np.allclose(a[3, 1], gt.test_margins(model, p.test_dataset.x, p.test_dataset.y))
    # other labels are another computation
    labels = p.train_dataset.y.clone()
    labels[0] = (labels[0] + 1) % p.num_classes
    calls = _count_trains(monkeypatch)
    c = gt.retrain_margins(p, subsets=subsets[:3], seeds=[0], labels=labels, processes=1)
    assert calls["n"] == 3 and c.shape == (3, 1, len(p.test_dataset))


def test_loo_effects_orientation_on_convex_model(tab_project):
    """LOO effect = margin(all) − margin(without i): positive when i supported the query."""
    p = tab_project
    per_seed, eff = gt.loo_effects(p, [0, 1, 2], seeds=[0], processes=1)
    assert per_seed.shape == (1, 3, len(p.test_dataset)) and eff.shape == (3, len(p.test_dataset))
    from engine.core.train import train_model

    full = gt.test_margins(train_model(p, seed=0), p.test_dataset.x, p.test_dataset.y)
    wo = gt.test_margins(train_model(p, indices=np.setdiff1d(np.arange(len(p.train_dataset)), [1]), seed=0),
                         p.test_dataset.x, p.test_dataset.y)
    assert np.allclose(eff[1], full - wo)
    with pytest.raises(ProponentError):
        gt.loo_margins(p, [len(p.train_dataset)], seeds=[0])


# ----------------------------------------------------------------------------- detection helpers
def test_flip_labels_and_truth_metrics():
    from engine.evaluate.detection import flip_labels, leak_flag_metrics, leak_recall, mislabel_metrics

    y = np.arange(200) % 4
    new, idx = flip_labels(y, 0.1, 4, seed=3)
    assert len(idx) == 20 and (new[idx] != y[idx]).all()
    assert (np.delete(new, idx) == np.delete(y, idx)).all()
    assert np.array_equal(flip_labels(y, 0.1, 4, seed=3)[0], new)  # seeded
    susp = np.zeros(200)
    susp[idx] = 1.0
    m = mislabel_metrics(susp, idx, 200)
    assert m["auroc"] == 1.0 and m["precision_at_k"] == 1.0 and m["k"] == 20
    S = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4]])
    r = leak_recall(S, [1, 2], ks=(1, 2))
    assert r["recall@1"] == 0.5 and r["recall@2"] == 1.0 and r["twin_rank"] == [0, 1]
    pairs = [{"test_index": 0, "train_index": 1, "flagged": True}, {"test_index": 1, "train_index": 0, "flagged": True},
             {"test_index": 2, "train_index": 5, "flagged": False}]
    f = leak_flag_metrics(pairs, [{"test_index": 0, "train_index": 1}, {"test_index": 2, "train_index": 5}])
    assert f["precision"] == 0.5 and f["recall"] == 0.5


def test_planted_exact_leaks_are_found_and_flips_detected(tab_project, tmp_path):
    """Planted copies are retrained into a copy of the project; exact copies must be each leaked
    query's top-1 kNN neighbour, and the mislabel benchmark really retrains on flipped labels."""
    from engine.evaluate.detection import leak_benchmark, mislabel_benchmark, plant_leaks

    leaked, leaks = plant_leaks(tab_project, 4, tmp_path / "leaked", seed=0)
    assert len(leaked.train_dataset) == len(tab_project.train_dataset) + 4
    for l in leaks:
        x_train = leaked.train_dataset.x[l["train_index"]]
        x_test = leaked.test_dataset.x[l["test_index"]]
        if l["kind"] == "exact":
            assert torch.allclose(x_train, x_test, atol=1e-4)
        assert leaked.train_dataset.y[l["train_index"]] == leaked.test_dataset.y[l["test_index"]]
    res = leak_benchmark(tab_project, [("knn", {})], source="plant", m=4, workdir=tmp_path)
    row = res["methods"][0]
    exact = [r for r, l in zip(row["twin_rank"], res["leaks"]) if l["kind"] == "exact"]
    assert exact and all(r == 0 for r in exact)
    mis = mislabel_benchmark(tab_project, [("knn", {})], source="flip", p=0.15, seed=0, cleanlab=False, workdir=tmp_path)
    assert mis["n_flipped"] == 6 and 0.0 <= mis["methods"][0]["auroc"] <= 1.0
    with pytest.raises(ProponentError):
        mislabel_benchmark(tab_project, [("knn", {})], source="truth")


# ----------------------------------------------------------------------------- counterfactual
def test_counterfactual_top_proponents_beat_random_on_convex_model(tab_project):
    from engine.workflows.counterfactual import counterfactual_check
    from engine.core.train import record_training

    p = tab_project
    record_training(p)
    # a query the model gets right, with clearly positive margin
    full = gt.test_margins(p.load_model(), p.test_dataset.x, p.test_dataset.y)
    q = int(np.argmax(full))
    res = counterfactual_check(p, q, "exact-if", k_values=(3, 8), seeds=(0,), random_trials=4, processes=1)
    assert res["retrains"] == 1 * (1 + 2 * 5)
    for row in res["rows"]:
        assert row["change"] < 0  # removing proponents lowers the margin
        assert row["change"] < row["random_change_mean"]  # ...more than removing random examples
    # removing the top *opponents* (negated scores) must not lower it like that
    from engine.workflows.counterfactual import query_scores

    s = query_scores(p, q, "exact-if")
    anti = counterfactual_check(p, q, scores_row=-s, k_values=(8,), seeds=(0,), random_trials=0, processes=1)
    assert anti["rows"][0]["change"] > res["rows"][-1]["change"]
    with pytest.raises(ProponentError):
        counterfactual_check(p, len(p.test_dataset), scores_row=s)
    with pytest.raises(ProponentError):
        counterfactual_check(p, q, scores_row=s[:-1])


def test_exact_influence_scores_high_on_real_retraining(tab_project):
    """The harness end to end on a convex model: exact influence must predict real retraining (LOO r ≈ 1,
    LDS high) and its sign-flipped scores must score negative; random scores score ≈ 0."""
    from engine import attribute
    from engine.core.train import record_training

    p = tab_project
    record_training(p)
    S = attribute(p, method="exact-if", queries="test")
    n = len(p.train_dataset)
    subsets = gt.random_subsets(n, 20, 0.5, seed=0)
    margins = gt.retrain_margins(p, subsets=subsets, seeds=[0], processes=1)
    good = lds(S, subsets, margins)["lds"]
    assert good > 0.8
    assert lds(-S, subsets, margins)["lds"] == pytest.approx(-good)
    assert abs(lds(np.random.default_rng(0).normal(size=S.shape), subsets, margins)["lds"]) < 0.3
    idx = np.arange(0, n, 4)
    _, eff = gt.loo_effects(p, idx, [0], processes=1)
    assert loo_correlation(S, idx, eff)["loo"] > 0.95
