"""Source and EK-FAC influence on one engine: equivalence, sign against leave-one-out
retraining, segments of multi-stage and non-converged training, Fast-Source and Adam."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from engine import Project
from engine.autodiff.compute import BF16_PRODUCTS_ENV
from engine.core.errors import ProponentError
from engine.evaluate.groundtruth import loo_effects
from engine.evaluate.metrics import pearson
from engine.methods.ekfac import EKFAC, EKFACSettings
from engine.methods.source import Source, SourceSettings
from engine.core.train import record_training
from tests.conftest import write_tabular_project


def _loo_corr(S, idx, eff):
    return pearson(S[:, idx].T.ravel(), eff.ravel())


GD = 'optimizer = "sgd"\nlr = 0.5\nmomentum = 0.0\nweight_decay = 0.001\nepochs = 30\nbatch_size = 1000\nseed = 0\n'


def _multistage(root, optimizer="sgd"):
    """Full-batch two-stage training (deterministic, so one LOO seed is exact ground truth):
    pre-train on 36 rows, fine-tune on 24 shifted rows; the test set is shifted too."""
    lr1, lr2 = (0.5, 0.3) if optimizer == "sgd" else (0.05, 0.03)
    tr = (f'optimizer = "{optimizer}"\nlr = {lr1}\nmomentum = 0.0\nweight_decay = 0.001\nepochs = 20\nbatch_size = 1000\n'
          f'seed = 0\n\n[[training.stages]]\nname = "pre"\nepochs = 20\nlr = {lr1}\nselect = "part == pre"\n'
          f'\n[[training.stages]]\nname = "fine"\nepochs = 15\nlr = {lr2}\nselect = "part == fine"\n')
    write_tabular_project(root, n_train=60, n_test=20, training=tr)
    df = pd.read_csv(root / "train.csv")
    df.insert(len(df.columns) - 1, "part", ["pre"] * 36 + ["fine"] * 24)
    df.loc[36:, "f0"] += 1.0
    df.to_csv(root / "train.csv", index=False)
    te = pd.read_csv(root / "test.csv")
    te["f0"] += 1.0
    te.to_csv(root / "test.csv", index=False)
    p = Project.load(root)
    record_training(p)
    return p


@pytest.fixture(scope="module")
def gd_project(tmp_path_factory):
    """Logistic regression trained by 30 full-batch GD steps: far from converged."""
    p = Project.load(write_tabular_project(tmp_path_factory.mktemp("gd") / "gd", n_train=60, training=GD))
    record_training(p)
    return p


@pytest.fixture(scope="module")
def multistage_project(tmp_path_factory):
    return _multistage(tmp_path_factory.mktemp("ms") / "ms")


def test_one_segment_source_is_ekfac_influence(digits_project, logreg_project):
    for p in (digits_project, logreg_project):
        q = ("test", np.arange(min(40, len(p.test_dataset))))
        # classic (final checkpoint) and the default (5 points of the run, one segment)
        for points, last, per_segment in ((1, 1, 0), (5, 0, 5)):
            ek = EKFAC(EKFACSettings(damping=-1.0, trajectory_points=points)).fit(p)
            src = Source(SourceSettings(segments=1, segment_by="count", last_checkpoints=last, response="inverse",
                                        max_checkpoints_per_segment=per_segment)).fit(p)
            np.testing.assert_allclose(src.scores(q), ek.scores(q), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(src.self_scores(), ek.self_scores(), rtol=1e-10, atol=1e-14)
            assert src.meta["damping"] == ek.meta["damping"]


def test_ekfac_scores_equal_the_explicit_formula(logreg_project):
    """S = −(1/N) ∇f_qᵀ (Q diag(σ) Qᵀ + λ)⁻¹ ∇ℓ_i with the fitted basis, built as dense matrices."""
    from engine.autodiff import GradientComputer

    p = logreg_project
    ek = EKFAC(EKFACSettings(trajectory_points=1, gradient_dtype="float32")).fit(p)
    st = ek.seg_state[0]
    Q = torch.kron(st["QA"][0], st["QS"][0])
    sig = st["sigma"][0].T.reshape(-1)
    lam = st["damping"][0]
    H = Q @ torch.diag(sig) @ Q.T + lam * torch.eye(len(sig), dtype=torch.float64)
    comp = GradientComputer(p.load_model(), tracked=ek.param_names)

    def vec(flat):  # layout matrices [out, in] -> column-major vec (Kronecker order)
        return ek.blocks.to_layers(flat.double())[0].transpose(1, 2).reshape(len(flat), -1)

    gq = vec(comp.full(p.test_dataset.x, p.test_dataset.y, "margin"))
    gl = vec(comp.full(p.train_dataset.x, p.train_dataset.y, "loss"))
    expect = -(gq @ torch.linalg.solve(H, gl.T)) / len(gl)
    # training gradients are stored in float32 and the walk runs in float32 (source.WALK_DTYPE), hence the
    # tolerance: relative to each score, and to the scores' scale for the small ones
    got = ek.scores("test")
    np.testing.assert_allclose(got, expect.numpy(), rtol=1e-5, atol=2e-6 * float(expect.abs().max()))
    # the default store keeps them in bfloat16 (8 significant bits): each score within a few of its
    # units in the last place, summed over the row's entries
    bf = EKFAC(EKFACSettings(trajectory_points=1)).fit(p)
    assert bf.settings.gradient_dtype == "bfloat16" and bf.seg_state[0]["gbar"].dtype_name == "bfloat16"
    got_bf = bf.scores("test")
    assert not np.array_equal(got_bf, got)
    np.testing.assert_allclose(got_bf, expect.numpy(), rtol=2e-2, atol=4e-3 * float(expect.abs().max()))


def test_ekfac_sign_agrees_with_leave_one_out_on_convex_model(logreg_project):
    idx = np.arange(0, 80, 5)
    _, eff = loo_effects(logreg_project, idx, seeds=[0])
    S = EKFAC().fit(logreg_project).scores("test")
    r = _loo_corr(S, idx, eff)
    assert r > 0.6, r
    # and the scale approximates the margin drop (the 1/N factor is in)
    ratio = np.abs(S[:, idx]).mean() / np.abs(eff).mean()
    assert 0.5 < ratio < 2.0, ratio


def test_source_tracks_leave_one_out_better_than_ekfac_when_not_converged(gd_project, monkeypatch):
    monkeypatch.setenv(BF16_PRODUCTS_ENV, "0")  # float32 products: the diagonal below to float32 precision
    idx = np.arange(0, 60, 3)
    _, eff = loo_effects(gd_project, idx, seeds=[0])
    src = Source().fit(gd_project)
    assert len(src.segments) == 3 and sum(s.steps for s in src.segments) == 30
    assert src.segments[0].c == pytest.approx(0.5 * 10)
    r_src = _loo_corr(src.scores("test"), idx, eff)
    r_ek = _loo_corr(EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project).scores("test"), idx, eff)
    assert r_src > 0.85, r_src
    assert r_src > r_ek + 0.01, (r_src, r_ek)
    # EK-FAC's default follows the run too, and gains on the final-checkpoint version
    r_traj = _loo_corr(EKFAC().fit(gd_project).scores("test"), idx, eff)
    assert r_traj > r_ek + 0.01, (r_traj, r_ek)
    fast = Source(SourceSettings(fast=True)).fit(gd_project)
    assert _loo_corr(fast.scores("test"), idx, eff) > 0.8
    # self-scores are the diagonal of train-query scores (those are float32 products summed in float64,
    # self-scores float64 dot products of the same float32 vectors)
    block = src.scores(("train", np.arange(10)))
    np.testing.assert_allclose(src.self_scores()[:10], np.diag(block[:, :10]), rtol=1e-6)


def test_multistage_segments_follow_stages_and_track_loo(multistage_project):
    p = multistage_project
    src = Source().fit(p)
    assert [s.stages for s in src.segments] == [["pre"], ["fine"]]
    np.testing.assert_array_equal(src.segments[0].rows, np.arange(36))
    np.testing.assert_array_equal(src.segments[1].rows, np.arange(36, 60))
    assert src.segments[1].steps == 15 and src.segments[1].lr == pytest.approx(0.3)
    assert src.seg_state[1]["gbar"].n_rows == 24  # a pre-train row has no fine-tune gradient
    idx = np.arange(0, 60, 2)
    _, eff = loo_effects(p, idx, seeds=[0])
    r_src = _loo_corr(src.scores("test"), idx, eff)
    r_ek = _loo_corr(EKFAC().fit(p).scores("test"), idx, eff)
    assert r_src > 0.9 and r_src > r_ek + 0.01, (r_src, r_ek)


def test_adam_preconditioning_uses_saved_optimizer_states(tmp_path):
    p = _multistage(tmp_path / "adam", optimizer="adam")
    idx = np.arange(0, 60, 2)
    _, eff = loo_effects(p, idx, seeds=[0])
    pre = Source().fit(p)
    assert pre.meta["adam_preconditioned"] == [True, True]
    plain = Source(SourceSettings(adam_preconditioning=False)).fit(p)
    assert plain.meta["adam_preconditioned"] == [False, False]
    r_pre, r_plain = _loo_corr(pre.scores("test"), idx, eff), _loo_corr(plain.scores("test"), idx, eff)
    assert r_pre > 0.5 and r_pre > r_plain + 0.2, (r_pre, r_plain)


def test_source_refuses_lbfgs_trajectories(logreg_project):
    assert "L-BFGS" in Source.supports(logreg_project)
    with pytest.raises(ProponentError, match="L-BFGS"):
        Source().fit(logreg_project)


def test_multistage_sample_segments_and_schedule(tmp_path):
    """The digits-multistage sample: one segment per stage, rows from the trajectory log, and
    η̄ of the cosine fine-tuning stage integrated from the recipe's schedule."""
    import math

    from engine.methods.source import EngineConfig, plan_segments
    from engine.core.samples import prepare_sample
    from engine.core.train import lr_at

    p = Project.load(prepare_sample("digits-multistage", tmp_path / "ms", train=True, models=1))
    segs = plan_segments(p, EngineConfig())
    assert [s.stages for s in segs] == [["pretrain"], ["finetune"]]
    parts = p.train_df["part"].to_numpy()
    np.testing.assert_array_equal(segs[1].rows, np.flatnonzero(parts == "finetune"))
    fine = p.recipe.stages[1]
    total = math.ceil(len(segs[1].rows) / p.recipe.batch_size) * fine.epochs
    assert segs[1].steps == total
    assert segs[1].lr == pytest.approx(np.mean([lr_at(fine, k / total) for k in range(total)]), rel=1e-9)
    assert segs[1].eta == pytest.approx(segs[1].lr / (1 - p.recipe.momentum))


def test_noisy_sample_flips_labels(tmp_path):
    import json

    from engine.core.samples import prepare_sample

    root = prepare_sample("digits-noisy", tmp_path / "noisy", train=False)
    truth = json.loads((root / "truth.json").read_text())
    p = Project.load(root)
    flipped = [f["train_index"] for f in truth["flipped"]]
    assert len(flipped) == round(0.2 * len(p.train_dataset))
    given = p.train_df["label"].to_numpy()
    assert all(given[f["train_index"]] == f["given_label"] != f["true_label"] for f in truth["flipped"])
    assert p.recipe.epochs == 3


CONV_MODEL = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Unflatten(1, (1, 3, 3)), nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(),
                         nn.LayerNorm(8), nn.Linear(8, num_classes))
'''


def test_ekfac_on_conv_model_equals_block_diagonal_formula(tmp_path):
    """Conv2d + Linear (+ a LayerNorm that is left out and reported): the engine's scores equal
    −(1/N) ∇f_qᵀ blockdiag(Q_l diag(σ_l + λ_l) Q_lᵀ)⁻¹ ∇ℓ_i over the covered parameters."""
    from engine.autodiff import GradientComputer

    root = write_tabular_project(tmp_path / "conv", n_train=50, n_test=10, d=9, model=CONV_MODEL,
                                 training=GD.replace("epochs = 30", "epochs = 5"))
    p = Project.load(root)
    record_training(p)
    ek = EKFAC(EKFACSettings(trajectory_points=1, gradient_dtype="float32")).fit(p)
    assert ek.meta["layers"] == ["1", "5"]
    assert set(ek.meta["left_out"]) == {"4.weight", "4.bias"}
    st = ek.seg_state[0]
    comp = GradientComputer(p.load_model(), tracked=ek.param_names)

    def vec(flat):
        return torch.cat([m.transpose(1, 2).reshape(len(flat), -1) for m in ek.blocks.to_layers(flat.double())], 1)

    blocks = []
    for QA, QS, sig, lam in zip(st["QA"], st["QS"], st["sigma"], st["damping"]):
        Q = torch.kron(QA, QS)
        blocks.append(Q @ torch.diag(sig.T.reshape(-1) + lam) @ Q.T)
    H = torch.block_diag(*blocks)
    gq = vec(comp.full(p.test_dataset.x, p.test_dataset.y, "margin"))
    gl = vec(comp.full(p.train_dataset.x, p.train_dataset.y, "loss"))
    expect = -(gq @ torch.linalg.solve(H, gl.T)) / len(gl)
    # float32 storage and walk (source.WALK_DTYPE): relative to each score, and to their scale for small ones
    np.testing.assert_allclose(ek.scores("test"), expect.numpy(), rtol=1e-5, atol=2e-6 * float(expect.abs().max()))
    src = Source().fit(p)  # the unrolled path runs on the same layers
    assert src.scores("test").shape == (10, 50) and np.isfinite(src.self_scores()).all()


def test_self_influence_walks_training_rows_in_byte_bounded_blocks(logreg_project, monkeypatch):
    """Self-influence walks every training gradient through the curvature (WALK_DTYPE) on the host;
    the rows per walk are bounded by bytes (on a GPU one batch was all 5,000 rows: 21 GB of RSS)."""
    from engine.methods import source as source_module

    ek = EKFAC(EKFACSettings(trajectory_points=1, gradient_dtype="float32")).fit(logreg_project)
    want = ek.self_scores()
    p = ek.query_computer.n_params
    item = torch.empty((), dtype=source_module.WALK_DTYPE).element_size()
    monkeypatch.setattr(source_module, "WALK_BLOCK_BYTES", item * p * 7)  # seven rows per walk
    sizes = []
    real = ek._walk

    def recording(flat):
        sizes.append(len(flat))
        return real(flat)

    monkeypatch.setattr(ek, "_walk", recording)
    assert ek.meta["self_influence_rows_in_fit"] == len(logreg_project.train_dataset)  # the fit's pass had them
    ek._self, ek._fused_self = None, None  # as after a fit that reused another run's store: walked here
    got = ek.self_scores()
    assert max(sizes) == 7 and sum(sizes) == len(logreg_project.train_dataset)
    assert ek.meta["self_influence_rows_in_fit"] == 0
    # the walk against the fit's one-rotation form (float32 either way; a bfloat16 store's walk reads rounded
    # gradients where the fit's pass had them unrounded)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


def test_self_influence_from_the_fit_pass_is_the_diagonal_of_the_scores(gd_project, multistage_project, tmp_path,
                                                                        monkeypatch):
    """Where the query's walk is one step (one segment) and a trajectory point is the query checkpoint,
    the fit's training-gradient pass yields the self-scores too (its loss gradients come as −(1 − p)∇f):
    one rotation per row with one point and no projection, the walk otherwise, Adam's √P included.
    Each equals the diagonal of the scores with the training rows as queries; Source with two
    segments has them walked afterwards."""
    monkeypatch.setenv(BF16_PRODUCTS_ENV, "0")  # float32 products (bfloat16 ones: test_bfloat16_products_…)
    adam = write_tabular_project(tmp_path / "adam", n_train=60,
                                 training=GD.replace('"sgd"', '"adam"').replace("lr = 0.5", "lr = 0.05"))
    adam = Project.load(adam)
    record_training(adam)
    p_covered = EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project).blocks.layout.n
    # (project, method, training rows whose self-influence the fit's pass computes)
    # the default bfloat16 store: the walked forms dot the gradients rounded as stored, so they equal the
    # diagonal; the one-rotation form (one point, unprojected) dots the unrounded ones, so it equals the
    # diagonal of a float32 store and is within bfloat16's rounding of a bfloat16 store's (the last case)
    cases = [(gd_project, EKFAC(EKFACSettings(trajectory_points=1, gradient_dtype="float32")), 60),
             (gd_project, EKFAC(EKFACSettings(trajectory_points=3)), 60),
             (gd_project, EKFAC(EKFACSettings(trajectory_points=1, proj_dim=8)), 60),
             # a real projection as wide as the gradient is not the identity: no one-rotation shortcut
             (gd_project, EKFAC(EKFACSettings(trajectory_points=1, projection="rademacher", proj_dim=p_covered)), 60),
             (gd_project, Source(SourceSettings(segments=1)), 60),
             (adam, Source(SourceSettings(segments=1)), 60),
             # one segment over the fine-tuning stage: its 24 rows (not 0…23) in the pass, the other 36 have no term
             (multistage_project, Source(SourceSettings(segments=1, segment_by="count", last_checkpoints=3)), 24),
             (multistage_project, Source(), 0),
             (gd_project, EKFAC(EKFACSettings(trajectory_points=1)), 60)]
    for i, (p, att, in_fit) in enumerate(cases):
        att.fit(p)
        n = len(p.train_dataset)
        got = att.self_scores()
        assert att.meta["self_influence_rows_in_fit"] == in_fit, type(att).__name__
        diag = np.diag(att.scores(("train", np.arange(n))))
        assert np.abs(diag).max() > 0
        rtol = 1e-5 if i < len(cases) - 1 else 1e-2
        np.testing.assert_allclose(got, diag, rtol=rtol, atol=rtol / 10 * float(np.abs(diag).max()))
    assert not np.allclose(cases[-1][1].self_scores(), np.diag(cases[-1][1].scores(("train", np.arange(60)))),
                           rtol=1e-6, atol=0)  # really the unrounded gradients there
    assert cases[5][1].meta["adam_preconditioned"] == [True]  # √P on both sides of the one-segment walk
    assert cases[2][1].projector.out_dim == 8 and cases[3][1].projector.out_dim == p_covered
    assert cases[3][1].meta["projection"]["kind"] != "none"
    stage = cases[6][1]
    assert 0 < len(stage.seg_state[0]["rows"]) == 24 and not np.array_equal(stage.seg_state[0]["rows"], np.arange(24))


def test_loss_gradient_from_the_margin_keeps_its_precision_when_confident():
    """GradientComputer.margin_and_loss_scale: the loss gradient is exactly −(1 − p_y)·∇f, with 1 − p_y
    from the margin. Where p_y rounds to 1 in float32 the direct loss gradient loses its y entry (and can
    point elsewhere); this form matches a float64 reference."""
    from engine.autodiff import GradientComputer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = 3 * torch.randn(8, 4)
    with torch.no_grad():
        model[2].weight.mul_(60.0)  # confident rows: 1 − p_y far below float32's resolution near 1
        y = model(x).argmax(1)
    comp = GradientComputer(model)
    m, s = comp.margin_and_loss_scale(x, y)
    np.testing.assert_allclose(m.numpy(), comp.per_example(x, y, "margin").numpy(), rtol=1e-6, atol=1e-7)
    # reference: float64 backward of the exact logit gradient, whose y entry is −Σ_{j≠y} p_j (p − e_y formed
    # directly cancels even in float64)
    m64 = copy.deepcopy(model).double()
    ref = []
    for i in range(len(x)):
        logits = m64(x[i:i + 1].double())
        p = torch.softmax(logits.detach(), -1)
        others = p.scatter(1, y[i:i + 1, None], 0.0)
        cot = others.scatter(1, y[i:i + 1, None], -others.sum(1, keepdim=True))
        ref.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(logits, list(m64.parameters()), cot)]))
    ref = torch.stack(ref)
    q = torch.softmax(m64(x.double()).detach(), -1).scatter(1, y[:, None], 0.0).sum(1)
    np.testing.assert_allclose(s.double().numpy(), q.numpy(), rtol=1e-5)
    assert int((q < 1e-8).sum()) >= 3  # the case float32 cannot see

    def rel(g):
        return float(((g.double() - ref).norm(dim=1) / ref.norm(dim=1)).max())

    assert rel(-(s[:, None] * m)) < 1e-5
    assert rel(comp.per_example(x, y, "loss")) > 1e-2  # what it replaces


def test_float32_walk_agrees_with_float64_and_scores_in_few_store_passes(gd_project, monkeypatch):
    """The walk runs in float32 (WALK_DTYPE): against the same walk in float64 the scores agree to
    float32 precision with the same rankings, for EK-FAC (one segment) and Source (three segments,
    propagation between them). Walked query blocks are gathered into as few passes over the stored
    training gradients as SCORE_PASS_BYTES allows; the S ≡ 1 shortcut equals the full walk."""
    from engine.methods import source as source_module

    def run(att, queries):
        for st in att.seg_state:
            st.pop("walk", None)  # the cached factors follow WALK_DTYPE
        att._self = None
        return att.scores(queries), att.self_scores()

    monkeypatch.setenv(BF16_PRODUCTS_ENV, "0")  # float32 products (bfloat16 ones: test_bfloat16_products_…)
    q = ("test", np.arange(len(gd_project.test_dataset)))
    for att in (EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project), Source().fit(gd_project),
                Source(SourceSettings(segments=2, response="inverse")).fit(gd_project)):
        S32, s32 = run(att, q)
        monkeypatch.setattr(source_module, "WALK_DTYPE", torch.float64)
        S64, s64 = run(att, q)
        monkeypatch.setattr(source_module, "WALK_DTYPE", torch.float32)
        np.testing.assert_allclose(S32, S64, rtol=1e-4, atol=1e-6 * np.abs(S64).max())
        np.testing.assert_allclose(s32, s64, rtol=1e-4, atol=1e-6 * np.abs(s64).max())
        assert (np.argsort(-S32, 1)[:, :5] == np.argsort(-S64, 1)[:, :5]).all()
        # how often the store is read: once per gathered pass
        reads = []
        for st in att.seg_state:  # a bfloat16 store (the default), read as its bits and widened part by part
            real = st["gbar"].iter_bfloat16
            monkeypatch.setattr(st["gbar"], "iter_bfloat16", lambda *a, real=real, **k: reads.append(1) or real(*a, **k))
        monkeypatch.setattr(source_module, "WALK_BLOCK_BYTES", 4 * att.query_computer.n_params * 3)  # 3 rows a walk
        np.testing.assert_allclose(att.scores(q), S32, rtol=1e-6, atol=1e-7 * np.abs(S32).max())
        assert len(reads) == len(att.seg_state)  # every block gathered into one pass
        reads.clear()
        width = att.projector.out_dim * len(att.seg_state) * 4
        monkeypatch.setattr(source_module, "SCORE_PASS_BYTES", width * 7)  # at most 7 queries per pass
        np.testing.assert_allclose(att.scores(q), S32, rtol=1e-6, atol=1e-7 * np.abs(S32).max())
        assert len(reads) == len(att.seg_state) * -(-len(q[1]) // 6)  # 3-row blocks, two to a pass
        monkeypatch.undo()
        monkeypatch.setenv(BF16_PRODUCTS_ENV, "0")
        if len(att.seg_state) > 1 and att.cfg.response == "inverse":
            for st in att.seg_state:
                assert att._walk_factors(st)["S_one"]
                st["walk"]["S_one"] = False  # the full walk: Q_S (1 ⊙ Q_Sᵀ v Q_A) Q_Aᵀ
            np.testing.assert_allclose(att.scores(q), S32, rtol=1e-5, atol=1e-6 * np.abs(S32).max())


def test_score_columns_walk_every_query_then_read_each_store_once(gd_project, multistage_project, monkeypatch):
    """cached_scores' path: all queries walked first, then column blocks from one pass over each segment's
    store, equal to the query blocks' scores; query blocks where the walked queries would pass
    SCORE_PASS_BYTES or where segments store different rows (a multi-stage run)."""
    from engine.methods import source as source_module

    n_q, n = len(gd_project.test_dataset), len(gd_project.train_dataset)
    q = ("test", np.arange(n_q))
    # float32 products, and bfloat16 ones straight from the stored bits ("1" forces them on any CPU)
    for bf16, att in (("0", EKFAC(EKFACSettings(trajectory_points=3))), ("0", Source()),
                      ("1", EKFAC(EKFACSettings(trajectory_points=3))), ("1", Source())):
        monkeypatch.setenv(BF16_PRODUCTS_ENV, bf16)
        att.fit(gd_project)
        assert att.bf16_products == (bf16 == "1")
        expect = att.scores(q)
        reads = []
        # a bfloat16 store (the default) is read as its bits either way: float32 products widen each part
        # into one reused float32 buffer
        assert {st["gbar"].dtype_name for st in att.seg_state} == {"bfloat16"}
        reader = "iter_bfloat16"
        for st in att.seg_state:
            real = getattr(st["gbar"], reader)
            monkeypatch.setattr(st["gbar"], reader, lambda *a, real=real, **k: reads.append(1) or real(*a, **k))
        width = att.projector.out_dim
        # parts of 7 training rows
        monkeypatch.setattr(source_module, "SCORE_READ_BYTES", (2 if att.bf16_products else 4) * width * 7)
        got, bounds, stages = np.full((n_q, n), np.nan), [], []
        att.progress = lambda stage, done, total: stages.append((stage, done, total))
        columns = att.score_columns("test")
        # the queries' walk is its own progress stage, finished before the store is read
        assert stages and {s for s, _, _ in stages} == {"score: test queries walked"} and stages[-1][1:] == (n_q, n_q)
        for lo, hi, block in columns:
            assert block.shape == (n_q, hi - lo)
            got[:, lo:hi] = block
            bounds.append((lo, hi))
        assert bounds == [(lo, min(n, lo + 7)) for lo in range(0, n, 7)]
        assert len(reads) == len(att.seg_state)  # one pass over each store for every query
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7 * np.abs(expect).max())
        item = 2 if att.bf16_products else 4
        monkeypatch.setattr(source_module, "SCORE_PASS_BYTES", item * width * len(att.seg_state) * (n_q - 1))
        assert att.score_columns("test") is None  # one query too many for a pass: query blocks
        monkeypatch.undo()
    ms = Source().fit(multistage_project)
    assert len(ms.seg_state) == 2 and ms.score_columns("test") is None


def test_bfloat16_products_agree_with_float32_within_its_rounding(gd_project, monkeypatch):
    """With a bfloat16 store (the default) on a CPU that multiplies bfloat16 fast, the walked queries
    times the store run in bfloat16: the stored bits as they are (no float32 copy of the store), each
    score rounded to bfloat16's 8 significant bits. Against float32 products of the same store every
    score is within about that rounding and the rankings hold; a float32 store keeps float32 products.
    Against a float32 store, as the largest |difference| over the largest |score|: the bfloat16 store
    alone 1.8e-3 (EK-FAC, 3 points) and 1.2e-3 (Source, 3 segments), with bfloat16 products 2.6e-3 and 2.3e-3."""
    from engine.storage.arrays import ChunkedArray

    from engine.methods import source as source_module

    q = ("test", np.arange(len(gd_project.test_dataset)))
    got = {}
    monkeypatch.setattr(source_module, "BF16_SELF_WALK_MIN_PARAMS", 0)  # a model this small keeps float32 otherwise
    for forced in ("1", "0"):
        monkeypatch.setenv(BF16_PRODUCTS_ENV, forced)
        for name, att in (("ekfac", EKFAC(EKFACSettings(trajectory_points=3))), ("source", Source()),
                          ("ekfac 1 point", EKFAC(EKFACSettings(trajectory_points=1)))):
            att.fit(gd_project)
            got[name, forced] = att, att.scores(q)
    # the fit's self-influence walk (one segment: EK-FAC) runs in bfloat16 too; Source's is walked later, in float32
    for name, walk in (("ekfac", "bfloat16"), ("ekfac 1 point", "bfloat16"), ("source", "float32")):
        bf, f32 = got[name, "1"][0], got[name, "0"][0]
        assert bf.meta["self_influence_walk"] == walk and f32.meta["self_influence_walk"] == "float32"
        s_bf, s32 = bf.self_scores(), f32.self_scores()
        err = np.abs(s_bf - s32).max() / np.abs(s32).max()
        # (on the 5,000-image benchmark CNN, 94,762 parameters: 4e-4 walked; the roundings average over its entries)
        assert (0 < err < (3e-3 if name == "ekfac" else 1.2e-2)) if walk == "bfloat16" else err == 0
        assert (np.argsort(s_bf)[:5] == np.argsort(s32)[:5]).all()  # the same most negative rows
    reads = []
    real = ChunkedArray.iter_bfloat16
    monkeypatch.setattr(ChunkedArray, "iter_bfloat16", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))
    for name in ("ekfac", "source", "ekfac 1 point"):
        bf, S_bf = got[name, "1"]
        f32, S = got[name, "0"]
        assert bf.meta["score_products"] == "bfloat16" and f32.meta["score_products"] == "float32"
        scale = np.abs(S).max()
        assert 0 < np.abs(S_bf - S).max() < 4e-3 * scale
        assert (np.argsort(-S_bf, 1)[:, :3] == np.argsort(-S, 1)[:, :3]).mean() >= 0.9
        if len(bf.seg_state) == 1:  # one segment, one product per score: each is a bfloat16 value
            rounded = torch.from_numpy(S_bf).to(torch.bfloat16).double().numpy()
            np.testing.assert_array_equal(S_bf, rounded)
        reads.clear()
        np.testing.assert_array_equal(bf.scores(q), S_bf)  # the same again, read straight from the bits
        assert len(reads) == len(bf.seg_state)
    monkeypatch.setenv(BF16_PRODUCTS_ENV, "1")
    f32_store = EKFAC(EKFACSettings(trajectory_points=1, gradient_dtype="float32")).fit(gd_project)
    assert f32_store.meta["score_products"] == "float32" and f32_store.meta["self_influence_walk"] == "float32"
    monkeypatch.undo()
    monkeypatch.setenv(BF16_PRODUCTS_ENV, "1")
    small = EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project)  # below BF16_SELF_WALK_MIN_PARAMS
    assert small.meta["score_products"] == "bfloat16" and small.meta["self_influence_walk"] == "float32"


def test_training_gradients_are_written_in_parts_and_a_stopped_chunk_is_rewritten(gd_project, tmp_path, monkeypatch):
    """The training-gradient pass holds a part of a store chunk (GRADIENT_PART_BYTES), not the chunk;
    a chunk counts as done only once every part is on disk, so a fit stopped inside a chunk rewrites
    all of it on the next run, and the scores equal an uninterrupted fit's."""
    from engine.methods import source as source_module
    from engine.storage.arrays import ChunkedArray

    f32 = EKFACSettings(trajectory_points=1, gradient_dtype="float32")  # self-influence compared below: see above
    ref = EKFAC(f32).fit(gd_project)
    want, width = ref.scores("test"), ref.projector.out_dim
    monkeypatch.setattr(source_module, "GRADIENT_BLOCK_ROWS", 32)  # two chunks of the 60 rows
    monkeypatch.setattr(source_module, "GRADIENT_PART_MIN_ROWS", 1)
    monkeypatch.setattr(source_module, "GRADIENT_PART_BYTES", 4 * width * 10)  # ten rows a part
    parts, real, writers = [], ChunkedArray.write_rows, set()

    def failing(self, c, start, block):
        parts.append((c, start, len(block)))
        writers.add(threading.current_thread().name)  # off the gradient pass's thread (BackgroundWriter)
        if len(parts) == 5:  # chunk 1's second part: chunk 0 is done, chunk 1 half-written
            raise KeyboardInterrupt
        return real(self, c, start, block)

    monkeypatch.setattr(ChunkedArray, "write_rows", failing)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        EKFAC(f32, workdir=work).fit(gd_project)
    assert parts == [(0, 0, 10), (0, 10, 10), (0, 20, 10), (0, 30, 2), (1, 0, 10)]
    assert writers == {"proponent-store-writer"}
    assert (next(work.glob("grads_*")) / "done.bin").read_bytes() == b"\x01\x00"  # chunk 1 not done
    parts.clear()
    ek = EKFAC(f32, workdir=work).fit(gd_project)
    assert parts == [(1, 0, 10), (1, 10, 10), (1, 20, 8)]  # chunk 0 kept, chunk 1 written again whole
    # float32 gradients in other batch shapes: summation order only
    np.testing.assert_allclose(ek.scores("test"), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # self-influence: chunk 1's rows from the resumed pass, chunk 0's (written before the stop) walked,
    # their inputs gathered a few rows at a time
    monkeypatch.setattr(source_module, "SELF_ROWS_PER_READ", 5)
    want_self = ref.self_scores()
    np.testing.assert_allclose(ek.self_scores(), want_self, rtol=1e-5, atol=1e-6 * np.abs(want_self).max())
    assert ek.meta["self_influence_rows_in_fit"] == 28 and ref.meta["self_influence_rows_in_fit"] == 60


def test_a_store_write_that_fails_in_the_background_is_one_line_and_the_rerun_resumes(gd_project, tmp_path,
                                                                                    monkeypatch, capsys):
    """The training-gradient store is written on a background thread. A write the filesystem refuses
    there (a quota, a full disk where the space reservation is emulated) still ends the command in one
    line naming the file (exit 2, no traceback), the chunk it hit is not marked done, and a rerun
    writes only that chunk and scores as an uninterrupted run."""
    import errno
    import os
    import shutil

    from engine.cli import main
    from engine.methods import source as source_module
    from engine.storage.arrays import ChunkedArray

    proj = tmp_path / "gd"
    shutil.copytree(gd_project.root, proj, ignore=shutil.ignore_patterns(".proponent"))
    monkeypatch.setattr(source_module, "GRADIENT_BLOCK_ROWS", 32)  # two chunks of the 60 rows
    args = ["attribute", str(proj), "--method", "ekfac", "--set", "trajectory_points=1"]
    real, big = os.pwrite, []

    def refusing(fd, view, offset):
        if len(view) >= 28 * 4:  # a part of training gradients (not a done mark)
            big.append(offset)
            if len(big) == 2:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quota" in err[0].lower() and "data.npy" in err[0] and "Traceback" not in err[0], err
    store = next((proj / ".proponent").rglob("grads_*"))
    assert (store / "done.bin").read_bytes() == b"\x01\x00"  # chunk 0 on disk and done; chunk 1 not
    monkeypatch.setattr(os, "pwrite", real)
    written = []
    monkeypatch.setattr(ChunkedArray, "write_bfloat16_rows",
                        lambda self, c, *a, real=ChunkedArray.write_bfloat16_rows: written.append(c) or real(self, c, *a))
    assert main(args) == 0
    assert written == [1]  # resumed: only the chunk that failed
    from engine import Project
    from engine.api import cached_scores

    resumed = cached_scores(Project.load(proj), "ekfac", {"trajectory_points": 1}, device="cpu")["scores"]
    clean = EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project).scores("test")
    np.testing.assert_array_equal(np.asarray(resumed), clean)


def test_fisher_is_exact_on_small_sets_and_sampled_above(gd_project, monkeypatch):
    """fisher_samples=-1 (the default): the exact expectation over classes up to FISHER_EXACT_MAX_ROWS
    training rows, one sampled label per example above (as kronfluence); the run says which, and a
    given value is used as is. The factor cache keys on the resolved count, so a cached exact fit is
    not reused for a sampled one."""
    from engine.autodiff import curvature as cv

    assert cv.fisher_samples_for(-1, 1024, 10) == 0 and cv.fisher_samples_for(-1, 1025, 10) == 1
    assert cv.fisher_samples_for(-1, 100, 17) == 1 and cv.fisher_samples_for(3, 10**6, 100) == 3
    exact = EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project)
    assert exact.meta["fisher_samples_used"] == [0]
    monkeypatch.setattr(cv, "FISHER_EXACT_MAX_ROWS", 10)  # the 60-row project is now "large"
    sampled = EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project)
    assert sampled.meta["fisher_samples_used"] == [1]
    one = EKFAC(EKFACSettings(trajectory_points=1, fisher_samples=1)).fit(gd_project)
    np.testing.assert_array_equal(sampled.scores("test"), one.scores("test"))
    assert not np.allclose(sampled.scores("test"), exact.scores("test"), rtol=1e-6, atol=0)


BN_MLP = '''from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 12, bias=False), nn.BatchNorm1d(12), nn.ReLU(),
                         nn.Linear(12, num_classes))
'''


def _bn_project(root, weight_decay: float) -> Project:
    """The BN_MLP trained 4 epochs of SGD with momentum (its first Linear feeds BatchNorm)."""
    write_tabular_project(root, n_train=60, n_test=12, model=BN_MLP,
                          training=f'optimizer = "sgd"\nlr = 0.05\nmomentum = 0.9\nweight_decay = {weight_decay}\n'
                                   'epochs = 4\nbatch_size = 16\nseed = 0\n')
    record_training(Project.load(root))
    return Project.load(root)


def test_weight_decay_is_left_out_of_normalized_layers_curvature(tmp_path):
    """σ = Λ + weight decay on every layer except those the model normalises (here the Linear before
    BatchNorm): there σ = Λ, unless weight_decay_on_normalized asks for the old rule."""
    p = _bn_project(tmp_path / "bn", weight_decay=0.01)
    new = EKFAC(EKFACSettings(trajectory_points=1)).fit(p)
    old = EKFAC(EKFACSettings(trajectory_points=1, weight_decay_on_normalized=True)).fit(p)
    assert new.meta["layers"] == ["0", "3"] and new.meta["weight_decay_skipped"] == ["0"]
    assert old.meta["weight_decay_skipped"] == []
    s_new, s_old = new.seg_state[0]["sigma"], old.seg_state[0]["sigma"]
    torch.testing.assert_close(s_old[0] - s_new[0], torch.full_like(s_new[0], 0.01), rtol=0, atol=1e-12)
    torch.testing.assert_close(s_old[1], s_new[1], rtol=0, atol=0)
    assert not np.allclose(new.scores("test"), old.scores("test"))


def test_ekfac_damping_floor_follows_the_training_time(gd_project, logreg_project, tmp_path, monkeypatch):
    """EK-FAC's default λ per layer is max(damping_ratio × mean σ, damping_scale / τ), τ the run's
    training time, except on layers the model normalises (the ratio, shrunk above normalized_damping_rows
    fitted rows); no floor where τ is unknown (L-BFGS, final weights only), nothing but the ratio where
    damping_rule is 'ratio'."""
    from engine.methods import source as source_module
    from engine.methods.schedule import training_time

    def ratio_of(att):
        return [0.1 * float(s.mean()) for s in att.seg_state[0]["sigma"]]

    tau = training_time(gd_project, gd_project.final_checkpoints()[0])
    assert tau == pytest.approx(15.0)
    for scale in (0.3, 30.0):
        att = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=scale)).fit(gd_project)
        rule = att.meta["damping_rule"][0]
        assert rule["rule"] == "training time" and rule["tau"] == pytest.approx(tau)
        assert rule["floor"] == pytest.approx(scale / tau)
        assert att.meta["damping"][0] == pytest.approx([max(r, scale / tau) for r in ratio_of(att)], rel=1e-12)
    assert rule["floored"] == att.meta["layers"]  # at 30 / τ every layer is raised
    # the floor is the λ of F = 1/(σ + λ): with every layer floored the scores equal a given damping's
    given = EKFAC(EKFACSettings(trajectory_points=1, damping=30.0 / tau)).fit(gd_project)
    assert given.meta["damping_rule"] == [{"rule": "given"}]
    np.testing.assert_allclose(att.scores("test"), given.scores("test"), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(att.self_scores(), given.self_scores(), rtol=1e-6, atol=1e-12)
    ratio = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=30.0, damping_rule="ratio")).fit(gd_project)
    assert ratio.meta["damping_rule"] == [{"rule": "ratio"}]
    assert ratio.meta["damping"][0] == pytest.approx(ratio_of(ratio), rel=1e-12)
    assert not np.allclose(att.scores("test"), ratio.scores("test"), rtol=1e-3)
    # Source's inverse response takes the same rule, and its settings can ask for the ratio alone
    src = Source(SourceSettings(segments=1, segment_by="count", last_checkpoints=1, response="inverse",
                                damping_scale=30.0)).fit(gd_project)
    assert src.meta["damping_rule"][0]["floor"] == pytest.approx(30.0 / tau)
    np.testing.assert_allclose(src.scores("test"), att.scores("test"), rtol=1e-10, atol=1e-14)
    src_ratio = Source(SourceSettings(segments=1, segment_by="count", last_checkpoints=1, response="inverse",
                                      damping_scale=30.0, damping_rule="ratio")).fit(gd_project)
    assert src_ratio.meta["damping_rule"] == [{"rule": "ratio"}]
    np.testing.assert_allclose(src_ratio.scores("test"), ratio.scores("test"), rtol=1e-10, atol=1e-14)
    lb = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=30.0)).fit(logreg_project)  # L-BFGS: no τ
    assert lb.meta["damping_rule"] == [{"rule": "ratio"}] and lb.meta["damping"][0] == pytest.approx(ratio_of(lb))

    # a Linear before BatchNorm keeps the ratio (also without weight decay); the last layer is floored
    p = _bn_project(tmp_path / "bn", weight_decay=0.0)
    bn = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=1e3)).fit(p)
    floor = 1e3 / training_time(p, p.final_checkpoints()[0])
    assert bn.meta["layers"] == ["0", "3"] and bn.meta["damping_rule"][0]["floored"] == ["3"]
    assert bn.meta["damping"][0] == pytest.approx([ratio_of(bn)[0], floor], rel=1e-12)
    assert "normalized_shrink" not in bn.meta["damping_rule"][0]  # 60 rows: below the default's row count
    # above normalized_damping_rows fitted rows the normalised layer's ratio falls as (rows / n)²; the floor stays
    for rows, shrink in ((15, 0.0625), (30, 0.25), (60, 1.0), (600, 1.0)):
        att = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=1e3, normalized_damping_rows=rows)).fit(p)
        assert att.meta["damping"][0] == pytest.approx([ratio_of(att)[0] * shrink, floor], rel=1e-12)
        assert att.meta["damping_rule"][0].get("normalized_shrink", 1.0) == pytest.approx(shrink)
    off = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=1e3, normalized_damping_rows=0)).fit(p)
    assert off.meta["damping"][0] == pytest.approx([ratio_of(off)[0], floor], rel=1e-12)
    # where τ is unknown (final weights only, L-BFGS) there is no floor, but the normalised layer's shrink stays
    monkeypatch.setattr(source_module, "training_time", lambda *a, **k: None)
    for rows, shrink in ((30, 0.25), (60, 1.0)):
        att = EKFAC(EKFACSettings(trajectory_points=1, damping_scale=1e3, normalized_damping_rows=rows)).fit(p)
        assert att.meta["damping"][0] == pytest.approx([ratio_of(att)[0] * shrink, ratio_of(att)[1]], rel=1e-12)
        assert att.meta["damping_rule"] == [{"rule": "ratio", **({"normalized_shrink": shrink} if shrink < 1 else {})}]
    ratio_only = EKFAC(EKFACSettings(trajectory_points=1, normalized_damping_rows=30, damping_rule="ratio")).fit(p)
    assert ratio_only.meta["damping"][0] == pytest.approx(ratio_of(ratio_only), rel=1e-12)


def test_a_damping_only_version_reuses_the_training_gradient_stores(gd_project, tmp_path, monkeypatch):
    """gradients_version, not the version, keys the shared training-gradient stores: a version that changed
    only the curvature side (EK-FAC v9's damping) reads the stores an earlier one wrote; one whose gradients
    changed computes its own."""
    n = len(gd_project.train_dataset)

    def fit():
        att = EKFAC(EKFACSettings(trajectory_points=1), store_dir=tmp_path / "stores").fit(gd_project)
        att.self_scores()  # rows the fit's gradient pass did not compute are walked here, and counted
        return att

    first = fit()
    assert first.meta["self_influence_rows_in_fit"] == n  # it computed the training gradients
    monkeypatch.setattr(EKFAC, "version", "999")
    again = fit()
    assert again.meta["self_influence_rows_in_fit"] == 0  # it read the store
    np.testing.assert_array_equal(again.scores("test"), first.scores("test"))
    # the store's dtype keys it too: float32 gradients are not read from a bfloat16 store (nor the reverse)
    f32 = EKFAC(EKFACSettings(trajectory_points=1, gradient_dtype="float32"), store_dir=tmp_path / "stores").fit(gd_project)
    f32.self_scores()
    assert f32.meta["self_influence_rows_in_fit"] == n and f32.seg_state[0]["gbar"].dtype_name == "float32"
    assert len(list((tmp_path / "stores").glob("grads_*"))) == 2
    assert fit().meta["self_influence_rows_in_fit"] == 0  # the bfloat16 store is still there, untouched
    monkeypatch.setattr(EKFAC, "gradients_version", "999")
    assert fit().meta["self_influence_rows_in_fit"] == n


def test_point_shares_split_the_rows_over_trajectory_points(monkeypatch):
    from engine.methods import source
    from engine.methods.source import point_shares

    rows = np.arange(1000)
    assert all(s is rows for s in point_shares(rows, 5, -1, seed=3))  # below the floor: every row
    big = np.arange(6000)
    floor = point_shares(big, 8, -1, seed=3)  # an even share (750) would be under the floor
    assert [len(s) for s in floor] == [1024] * 8
    np.testing.assert_array_equal(np.unique(np.concatenate(floor)), big)
    assert [len(s) for s in point_shares(big, 5, -1, seed=3)] == [1200] * 5
    monkeypatch.setattr(source, "POINT_ROWS_FLOOR", 1)
    rows = np.arange(100, 203)  # 103 rows, not a multiple of the points
    even = point_shares(rows, 5, -1, seed=3)
    assert [len(s) for s in even] == [21, 21, 21, 20, 20]
    np.testing.assert_array_equal(np.sort(np.concatenate(even)), rows)  # each row exactly once
    assert all((np.diff(s) > 0).all() for s in even)  # sorted, as the factor cache keys them
    assert not np.array_equal(even[0], rows[:21])  # a seeded permutation, not the first rows
    for a, b in zip(even, point_shares(rows, 5, -1, seed=3)):
        np.testing.assert_array_equal(a, b)
    fixed = point_shares(rows, 5, 40, seed=3)
    assert [len(s) for s in fixed] == [40] * 5 and all(len(np.unique(s)) == 40 for s in fixed)
    np.testing.assert_array_equal(np.unique(np.concatenate(fixed)), rows)  # windows cover every row
    assert [len(s) for s in point_shares(rows, 5, 7, seed=3)] == [21, 21, 21, 20, 20]  # at least an even share
    for every in (point_shares(rows, 5, 0, seed=3), point_shares(rows, 5, 500, seed=3), point_shares(rows, 1, -1, 3)):
        assert all(s is rows for s in every)


def test_trajectory_points_fit_their_factors_on_their_own_rows(gd_project, monkeypatch):
    """EK-FAC's default (5 trajectory points): each point's covariances and eigenvalues come from its
    share of the rows (the shares add up to the training set once), not from every row at every
    point; point_rows=0 is the old rule. Both follow leave-one-out retraining equally."""
    from engine.autodiff import curvature as cv
    from engine.methods import source

    monkeypatch.setattr(source, "POINT_ROWS_FLOOR", 1)  # the 60-row project is split as a large one would be
    seen = {"cov": [], "lambda": []}
    real_cov, real_lam = cv.fit_covariances_sampled, cv.fit_eigenvalues
    monkeypatch.setattr(cv, "fit_covariances_sampled",
                        lambda m, L, x, *a, **k: seen["cov"].append(len(x)) or real_cov(m, L, x, *a, **k))
    monkeypatch.setattr(cv, "fit_eigenvalues", lambda m, L, x, *a, **k: seen["lambda"].append(len(x)) or real_lam(m, L, x, *a, **k))
    split = EKFAC().fit(gd_project)
    assert seen == {"cov": [12] * 5, "lambda": [12] * 5}
    assert split.meta["factor_rows_per_point"] == [[12] * 5]
    assert split.seg_state[0]["fisher_samples"] == 0  # exact: chosen on the 60 rows, not a share's 12
    seen["cov"].clear(), seen["lambda"].clear()
    every = EKFAC(EKFACSettings(point_rows=0)).fit(gd_project)
    # (factors an earlier test fitted on every row come from the cache: no call, but never a share)
    assert set(seen["cov"]) <= {60} and set(seen["lambda"]) <= {60}
    assert every.meta["factor_rows_per_point"] == [[60] * 5]
    idx = np.arange(0, 60, 3)
    _, eff = loo_effects(gd_project, idx, seeds=[0])
    r_split = _loo_corr(split.scores("test"), idx, eff)
    r_every = _loo_corr(every.scores("test"), idx, eff)
    assert r_split > 0.85 and abs(r_split - r_every) < 0.03, (r_split, r_every)
    assert not np.allclose(split.scores("test"), every.scores("test"), rtol=1e-4, atol=0)


def test_low_precision_gradient_passes_are_an_option_with_their_own_store(gd_project):
    """grad_precision='bfloat16': the training and query gradients come from a bfloat16 copy of the
    model (the curvature and the walk stay float32/64), into a store of their own (a float32 run's
    store is not reused); the scores stay close to float32's."""
    f32 = EKFAC(EKFACSettings(trajectory_points=1)).fit(gd_project)
    bf16 = EKFAC(EKFACSettings(trajectory_points=1, grad_precision="bfloat16")).fit(gd_project)
    assert bf16.meta["grad_precision"] == "bfloat16" and f32.meta["grad_precision"] == "float32"
    assert bf16.query_computer.precision == "bfloat16"
    assert bf16.seg_state[0]["gbar"].folder.name != f32.seg_state[0]["gbar"].folder.name
    a, b = f32.scores("test"), bf16.scores("test")
    assert not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_trak_damping_follows_the_training_time(gd_project, logreg_project, tmp_path, monkeypatch):
    """TRAK's default λ is the ridge that SGD's training time implies: damping_scale × n / (w̄ τ), with
    τ = Σ learning rates / (1 − momentum) up to the member's checkpoint and w̄ the mean p(1 − p) of the
    correct class; where τ is unknown (L-BFGS) or damping_rule is 'ratio', the ratio rule."""
    from engine.autodiff.measurement import correct_class_probability
    from engine.methods.schedule import training_time
    from engine.methods.trak import TRAK, TrakSettings, kernel_damping

    final = gd_project.final_checkpoints()[0]
    assert training_time(gd_project, final) == pytest.approx(30 * 0.5)  # 30 full-batch steps at lr 0.5, β = 0
    early = gd_project.run_checkpoints()[0]
    assert training_time(gd_project, early) == pytest.approx(early.step * 0.5)
    assert training_time(logreg_project, logreg_project.final_checkpoints()[0]) is None  # L-BFGS
    ms = _multistage(tmp_path / "ms")  # both stages count: 20 steps at 0.5, then 15 at 0.3
    assert training_time(ms, ms.final_checkpoints()[0]) == pytest.approx(20 * 0.5 + 15 * 0.3)

    from engine.methods import trak as trak_module

    reads, real_gram = [], trak_module.accumulate_gram
    monkeypatch.setattr(trak_module, "accumulate_gram", lambda store: reads.append(1) or real_gram(store))
    att = TRAK(TrakSettings(ensemble="final", proj_dim=0), workdir=tmp_path / "a").fit(gd_project)
    assert len(reads) == 1  # two kernels (test scores, self-influence) from one read of the store
    rule = att.meta["damping_rule"][0]
    ds = gd_project.train_dataset
    with torch.no_grad():
        p = correct_class_probability(gd_project.load_model(final)(ds.x), ds.y).double().numpy()
    w_bar = float(np.mean(p * (1 - p)))
    assert rule["rule"] == "training time" and rule["tau"] == pytest.approx(15.0)
    assert rule["w_bar"] == pytest.approx(w_bar, rel=1e-5)
    assert att.meta["lambda"][0] == pytest.approx(3.0 * len(ds) / (w_bar * 15.0), rel=1e-5)
    doubled = TRAK(TrakSettings(ensemble="final", proj_dim=0, damping_scale=6.0), workdir=tmp_path / "b").fit(gd_project)
    assert doubled.meta["lambda"][0] == pytest.approx(2 * att.meta["lambda"][0], rel=1e-9)

    ratio = TRAK(TrakSettings(ensemble="final", proj_dim=0, damping_rule="ratio"), workdir=tmp_path / "c").fit(gd_project)
    assert ratio.meta["damping_rule"][0] == {"rule": "ratio"}
    phi = ratio.feature_members[0].store.to_array().astype(np.float64)
    gram = phi.T @ phi if phi.shape[1] <= phi.shape[0] else phi @ phi.T
    assert ratio.meta["lambda"][0] == pytest.approx(kernel_damping(gram, *phi.shape, -1.0, 10.0), rel=1e-4)
    # triage's self-influence keeps the ratio rule's kernel: equal to the 'ratio' run's, test scores not
    assert rule["self_influence_lambda"] == pytest.approx(ratio.meta["lambda"][0], rel=1e-9)
    np.testing.assert_allclose(att.self_scores(), ratio.self_scores(), rtol=1e-6)
    assert not np.allclose(att.scores("test"), ratio.scores("test"), rtol=1e-3)
    lb = TRAK(TrakSettings(ensemble="final", proj_dim=0), workdir=tmp_path / "d").fit(logreg_project)
    assert lb.meta["damping_rule"][0] == {"rule": "ratio"}  # no training time: the ratio rule


def test_trak_copy_scores_and_training_query_scale_are_exact(gd_project, tmp_path):
    """Leak search's references under the training-time rule: a row's copy score is the test-score
    function's own diagonal (what an exact copy of it scores against it), not triage's ratio-kernel
    self-influence; and a training row scored as a query, times training_query_scale, scores as it would
    under the kernel refitted without that row (checked by a direct solve per row)."""
    from engine.methods.trak import TRAK, TrakSettings

    # float32 features, so the stored training side equals the query side to rounding
    att = TRAK(TrakSettings(ensemble="final", proj_dim=0, feature_dtype="float32"), workdir=tmp_path / "a").fit(gd_project)
    assert att.meta["damping_rule"][0]["rule"] == "training time" and TRAK.copy_scores_differ(att.meta)
    idx = np.arange(0, len(gd_project.train_dataset), 7)
    S = att.scores(("train", idx))
    copy = att.copy_scores()
    np.testing.assert_allclose(copy[idx], S[np.arange(len(idx)), idx], rtol=1e-6)
    assert not np.allclose(copy, att.self_scores(), rtol=1e-2)  # the ratio kernel's diagonal is another
    phi = att.feature_members[0].store.to_array().astype(np.float64)
    lam = att.meta["lambda"][0]
    scale = att.training_query_scale(idx)
    assert (scale > 1.01).all()
    for j, i in enumerate(idx):
        keep = np.delete(np.arange(len(phi)), i)
        M = np.linalg.inv(phi[keep].T @ phi[keep] + lam * np.eye(phi.shape[1]))
        np.testing.assert_allclose(S[j] * scale[j], (phi[i] @ M @ phi.T) * att.q, rtol=1e-5, atol=1e-10)
    # a run whose self-influence uses the scoring kernel needs no separate copy scores
    ratio = TRAK(TrakSettings(ensemble="final", proj_dim=0, damping_rule="ratio"), workdir=tmp_path / "b").fit(gd_project)
    assert not TRAK.copy_scores_differ(ratio.meta)
    np.testing.assert_array_equal(ratio.copy_scores(), ratio.self_scores())


def test_trak_damping_follows_adams_preconditioned_training_time(tmp_path):
    """Adam: τ = Σ_t η_t / s̄_t, s̄ the mean of √v̂ + ε in the saved state of the checkpoint ending each
    stretch of steps (a checkpoint without a state takes the next one's); λ = damping_scale_adam × n /
    (w̄ τ). Without any saved state, the ratio rule."""
    import shutil

    from safetensors.torch import load_file

    from engine.methods import schedule
    from engine.methods.schedule import ADAM_BETA2, ADAM_EPS, adam_step_scale, training_time
    from engine.methods.trak import TRAK, TrakSettings

    root = write_tabular_project(tmp_path / "adam", n_train=60,
                                 training=GD.replace('"sgd"', '"adam"').replace("lr = 0.5", "lr = 0.05").replace(
                                     "epochs = 30", "epochs = 6"))
    p = Project.load(root)
    record_training(p)
    run = p.run_checkpoints()

    def s_bar(ck):  # by hand, over every entry of the saved second moments
        st = load_file(str(ck.optimizer_state))
        vals = [(st[k].double() / (1 - ADAM_BETA2 ** float(st[k[:-len("exp_avg_sq")] + "step"].reshape(-1)[0]))).sqrt()
                + ADAM_EPS for k in st if k.endswith(".exp_avg_sq")]
        return float(torch.cat([v.reshape(-1) for v in vals]).mean())

    scales = [s_bar(c) for c in run]
    # over the tracked parameters only, when told which
    st = load_file(str(run[-1].optimizer_state))
    one = sorted(k[:-len(".exp_avg_sq")] for k in st if k.endswith(".exp_avg_sq"))[0]
    v = st[f"{one}.exp_avg_sq"].double() / (1 - ADAM_BETA2 ** float(st[f"{one}.step"].reshape(-1)[0]))
    assert adam_step_scale(run[-1], [one]) == pytest.approx(float((v.sqrt() + ADAM_EPS).mean()), rel=1e-9)
    assert adam_step_scale(run[-1], [one]) != pytest.approx(scales[-1], rel=1e-3)
    assert len(set(round(x, 12) for x in scales)) > 1  # it changes along the run
    steps = np.diff([0] + [c.step for c in run])
    want = float(sum(k * 0.05 / sc for k, sc in zip(steps, scales)))
    final = p.final_checkpoints()[0]
    assert training_time(p, final) == pytest.approx(want, rel=1e-9)
    att = TRAK(TrakSettings(ensemble="final", proj_dim=0), workdir=tmp_path / "a").fit(p)
    rule = att.meta["damping_rule"][0]
    assert rule["rule"] == "training time" and rule["optimizer"] == "adam" and rule["tau"] == pytest.approx(want)
    assert att.meta["lambda"][0] == pytest.approx(10.0 * len(p.train_dataset) / (rule["w_bar"] * want), rel=1e-6)
    other = TRAK(TrakSettings(ensemble="final", proj_dim=0, damping_scale_adam=5.0, damping_scale=99.0),
                 workdir=tmp_path / "b").fit(p)
    assert other.meta["lambda"][0] == pytest.approx(att.meta["lambda"][0] / 2, rel=1e-9)  # SGD's scale unused

    # a NaN in a saved second moment (a diverged run): τ unknown, not a NaN damping
    from safetensors.torch import save_file
    f_last = run[-1].optimizer_state
    saved = load_file(str(f_last))
    broken = dict(saved)
    k_nan = next(k for k in broken if k.endswith(".exp_avg_sq"))
    broken[k_nan] = broken[k_nan].clone()
    broken[k_nan].view(-1)[0] = float("nan")
    save_file(broken, str(f_last))
    assert training_time(Project.load(root), final) is None
    save_file(saved, str(f_last))
    schedule._STEP_SCALES.clear()  # s̄ is cached by file and mtime; two rewrites here may share an mtime tick
    assert training_time(Project.load(root), final) == pytest.approx(want, rel=1e-9)

    # a checkpoint without its state takes the next one's s̄
    first = run[0].optimizer_state
    shutil.move(str(first), str(first) + ".away")
    p = Project.load(root)
    assert training_time(p, p.final_checkpoints()[0]) == pytest.approx(
        want - steps[0] * 0.05 / scales[0] + steps[0] * 0.05 / scales[1], rel=1e-9)
    # the final checkpoint without its state: the previous one's s̄ stands in
    last = p.run_checkpoints()[-1].optimizer_state
    shutil.move(str(last), str(last) + ".away")
    p = Project.load(root)
    assert training_time(p, p.final_checkpoints()[0]) == pytest.approx(
        want - steps[0] * 0.05 / scales[0] + steps[0] * 0.05 / scales[1] - steps[-1] * 0.05 / scales[-1]
        + steps[-1] * 0.05 / scales[-2], rel=1e-9)
    shutil.move(str(last) + ".away", str(last))
    p = Project.load(root)
    for c in p.run_checkpoints()[1:]:  # no saved state at all: τ unknown, the ratio rule
        c.optimizer_state.unlink()
    p = Project.load(root)
    assert training_time(p, p.final_checkpoints()[0]) is None
    bare = TRAK(TrakSettings(ensemble="final", proj_dim=0), workdir=tmp_path / "c").fit(p)
    assert bare.meta["damping_rule"][0] == {"rule": "ratio"}
