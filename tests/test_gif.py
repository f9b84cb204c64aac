"""Generalized influence functions: selection, solvers, the generalized solve, per-query scores.

Ground truth is real retraining of a convex model (multinomial logistic regression with weight
decay, trained to convergence by full-batch L-BFGS) and explicit linear algebra.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from engine import Project
from tests.conftest import LINEAR_MODEL, write_tabular_project
from engine.methods.gif.solvers import (SolverNotConverged, adjoint_solve, generalized_solve, removal_target,
    require_converged, retained_sample, rows_per_layer, select_parameters, solve_psd)
from engine.autodiff.functional import FunctionalModel, ParamLayout
from engine.autodiff.hvp import HessianOperator
from engine.autodiff.measurement import correct_class_margin
from engine.core.train import predict_logits, record_training, train_model

LINEAR = LINEAR_MODEL

MLP = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 12), nn.Tanh(), nn.Linear(12, num_classes))
'''

LBFGS = 'optimizer = "lbfgs"\nweight_decay = 0.01\nepochs = 20\nseed = 0\n'


def make_project(root: Path, *, model: str = LINEAR, n_train: int = 90, n_test: int = 30, d: int = 4,
                 classes: int = 3, seed: int = 0, training: str = LBFGS) -> Project:
    """A small tabular project (overlapping Gaussian blobs), trained and recorded."""
    write_tabular_project(root, n_train=n_train, n_test=n_test, d=d, classes=classes, seed=seed, model=model,
                          training=training, spread=1.2)
    p = Project.load(root)
    record_training(p)
    return p


@pytest.fixture(scope="module")
def logreg(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("gif") / "logreg")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("gif") / "mlp", model=MLP, seed=1)


def test_hvp_matches_explicit_hessian(logreg):
    from engine.methods.exact_if import objective_hessian

    model = logreg.load_model()
    ds = logreg.train_dataset
    H = objective_hessian(model, ds.x, ds.y, logreg.recipe.weight_decay, 64, "cpu")
    op = HessianOperator(model, ds.x, ds.y, weight_decay=logreg.recipe.weight_decay, batch_size=37)
    V = torch.randn(3, op.n_params, dtype=torch.float64)
    assert torch.allclose(op(V), V @ H, atol=1e-10)
    assert torch.allclose(op(V[0]), H @ V[0], atol=1e-10)
    # the Jacobi preconditioner's Hutchinson estimate of diag((H + λ)²) is unbiased: many probes land close
    lam = 0.3
    Hd = H + lam * torch.eye(op.n_params, dtype=torch.float64)
    est = op.squared_diagonal(4000, damping=lam, seed=1)
    want = torch.diagonal(Hd @ Hd)
    assert torch.allclose(est, want, rtol=0.15)


def test_parameter_layout_is_module_order_and_round_trips():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    layout = FunctionalModel(model).layout
    assert [s.name for s in layout] == [n for n, _ in model.named_parameters()]
    assert [s.offset for s in layout] == list(np.cumsum([0] + [s.numel for s in list(layout)[:-1]]))
    flat = torch.randn(3, layout.n)  # leading dims survive flatten(unflatten(.))
    assert torch.equal(layout.flatten(layout.unflatten(flat)), flat)

    class Shared(nn.Module):  # a tied parameter is one tracked tensor, listed once
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

    shared = FunctionalModel(Shared())
    assert shared.names == ["a.weight", "a.bias", "b.bias"]
    assert shared.n_params == 9 + 3 + 3


def _norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 5 * 5, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 4)).eval()


@pytest.mark.parametrize("mode", ["output", "gradient", "random"])
@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_selection_whole_rows_never_norm(mode, ratio):
    model = _norm_model()
    x = torch.randn(12, 2, 5, 5)
    y = torch.randint(0, 4, (12,))
    mask = select_parameters(model, x, y, ratio=ratio, mode=mode)
    layout = {s.name: s for s in FunctionalModel(model).layout}
    named = dict(model.named_parameters())
    for name, s in layout.items():
        part = mask[s.offset:s.offset + s.numel].reshape(s.shape)
        if isinstance(model.get_submodule(s.module_name), (nn.BatchNorm2d, nn.LayerNorm)):
            assert not part.any(), f"normalisation parameter {name} selected"
            continue
        rows = s.shape[0]
        per_row = part.reshape(rows, -1)
        # whole rows: every row is fully in or fully out
        assert torch.all(per_row.all(1) | ~per_row.any(1))
        assert int(per_row.all(1).sum()) == rows_per_layer(rows, ratio) == min(rows, max(1, math.ceil(ratio * rows)))
        if s.attr == "bias":  # the bias rows are exactly the weight rows
            w = layout[name[:-len("bias")] + "weight"]
            wrows = mask[w.offset:w.offset + w.numel].reshape(w.shape[0], -1).all(1)
            assert torch.equal(wrows, per_row.all(1))
    assert named  # sanity


def test_selection_ranks_rows_by_activation_and_gradient():
    lin = nn.Linear(3, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1] * 3, [5.0] * 3, [0.2] * 3, [0.0] * 3, [-4.0] * 3, [0.3] * 3]))
        lin.bias.zero_()
    model = nn.Sequential(lin).eval()
    x = torch.ones(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    mask = select_parameters(model, x, y, ratio=2 / 6, mode="output")
    chosen = mask[:18].reshape(6, 3).all(1).nonzero().flatten().tolist()
    assert chosen == [1, 4]  # the largest |activations|: 15 and −12
    assert mask[18:].nonzero().flatten().tolist() == [1, 4]  # and their biases

    # gradient-based on the loss: ∂CE/∂z = softmax − onehot; the largest |·| is the label row (0) and the max logit (1)
    mask = select_parameters(model, x, y, ratio=2 / 6, mode="gradient", objective="loss")
    chosen = mask[:18].reshape(6, 3).all(1).nonzero().flatten().tolist()
    assert chosen == [0, 1]


def test_gradient_selection_of_a_model_with_in_place_operations():
    """A ReLU(inplace=True) on a convolution's output and a residual ``+=`` (where a full backward
    hook fails): the same rows as the same function written without in-place operations."""
    from tests.test_curvature import _twin_models

    from engine.methods.gif.solvers import _layer_statistics
    plain, inplace = _twin_models()
    x, y = torch.randn(24, 3, 5, 5), torch.randint(0, 4, (24,))
    stats = [_layer_statistics(m, x, y, "gradient", lambda o, t: F.cross_entropy(o, t, reduction="sum"), 10, "cpu")
             for m in (plain, inplace)]
    for a, b in zip(stats[0].values(), stats[1].values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        assert float(a.sum()) > 0
    masks = [select_parameters(m, x, y, ratio=0.5, mode="gradient") for m in (plain, inplace)]
    assert torch.equal(masks[0], masks[1]) and masks[0].any()


def test_selection_of_a_linear_over_tokens_ranks_its_output_features():
    """A Linear over [b, tokens, d] (a transformer's): its rows are the last dimension, not the
    tokens; an attention block (whose out_proj never runs its own forward) selects in both modes."""
    lin = nn.Linear(3, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1] * 3, [5.0] * 3, [0.2] * 3, [0.0] * 3, [-4.0] * 3, [0.3] * 3]))
        lin.bias.zero_()

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):  # [b, 5, 3] -> [b, 6]
            return self.lin(x).mean(1)

    x = torch.ones(4, 5, 3)
    y = torch.zeros(4, dtype=torch.long)
    mask = select_parameters(Tokens().eval(), x, y, ratio=2 / 6, mode="output")
    assert mask[:18].reshape(6, 3).all(1).nonzero().flatten().tolist() == [1, 4]

    from tests.test_factorized import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    xt, yt = torch.randn(5, 6, 4), torch.tensor([0, 1, 2, 0, 1])
    for mode in ("output", "gradient"):
        assert select_parameters(model, xt, yt, ratio=0.25, mode=mode).any()


def test_full_ratio_equals_plain_if(mlp):
    model = mlp.load_model()
    ds = mlp.train_dataset
    U = np.arange(0, 12)
    rows = retained_sample(len(ds), U, 0)
    op = HessianOperator(model, ds.x[rows], ds.y[rows], weight_decay=mlp.recipe.weight_decay)
    g = removal_target(op, ds.x[U], ds.y[U], len(ds))
    full = select_parameters(model, ds.x[U], ds.y[U], ratio=1.0)
    assert bool(full.all())
    r_gif = require_converged(generalized_solve(op, g, full, variant="gif", tol=1e-9, max_iter=2000))
    r_if = require_converged(generalized_solve(op, g, None, variant="if", tol=1e-9, max_iter=2000))
    assert torch.allclose(r_gif.x, r_if.x, rtol=1e-6, atol=1e-9 * float(r_if.x.norm()))
    # and a partial selection gives a different (restricted) update, zero off the selection
    part = select_parameters(model, ds.x[U], ds.y[U], ratio=0.1)
    r_part = require_converged(generalized_solve(op, g, part, variant="gif", tol=1e-8, max_iter=2000))
    assert float(r_part.x[~part].abs().max()) == 0.0
    assert not torch.allclose(r_part.x, r_if.x)
    # GIF fits the full gradient change at least as well as the frozen variant on the same selection
    r_frozen = require_converged(generalized_solve(op, g, part, variant="frozen", tol=1e-8, max_iter=2000))
    fit = lambda x: float((op(x) - g).norm())  # noqa: E731
    assert fit(r_part.x) <= fit(r_frozen.x) + 1e-12
    r_proj = require_converged(generalized_solve(op, g, part, variant="projected", tol=1e-10, max_iter=4000))
    # both are iterative solves: they agree to the solvers' tolerance times the conditioning, measured
    # against the solution's size (an element-wise rtol fails on small entries of one BLAS, not another)
    assert float(r_proj.x[~part].abs().max()) == 0.0
    assert torch.allclose(r_proj.x, r_if.x * part, rtol=0, atol=1e-5 * float(r_if.x.norm()))
    # the adjoint form used by per-query scores: qᵀ Pᵀ x(g) = vᵀ g with v = H Pᵀ w, (P H Hᵀ Pᵀ) w = P q
    q = torch.randn(op.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    v, res_adj = adjoint_solve(op, q, part, tol=1e-10, max_iter=3000)
    require_converged(res_adj)
    lhs, rhs = float(q @ r_part.x), float(v @ g)
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs) + 1e-12


def test_plain_if_matches_retraining_on_convex_model(logreg):
    """θ + x ≈ the model retrained without U (sign and scale), over several removals."""
    model = logreg.load_model()
    ds, test = logreg.train_dataset, logreg.test_dataset
    n = len(ds)
    theta0 = FunctionalModel(model).theta().double()
    base = correct_class_margin(predict_logits(model, test.x).double(), test.y)
    rng = np.random.default_rng(0)
    pred_dtheta, true_dtheta, pred_dm, true_dm = [], [], [], []
    for _ in range(5):
        U = rng.choice(n, 8, replace=False)
        rows = retained_sample(n, U, 0)
        op = HessianOperator(model, ds.x[rows], ds.y[rows], weight_decay=logreg.recipe.weight_decay)
        g = removal_target(op, ds.x[U], ds.y[U], n)
        res = require_converged(generalized_solve(op, g, None, variant="if", tol=1e-8, max_iter=500))
        edited = logreg.load_model()
        FunctionalModel(edited).add_(res.x.float())
        retrained = train_model(logreg, indices=rows)
        pred_dtheta.append(res.x.numpy())
        true_dtheta.append((FunctionalModel(retrained).theta().double() - theta0).numpy())
        pred_dm.append((correct_class_margin(predict_logits(edited, test.x).double(), test.y) - base).numpy())
        true_dm.append((correct_class_margin(predict_logits(retrained, test.x).double(), test.y) - base).numpy())
    for a, b in zip(pred_dtheta, true_dtheta):
        assert np.corrcoef(a, b)[0, 1] > 0.9
        assert 0.5 < np.linalg.norm(a) / np.linalg.norm(b) < 2.0  # the scale too, not only the direction
    assert np.corrcoef(np.concatenate(pred_dm), np.concatenate(true_dm))[0, 1] > 0.9
    # and the opposite sign would be badly wrong
    assert np.corrcoef(-np.concatenate(pred_dtheta), np.concatenate(true_dtheta))[0, 1] < -0.9


def _spd(p, cond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    evals = torch.logspace(0, math.log10(cond), p, dtype=torch.float64)
    return (Q * evals) @ Q.T


@pytest.mark.parametrize("method", ["cg", "richardson"])
def test_solver_converges_on_well_conditioned(method):
    A = _spd(30, 10.0)
    b = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = solve_psd(lambda V: V @ A, b, method=method, tol=1e-8, max_iter=2000)
    assert res.converged and res.residual <= 1.5e-8
    x_true = torch.linalg.solve(A, b.T).T
    assert torch.allclose(res.x, x_true, rtol=1e-6, atol=1e-7)
    require_converged(res)  # does not raise


@pytest.mark.parametrize("method", ["cg", "richardson"])
def test_solver_reports_failure_on_ill_conditioned(method):
    A = _spd(60, 1e12)
    b = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = solve_psd(lambda V: V @ A, b, method=method, tol=1e-10, max_iter=40)
    assert not res.converged
    assert res.residual > 1e-10
    # the reported residual is the true one, recomputed from x
    true = float((A @ res.x - b).norm() / b.norm())
    assert abs(true - res.residual) <= 1e-9 + 1e-6 * true
    with pytest.raises(SolverNotConverged) as info:
        require_converged(res)
    assert info.value.result is res and "residual" in str(info.value)


def test_richardson_halves_step_on_divergence():
    A = _spd(20, 100.0)
    b = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # one power-iteration step from a vector orthogonal to the top eigenvectors underestimates λ_max badly
    res = solve_psd(lambda V: V @ A, b, method="richardson", tol=1e-6, max_iter=5000, power_iters=0)
    assert res.converged
    assert res.restarts >= 1 and res.step <= 0.9 * 2 / 100.0 * 1.01


def test_gif_attribution_orientation_matches_loo(logreg):
    """Per-query GIF scores (all rows selected on this one-layer model) predict the margin drop on
    removing each training example, against real leave-one-out retraining."""
    from engine.methods.base import get_method

    cls = get_method("gif")
    assert cls.extension is True and "extension" in cls.description.lower()
    att = cls().fit(logreg, {"ratio": 1.0, "tol": 1e-8, "max_iter": 300, "hvp_examples": 0})
    S = att.scores("test")
    assert S.shape == (len(logreg.test_dataset), len(logreg.train_dataset)) and np.isfinite(S).all()
    test = logreg.test_dataset
    base = correct_class_margin(predict_logits(logreg.load_model(), test.x).double(), test.y).numpy()
    rng = np.random.default_rng(1)
    removed = rng.choice(len(logreg.train_dataset), 8, replace=False)
    pred, true = [], []
    for i in removed:
        keep = np.setdiff1d(np.arange(len(logreg.train_dataset)), [i])
        m = train_model(logreg, indices=keep)
        true.append(correct_class_margin(predict_logits(m, test.x).double(), test.y).numpy() - base)
        pred.append(-S[:, i])  # score > 0: removal lowers the margin
    r = np.corrcoef(np.concatenate(pred), np.concatenate(true))[0, 1]
    assert r > 0.9, r
    # an explicit cap on the number of queries is still honoured
    from engine.core.errors import ProponentError
    with pytest.raises(ProponentError, match="max_queries"):
        cls().fit(logreg, {"max_queries": 3}).scores("test")


def test_gif_defaults_converge_and_chunk_large_query_sets(mlp):
    """With the defaults (automatic damping, no query cap) more queries than one solve block are scored
    block by block, every solve converges, and a query's scores do not depend on its block."""
    from engine.autodiff.curvature import EigenCurvature
    from engine.methods.base import get_method

    att = get_method("gif")().fit(mlp, {"queries_per_solve": 4})
    n_q = 10
    blocks = list(att.score_blocks(np.arange(n_q)))
    assert [(lo, hi) for lo, hi, _ in blocks] == [(0, 4), (4, 8), (8, 10)]
    S = np.concatenate([b for _, _, b in blocks])
    assert att.meta["unconverged_queries"] == [] and att.meta["worst_residual"] <= 1e-3 * 1.5
    # λ is the curvature's own scale: damping_ratio × the mean EK-FAC eigenvalue, not an absolute number
    model = mlp.load_model(mlp.final_checkpoint())
    curv = EigenCurvature(model, att.op.layout, mlp.train_dataset.x, weight_decay=mlp.recipe.weight_decay)
    assert att.meta["damping_used"] == pytest.approx(curv.mean_eigenvalue, rel=1e-6) and att.meta["damping_used"] > 0
    alone = np.concatenate([att.scores([j]) for j in (1, 5, 9)])
    scale = np.abs(S).max()
    assert np.abs(alone - S[[1, 5, 9]]).max() <= 5e-3 * scale


def test_gif_solver_options_give_the_same_scores(mlp):
    """The Jacobi / EK-FAC preconditioners and the EK-FAC warm start change the path, not the answer."""
    from engine.methods.base import get_method

    base = get_method("gif")().fit(mlp, {"tol": 1e-7}).scores(("test", [0, 3]))
    for opts in ({"preconditioner": "diagonal"}, {"preconditioner": "ekfac"}, {"warm_start": "ekfac"}):
        att = get_method("gif")().fit(mlp, {"tol": 1e-7, **opts})
        S = att.scores(("test", [0, 3]))
        assert att.meta["unconverged_queries"] == [], opts
        assert np.abs(S - base).max() <= 1e-4 * np.abs(base).max(), opts


def test_preconditioned_cg_and_warm_start():
    A = _spd(40, 1e4, seed=4)
    b = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    inv = torch.linalg.inv(A)
    plain = solve_psd(lambda V: V @ A, b, tol=1e-8, max_iter=5000)
    exact_pc = solve_psd(lambda V: V @ A, b, tol=1e-8, max_iter=5000, precondition=lambda R: R @ inv)
    assert plain.converged and exact_pc.converged and exact_pc.iterations <= 2 < plain.iterations
    assert torch.allclose(exact_pc.x, plain.x, rtol=1e-5, atol=1e-8)
    started = solve_psd(lambda V: V @ A, b, tol=1e-8, max_iter=5000, x0=b @ inv)
    assert started.converged and started.iterations == 0
    # a masked adjoint solve restricts the preconditioner and the start to each query's selection
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[:, :25] = True
    v, res = adjoint_solve(lambda V: V @ A, b, mask, tol=1e-9, max_iter=5000,
                           precondition=lambda R: R @ inv @ inv, start=lambda R: R @ inv @ inv)
    v0, res0 = adjoint_solve(lambda V: V @ A, b, mask, tol=1e-9, max_iter=5000)
    assert res.converged and res0.converged and torch.allclose(v, v0, rtol=1e-5, atol=1e-7)
    # rowwise: A is applied only to rows still above tolerance; same answer, fewer row products
    seen = {"full": 0, "rows": 0}

    def apply(V, rows=None):
        seen["full" if rows is None else "rows"] += len(V)
        return V @ A

    easy = torch.zeros(2, 40, dtype=torch.float64)
    easy[0] = b[0]
    easy[1] = A[:, 0]  # A e₀: CG converges on it in one step
    r_rows = solve_psd(apply, easy, tol=1e-8, max_iter=5000, rowwise=True)
    n_rows = seen["full"] + seen["rows"]
    r_full = solve_psd(lambda V: V @ A, easy, tol=1e-8, max_iter=5000)
    assert torch.allclose(r_rows.x, r_full.x, rtol=1e-7, atol=1e-9) and seen["rows"] > 0
    assert n_rows < 2 * (r_full.iterations + 1)


def test_gif_attribution_reports_unconverged(mlp):
    from engine.core.errors import ProponentError
    from engine.methods.base import get_method

    cls = get_method("gif")
    with pytest.raises(ProponentError, match="did not converge"):
        cls().fit(mlp, {"tol": 1e-12, "max_iter": 2}).scores(("test", [0, 1]))
    att = cls().fit(mlp, {"tol": 1e-12, "max_iter": 2, "on_unconverged": "report"})
    S = att.scores(("test", [0, 1]))
    assert np.isfinite(S).all() and att.meta["unconverged_queries"] == [0, 1]
