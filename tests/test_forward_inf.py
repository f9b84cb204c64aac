"""Forward-INF: first-order equivalence with Grad-Dot, sign against leave-one-out, frozen
normalisation, vmap batching against a per-query loop, memorised queries, calibration."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import Project
from engine.autodiff import GradientComputer
from engine.methods.base import get_method
from engine.core.train import record_training, train_model
from tests.conftest import MLP_MODEL, write_tabular_project

BN_MODEL = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, num_classes))
'''
SGD_RECIPE = 'optimizer = "sgd"\nlr = 0.1\nmomentum = 0.9\nepochs = 8\nbatch_size = 16\nseed = 0\n'


def _fi(**kw):
    cls = get_method("forward-inf")
    return cls(cls.Settings(**kw))


@pytest.fixture(scope="module")
def mlp_project(tmp_path_factory):
    p = Project.load(write_tabular_project(tmp_path_factory.mktemp("fi_mlp") / "p", model=MLP_MODEL, training=SGD_RECIPE))
    record_training(p)
    return p


@pytest.fixture(scope="module")
def bn_project(tmp_path_factory):
    p = Project.load(write_tabular_project(tmp_path_factory.mktemp("fi_bn") / "p", model=BN_MODEL, training=SGD_RECIPE))
    record_training(p)
    return p


def test_one_small_sgd_step_is_lr_times_grad_dot(mlp_project):
    """ℓ(θ, z_i) − ℓ(θ − η∇ℓ_q, z_i) = η ∇ℓ_iᵀ∇ℓ_q + O(η²)."""
    p = mlp_project
    q = np.arange(6)
    comp = GradientComputer(p.load_model().double())
    g_train = comp.full(p.train_dataset.x.double(), p.train_dataset.y, "loss")
    g_q = comp.full(p.test_dataset.x[q].double(), p.test_dataset.y[q], "loss")
    first_order = (g_q @ g_train.T).numpy()
    errors = []
    for eta in (1e-3, 1e-2):
        S = _fi(optimizer="sgd", steps=1, lr=eta, precision="float64").fit(p).scores(("test", q))
        errors.append(np.abs(S - eta * first_order).max() / np.abs(eta * first_order).max())
    assert errors[0] < 2e-3, errors
    # the residual is second order: ten times the step, about a hundred times the absolute error (10x relative)
    assert 4 < errors[1] / errors[0] < 25, errors
    # and it ranks like the Grad-Dot baseline (margin gradient of the query) per query
    from scipy.stats import spearmanr

    gd = get_method("grad-dot")().fit(p).scores(("test", q))
    S = _fi(optimizer="sgd", steps=1, lr=1e-3, precision="float64").fit(p).scores(("test", q))
    assert min(spearmanr(S[r], gd[r])[0] for r in range(len(q))) > 0.95


def test_sign_matches_leave_one_out_on_convex_model(logreg_project):
    """Positive score = removing the example lowers the query's margin (real LOO retraining)."""
    from engine.autodiff.measurement import correct_class_margin

    p = logreg_project
    n = len(p.train_dataset)
    q = np.arange(5)
    x, y = p.test_dataset.x[q], p.test_dataset.y[q]
    S = _fi(optimizer="sgd", steps=1, lr=1e-2).fit(p).scores(("test", q))
    with torch.no_grad():
        full = correct_class_margin(train_model(p)(x), y).numpy()
    removed = np.random.default_rng(0).choice(n, size=14, replace=False)
    loo = np.empty((len(q), len(removed)))
    for j, i in enumerate(removed):
        with torch.no_grad():
            loo[:, j] = full - correct_class_margin(train_model(p, indices=np.delete(np.arange(n), i))(x), y).numpy()
    pred = S[:, removed].ravel()
    r = np.corrcoef(pred, loo.ravel())[0, 1]
    assert r > 0.6, r
    big = np.abs(loo.ravel()) > np.quantile(np.abs(loo), 0.75)
    assert (np.sign(pred[big]) == np.sign(loo.ravel()[big])).mean() >= 0.8


def _loop_reference(model, base_x, base_y, xq, yq, *, optimizer, steps, lr):
    """One deep copy per query, torch.optim on its loss in eval mode (no vmap), then train losses."""
    out = []
    with torch.no_grad():
        base = F.cross_entropy(model(base_x), base_y, reduction="none")
    for k in range(len(yq)):
        m = copy.deepcopy(model).eval()
        opt = torch.optim.SGD(m.parameters(), lr=lr) if optimizer == "sgd" else torch.optim.Adam(m.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(m(xq[k:k + 1]), yq[k:k + 1]).backward()
            opt.step()
        with torch.no_grad():
            out.append((base - F.cross_entropy(m(base_x), base_y, reduction="none")).numpy())
    return np.stack(out)


@pytest.mark.parametrize("optimizer,steps,lr", [("sgd", 2, 0.05), ("adam", 2, 5e-3)])
def test_vmap_batches_equal_per_query_loop_and_batchnorm_is_frozen(bn_project, optimizer, steps, lr):
    p = bn_project
    q = np.arange(7)
    ds, ts = p.train_dataset, p.test_dataset
    saved = {k: v.clone() for k, v in p.load_state(p.final_checkpoint()).items()}
    att = _fi(optimizer=optimizer, steps=steps, lr=lr, precision="float64").fit(p)
    bufs = {n: b.clone() for n, b in att.engine.fm.buffers.items()}
    assert any("running_mean" in n for n in bufs)
    S = att.scores(("test", q))
    # normalisation statistics untouched by scoring (in the engine and on disk)
    for n, b in att.engine.fm.buffers.items():
        assert torch.equal(b, bufs[n]), n
    for k, v in p.load_state(p.final_checkpoint()).items():
        assert torch.equal(v, saved[k]), k
    # batched (vmap over stacked copies) == one query at a time with torch.optim in eval mode
    model = p.load_model().double()
    ref = _loop_reference(model, ds.x.double(), ds.y, ts.x[q].double(), ts.y[q], optimizer=optimizer, steps=steps, lr=lr)
    np.testing.assert_allclose(S, ref, rtol=1e-7, atol=1e-10)
    # a memory budget that forces one query per batch gives the same matrix
    one = _fi(optimizer=optimizer, steps=steps, lr=lr, precision="float64", memory_budget_mb=1e-4).fit(p)
    assert one.engine.plan(ds.x[:1])[0] == 1
    np.testing.assert_allclose(one.scores(("test", q)), S, rtol=1e-10, atol=1e-13)
    # a train-mode step would have used batch statistics of one example: different scores
    m_train = copy.deepcopy(model).train()
    with torch.no_grad():
        moved_train = F.cross_entropy(m_train(ds.x.double()), ds.y, reduction="none")
        moved_eval = F.cross_entropy(model(ds.x.double()), ds.y, reduction="none")
    assert not torch.allclose(moved_train, moved_eval)


def test_self_scores_are_the_diagonal_and_suspicion_finds_high_loss(mlp_project):
    p = mlp_project
    att = _fi(optimizer="sgd", steps=2, lr=0.05).fit(p)
    idx = np.arange(0, len(p.train_dataset), 7)
    S = att.scores(("train", idx))
    np.testing.assert_allclose(att.self_scores()[idx], S[np.arange(len(idx)), idx], rtol=1e-9, atol=1e-12)
    # normalize='self': S[q, i] / sqrt(|S[q, q]| |S[i, i]|), so the diagonal is the sign (±1)
    att_n = _fi(optimizer="sgd", steps=2, lr=0.05, normalize="self").fit(p)
    raw_self = att.self_scores()
    mag = np.maximum(np.abs(raw_self), np.median(np.abs(raw_self)) * 1e-6)  # tiny self-changes are floored
    np.testing.assert_allclose(att_n.self_scores(), raw_self / mag, rtol=1e-9)
    Sn = att_n.scores(("train", idx))
    np.testing.assert_allclose(Sn, S / np.sqrt(mag[idx][:, None] * mag[None, :]), rtol=1e-9)
    big = np.abs(raw_self[idx]) > mag[idx] * 0.999
    np.testing.assert_allclose(np.diag(Sn[:, idx])[big], np.sign(raw_self[idx])[big], rtol=1e-9)
    np.testing.assert_allclose(att_n.suspicion(), raw_self, rtol=1e-12)


def test_ascent_and_absolute_orientation(mlp_project):
    p = mlp_project
    q = np.arange(4)
    d = _fi(optimizer="sgd", steps=1, lr=1e-3).fit(p).scores(("test", q))
    a = _fi(optimizer="sgd", steps=1, lr=1e-3, direction="ascent").fit(p).scores(("test", q))
    # to first order unlearning moves every loss the opposite way by the same amount: same orientation
    np.testing.assert_allclose(a, d, rtol=0.05, atol=1e-3 * np.abs(d).max())
    ab = _fi(optimizer="sgd", steps=1, lr=1e-3, absolute=True).fit(p).scores(("test", q))
    np.testing.assert_allclose(ab, np.abs(d), rtol=1e-12)


def test_memorised_query_is_moved_onto_a_sphere(mlp_project):
    p = mlp_project
    att = _fi(optimizer="sgd", steps=1, lr=1e-2).fit(p)
    eng = att.engine
    x, y = p.test_dataset.x.double(), p.test_dataset.y
    loss = eng.losses(x, y)
    thr = 0.3
    keep = torch.nonzero(loss < thr).flatten()[:6]
    x, y = x[keep], y[keep]
    xs, radius = eng.unmemorise(x, y, thr, seed=0)
    assert (radius > 0).all()
    np.testing.assert_allclose((xs - x).flatten(1).norm(dim=1).numpy(), radius, rtol=1e-9)
    reached = eng.losses(xs, y).numpy() >= thr
    assert reached.mean() >= 0.5
    # below the threshold nothing moves; a memorised query's step still changes the training losses
    xs2, r2 = eng.unmemorise(x, y, float(loss.min()) * 0.5, seed=0)
    assert (r2 == 0).all() and torch.equal(xs2, x)
    mem = _fi(optimizer="sgd", steps=1, lr=1e-2, memorised_loss=thr).fit(p)
    S = mem.scores(("test", keep.numpy()))
    plain = _fi(optimizer="sgd", steps=1, lr=1e-2).fit(p).scores(("test", keep.numpy()))
    assert mem.meta["memorised_queries"] == len(keep) and np.abs(S).max() > 0 and not np.allclose(S, plain)


def test_bad_settings_are_one_line_errors(mlp_project):
    from engine.core.errors import ProponentError
    from engine.methods.base import coerce_settings

    with pytest.raises(ProponentError, match="optimizer"):
        coerce_settings(get_method("forward-inf"), {"optimizer": "rmsprop"})
    with pytest.raises(ProponentError, match="steps and lr"):
        _fi(steps=-1, lr=0.1).fit(mlp_project)


def test_calibration_uses_training_data_only_and_is_cached(logreg_project, copy_project):
    from engine.methods.forward_inf.calibration import GRIDS, calibrate_forward_inf

    p = copy_project(logreg_project, "cal")
    t0 = time.perf_counter()
    cal = calibrate_forward_inf(p, optimizer="sgd", n_val=12, n_subsets=6)
    first = time.perf_counter() - t0
    assert cal["steps"] in GRIDS["sgd"]["steps"] and cal["lr"] in GRIDS["sgd"]["lr"]
    best = max(r[2] for r in cal["table"])
    assert cal["lds"] >= best - 0.005 and len(cal["table"]) == 8
    t0 = time.perf_counter()
    assert calibrate_forward_inf(p, optimizer="sgd", n_val=12, n_subsets=6) == cal
    assert time.perf_counter() - t0 < first
    # scrambling the test set cannot change the choice: it is never read
    csv = p.test_csv
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0]] + lines[1:][::-1][:10]) + "\n")
    q = Project.load(p.root)
    cal2 = calibrate_forward_inf(q, optimizer="sgd", n_val=12, n_subsets=6)
    assert [r[2] for r in cal2["table"]] == pytest.approx([r[2] for r in cal["table"]])
    att = _fi(optimizer="sgd", calibration="retrain").fit(q)
    assert att.meta["chosen_by"].startswith("calibrated") and att.steps in GRIDS["sgd"]["steps"]
