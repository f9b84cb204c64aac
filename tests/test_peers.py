"""Peer-library adapters: shapes, and orientation checked against real leave-one-out retraining.

The ground truth is a tiny convex model (multinomial logistic regression, nn.Linear(4, 3),
mean cross-entropy + L2, trained to convergence with L-BFGS in float64) on 60 points. For
each training point i we retrain without it (warm-started; the optimum is unique) and record
effect[q, i] = margin_q(full) - margin_q(without i). Our convention says a peer's S[q, i] must
correlate POSITIVELY with that effect; a wrong sign flip shows up as a negative correlation.
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers print progress bars; keep the log readable

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(2)

from engine.evaluate.peers import PEER_METHODS, PeerInputs, available_peers, featurize_throughput_traker, run_peer

D, C, N, NQ = 4, 3, 60, 10
WD = 1e-2  # L2 on all parameters: the Hessian of the training objective is H_CE + WD * I
LR = 0.5


def _build() -> nn.Module:
    return nn.Sequential(nn.Linear(D, C))


def _objective(W, b, X, Y):
    return torch.nn.functional.cross_entropy(X @ W.T + b, Y) + 0.5 * WD * (W.pow(2).sum() + b.pow(2).sum())


def _fit(X, Y, init=None):
    W = torch.zeros(C, D, dtype=torch.float64) if init is None else init[0].clone()
    b = torch.zeros(C, dtype=torch.float64) if init is None else init[1].clone()
    W.requires_grad_()
    b.requires_grad_()
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _objective(W, b, X, Y)
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def _margins(W, b, X, Y):
    z = X @ W.T + b
    mask = torch.nn.functional.one_hot(Y, C).bool()
    return z[mask] - torch.logsumexp(z.masked_fill(mask, -torch.inf), -1)


def _blobs(n, gen, means):
    y = torch.arange(n) % C
    return means[y] + torch.randn(n, D, generator=gen, dtype=torch.float64), y


@pytest.fixture(scope="module")
def convex():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(C, D, generator=gen, dtype=torch.float64) * 1.5
    X, Y = _blobs(N, gen, means)
    Xq, Yq = _blobs(NQ, gen, means)
    W, b = _fit(X, Y)
    full = _margins(W, b, Xq, Yq)
    effect = np.zeros((NQ, N))
    for i in range(N):
        keep = torch.arange(N) != i
        Wi, bi = _fit(X[keep], Y[keep], init=(W, b))
        effect[:, i] = (full - _margins(Wi, bi, Xq, Yq)).numpy()
    assert np.abs(effect).max() > 1e-3  # the ground truth is not degenerate

    final = {"0.weight": W.float(), "0.bias": b.float()}
    # a short full-batch GD trajectory (TracIn checkpoints), ending at the converged model
    model = _build()
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    traj = []
    for step in range(1, 41):
        opt.zero_grad()
        _objective(model[0].weight.double(), model[0].bias.double(), X, Y).backward()
        opt.step()
        if step in (2, 5, 10, 20, 40):
            traj.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    traj.append(final)

    base = dict(build_model=_build, x_train=X.float(), y_train=Y, x_test=Xq.float(), y_test=Yq, num_classes=C)
    return {"base": base, "final": final, "traj": traj, "effect": effect, "X": X, "Y": Y}


def _corr(S, effect):
    from scipy import stats

    per_query = [stats.spearmanr(S[q], effect[q]).statistic for q in range(len(effect))]
    return float(np.nanmean(per_query)), float(stats.pearsonr(S.ravel(), effect.ravel()).statistic)


# (peer, method) -> how to call it and the least mean per-query Spearman with LOO we accept.
# proj_dim=10 equals the rank of the margin gradients here (15 parameters minus the 5
# directions that shift every logit equally), so TRAK's projection loses nothing.
# Damping is in each peer's own units: for kronfluence and dattri IF-CG it is added to the
# Hessian of the mean loss, so WD is exactly right; dattri LiSSA's effective damping is
# damping * scaling.
CASES = {
    ("traker", "trak"): dict(ckpts="final", proj_dim=10, damping=None, options=None, min_sp=0.4),
    ("kronfluence", "ekfac"): dict(ckpts="final", damping=WD, options=None, min_sp=0.4),
    ("dattri", "trak"): dict(ckpts="final", proj_dim=10, damping=None, options=None, min_sp=0.4),
    ("dattri", "tracin"): dict(ckpts="traj", proj_dim=10, damping=None, options=None, min_sp=0.2),
    ("dattri", "grad-dot"): dict(ckpts="final", proj_dim=10, damping=None, options=None, min_sp=0.2),
    ("dattri", "grad-cos"): dict(ckpts="final", proj_dim=10, damping=None, options=None, min_sp=0.2),
    ("dattri", "if-cg"): dict(ckpts="final", damping=WD, options=None, min_sp=0.8),
    ("dattri", "if-lissa"): dict(ckpts="final", damping=WD / 10.0,
                                 options={"recursion_depth": 300, "scaling": 10.0, "batch_size": N}, min_sp=0.8),
    ("captum", "tracincp"): dict(ckpts="traj", damping=None, options=None, min_sp=0.2),
}
_IMPORT = {"traker": "trak", "kronfluence": "kronfluence", "dattri": "dattri", "captum": "captum.influence"}


def _inputs(convex, case) -> PeerInputs:
    ckpts = [convex["final"]] if case["ckpts"] == "final" else convex["traj"]
    return PeerInputs(checkpoints=ckpts, checkpoint_lrs=[LR] * len(ckpts), proj_dim=case.get("proj_dim", 512),
                      damping=case["damping"], **convex["base"])


def test_catalogue():
    avail = available_peers()
    assert set(avail) == set(PEER_METHODS)
    assert all(v is None or isinstance(v, str) for v in avail.values())
    assert {k for k, _ in CASES} | {"cleanlab"} == set(PEER_METHODS)
    assert sorted(CASES) == sorted((p, m) for p, ms in PEER_METHODS.items() for m in ms if p != "cleanlab")


@pytest.mark.parametrize("peer,method", sorted(CASES), ids=[f"{p}-{m}" for p, m in sorted(CASES)])
def test_orientation_matches_leave_one_out(convex, peer, method):
    pytest.importorskip(_IMPORT[peer])
    case = CASES[(peer, method)]
    res = run_peer(peer, method, _inputs(convex, case), options=case["options"])
    assert res.skipped is None, res.skipped  # an adapter we claim works must produce scores
    assert res.peer == peer and res.method == method
    assert res.scores.shape == (NQ, N) and res.scores.dtype == np.float64
    assert np.isfinite(res.scores).all()
    assert res.fit_seconds >= 0 and res.score_seconds >= 0 and res.peak_rss_mb > 0
    assert "orientation" in res.settings
    sp, pe = _corr(res.scores, convex["effect"])
    print(f"{peer}/{method}: mean per-query Spearman {sp:+.3f}, pooled Pearson {pe:+.3f} with LOO")
    assert pe > 0.2, (sp, pe)
    assert sp > case["min_sp"], (sp, pe)


def test_traker_and_dattri_trak_agree(convex):
    """With proj_dim = gradient rank both TRAKs are projection-free, so they must agree."""
    pytest.importorskip("trak")
    pytest.importorskip("dattri")
    from scipy import stats

    inp = _inputs(convex, CASES[("traker", "trak")])
    a = run_peer("traker", "trak", inp).scores
    b = run_peer("dattri", "trak", inp).scores
    assert a is not None and b is not None
    assert stats.spearmanr(a.ravel(), b.ravel()).statistic > 0.95


def test_traker_ensemble_and_throughput(convex):
    pytest.importorskip("trak")
    # several checkpoints (an ensemble) and the default proj_dim larger than the gradient
    # dimension, so damping is needed
    inp = PeerInputs(checkpoints=convex["traj"][-3:], checkpoint_lrs=[LR] * 3, proj_dim=64, damping=1e-2,
                     **convex["base"])
    res = run_peer("traker", "trak", inp)
    assert res.skipped is None, res.skipped
    assert res.settings["checkpoints_used"] == 3 and res.settings["projector"] == "BasicProjector"
    assert _corr(res.scores, convex["effect"])[1] > 0
    assert featurize_throughput_traker(inp, n_examples=40) > 0


def test_cleanlab_flags_flipped_labels():
    pytest.importorskip("cleanlab")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    rng = np.random.default_rng(0)
    n = 150
    means = rng.normal(size=(C, D)) * 3.0
    y_true = np.arange(n) % C
    x = means[y_true] + rng.normal(size=(n, D))
    flipped = rng.choice(n, size=15, replace=False)
    y = y_true.copy()
    y[flipped] = (y[flipped] + rng.integers(1, C, size=len(flipped))) % C

    def cv_probs():
        return cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=5, method="predict_proba")

    inp = PeerInputs(build_model=_build, checkpoints=[], checkpoint_lrs=[], x_train=torch.tensor(x).float(),
                     y_train=torch.tensor(y), x_test=torch.zeros(0, D), y_test=torch.zeros(0, dtype=torch.long),
                     num_classes=C, cross_val_probs=cv_probs)
    res = run_peer("cleanlab", "label-quality", inp)
    assert res.skipped is None, res.skipped
    assert res.scores.shape == (n,) and res.scores.dtype == np.float64
    is_flipped = np.zeros(n, bool)
    is_flipped[flipped] = True
    assert roc_auc_score(is_flipped, res.scores) > 0.8  # higher suspicion = more likely mislabeled
    assert isinstance(res.settings["n_label_issues"], int) and res.settings["n_label_issues"] > 0

    res = run_peer("cleanlab", "label-quality", PeerInputs(**{**inp.__dict__, "cross_val_probs": None}))
    assert res.scores is None and "cross_val_probs" in res.skipped


def test_failures_are_reported_not_raised(convex):
    pytest.importorskip("dattri")
    with pytest.raises(ValueError):
        run_peer("dattri", "no-such-method", _inputs(convex, CASES[("dattri", "grad-dot")]))
    # a checkpoint that does not fit the architecture: the peer's error comes back as one line
    bad = PeerInputs(**{**_inputs(convex, CASES[("dattri", "grad-dot")]).__dict__,
                        "build_model": lambda: nn.Sequential(nn.Linear(D, C + 1))})
    res = run_peer("dattri", "grad-dot", bad)
    assert res.scores is None and res.skipped and "\n" not in res.skipped


def test_small_mlp_every_method_runs(convex):
    """A non-convex two-layer model: every adapter returns finite [n_test, n_train] scores."""
    torch.manual_seed(0)
    X, Y = convex["X"].float(), convex["Y"]

    def build():
        return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=1e-3)
    ckpts = []
    for step in range(1, 101):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        if step % 50 == 0:
            ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    base = {**convex["base"], "build_model": build}
    inp = PeerInputs(checkpoints=ckpts, checkpoint_lrs=[0.5] * len(ckpts), proj_dim=32, damping=1e-2, **base)
    for peer, method in sorted(CASES):
        if peer in _IMPORT and available_peers()[peer] is not None:
            continue
        opts = {"recursion_depth": 50, "scaling": 50.0, "batch_size": N} if method == "if-lissa" else None
        res = run_peer(peer, method, inp, options=opts)
        assert res.skipped is None, f"{peer}/{method}: {res.skipped}"
        assert res.scores.shape == (NQ, N) and np.isfinite(res.scores).all(), (peer, method)
