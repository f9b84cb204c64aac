"""EK-FAC factors against brute force, the curvature functions, factor storage, left-out layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.autodiff import curvature as cv


def _tiny_data(n=40, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _kron_fisher_diag(G: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
    """diag of (Q_A ⊗ Q_S)ᵀ F (Q_A ⊗ Q_S), F = E[vec(G) vec(G)ᵀ], built explicitly."""
    n, o, i = G.shape
    vec = G.transpose(1, 2).reshape(n, o * i)  # column-major vec
    Fm = vec.T @ vec / n
    Q = torch.kron(QA, QS)  # vec(Q_Sᵀ G Q_A) = (Q_A ⊗ Q_S)ᵀ vec(G)
    return torch.diagonal(Q.T @ Fm @ Q).reshape(i, o).T


def test_single_linear_factors_equal_brute_force_fisher():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x, _ = _tiny_data()
    x = x.double()
    layers, left = cv.curvature_layers(model)
    assert [L.name for L in layers] == [""] and left == {}
    labels = cv.sample_labels(model, x, samples=2, seed=3)
    cov = cv.fit_covariances(model, layers, x, labels, batch_size=7)
    # brute force: a = [x, 1], s = softmax − onehot(sampled label) per example and sample
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    assert torch.allclose(cov[".A"], a.T @ a / len(x), atol=1e-12)
    G = cv.brute_force_pseudo_grads(model, layers, x, labels)[""]  # [n·2, out, in]
    s = G[:, :, -1]  # the bias column of G is s itself
    assert torch.allclose(cov[".S"], s.T @ s / len(s), atol=1e-12)
    basis = cv.eigenbasis(cov, layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, batch_size=9)[".lambda"]
    expect = _kron_fisher_diag(G, basis[".QS"], basis[".QA"])
    assert torch.allclose(lam, expect, rtol=1e-9, atol=1e-12)
    # EK-FAC eigenvalues differ from the K-FAC products (else the test would not discriminate)
    kfac = basis[".lS"][:, None] * basis[".lA"][None, :]
    assert not torch.allclose(lam, kfac, rtol=1e-3)


def test_exact_fisher_is_the_expectation_over_model_labels():
    """samples=0 weights every class by its probability: for a Linear head S = E_x[diag(p) − ppᵀ],
    and Λ is the sampled estimate's limit (checked against many samples)."""
    torch.manual_seed(4)
    model = nn.Linear(6, 4).double()
    x = _tiny_data(n=30)[0].double()
    layers, _ = cv.curvature_layers(model)
    labels, w = cv.fisher_targets(model, x, samples=0)
    assert labels.shape == (30, 4) and torch.allclose(w.sum(1), torch.ones(30, dtype=torch.float64))
    cov = cv.fit_covariances(model, layers, x, labels, w, batch_size=8)
    p = torch.softmax(model(x), -1).detach()
    expect_S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert torch.allclose(cov[".S"], expect_S, atol=1e-12)
    basis = cv.eigenbasis(cov, layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, w)[".lambda"]
    many, wm = cv.fisher_targets(model, x, samples=4000, seed=1)
    lam_mc = cv.fit_eigenvalues(model, layers, x, many, basis, wm)[".lambda"]
    assert torch.allclose(lam, lam_mc, rtol=0.1, atol=1e-3 * float(lam.max()))


def test_covariance_pass_draws_the_fisher_labels_itself():
    """fit_covariances_sampled labels each batch from its own forward: the same labels and weights as
    fisher_targets (whatever the batch size: each row's draw is fixed by the seed), and the same
    covariances as fit_covariances given those labels; sampled labels follow the model's probabilities."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    layers, _ = cv.curvature_layers(model)
    for samples in (1, 3, 0, -1):
        ref_lab, ref_w = cv.fisher_targets(model, x, samples, seed=11)
        ref_cov = cv.fit_covariances(model, layers, x, ref_lab, ref_w, batch_size=16)
        for bs in (7, 16):
            cov, lab, w = cv.fit_covariances_sampled(model, layers, x, samples, 11, batch_size=bs)
            assert lab.dtype == torch.long
            torch.testing.assert_close(lab, ref_lab, rtol=0, atol=0)
            torch.testing.assert_close(w, ref_w, rtol=0, atol=0)
            for k in ref_cov:
                torch.testing.assert_close(cov[k], ref_cov[k], rtol=1e-12, atol=1e-14)
    assert not torch.equal(cv.fisher_targets(model, x, 1, seed=12)[0], cv.fisher_targets(model, x, 1, seed=11)[0])
    # inverse-CDF draws follow p: 20,000 labels of one row against its probabilities
    row = x[:1].expand(20000, -1)
    lab, _ = cv.fisher_targets(model, row, 1, seed=3)
    freq = torch.bincount(lab[:, 0], minlength=4).double() / 20000
    p = torch.softmax(model(x[:1]), -1)[0].detach()
    assert torch.allclose(freq, p, atol=0.015)
    # a diverged model's probabilities: one clear error, not a silent label
    from engine.core.errors import ProponentError
    with pytest.raises(ProponentError, match="non-finite class probabilities"):
        cv.labels_from_probs(torch.tensor([[float("nan"), 1.0]], dtype=torch.float64), 1, torch.rand(1, 1, dtype=torch.float64))


def test_conv2d_unfolded_patches_match_autograd():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    x = torch.randn(10, 2, 6, 6, dtype=torch.float64)
    layers, left = cv.curvature_layers(model)
    assert [L.kind for L in layers] == ["conv2d", "linear"] and left == {}
    labels = cv.sample_labels(model, x, samples=1, seed=0)
    cov = cv.fit_covariances(model, layers, x, labels, batch_size=4)
    basis = cv.eigenbasis(cov, layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, batch_size=3)
    G = cv.brute_force_pseudo_grads(model, layers, x, labels)
    for L in layers:
        QS, QA = basis[f"{L.name}.QS"], basis[f"{L.name}.QA"]
        expect = ((QS.T @ G[L.name] @ QA) ** 2).mean(0)
        assert torch.allclose(lam[f"{L.name}.lambda"], expect, rtol=1e-9, atol=1e-14), L.name


def test_apply_eigen_fn_is_the_damped_inverse_in_the_kronecker_basis():
    torch.manual_seed(2)
    o, i = 3, 5
    QS, _ = torch.linalg.qr(torch.randn(o, o, dtype=torch.float64))
    QA, _ = torch.linalg.qr(torch.randn(i, i, dtype=torch.float64))
    lam = torch.rand(o, i, dtype=torch.float64) * 2
    V = torch.randn(7, o, i, dtype=torch.float64)
    out = cv.apply_eigen_fn(V, QS, QA, cv.damped_inverse(lam, 0.1))
    Q = torch.kron(QA, QS)
    H = Q @ torch.diag(lam.T.reshape(-1)) @ Q.T
    vec = V.transpose(1, 2).reshape(7, -1)
    expect = torch.linalg.solve(H + 0.1 * torch.eye(o * i, dtype=torch.float64), vec.T).T
    assert torch.allclose(out.transpose(1, 2).reshape(7, -1), expect, atol=1e-10)


def test_response_matches_its_series_near_zero_and_limits():
    c = 57.5
    sig = torch.tensor([1e-14, 1e-11, 1e-9, 3e-8, 1e-7, 1e-6, 1e-5], dtype=torch.float64)
    series = c - c ** 2 * sig / 2 + c ** 3 * sig ** 2 / 6 - c ** 4 * sig ** 3 / 24
    got = cv.response(sig, c)
    assert torch.allclose(got, series, rtol=1e-9)
    assert torch.isfinite(got).all()
    # the limit c for σ = 0 and for non-positive σ
    assert torch.equal(cv.response(torch.tensor([0.0, -1e-3, -5.0], dtype=torch.float64), c),
                       torch.full((3,), c, dtype=torch.float64))
    # away from 0 it is the closed form; for large cσ it tends to 1/σ
    s = torch.tensor([0.01, 0.5, 3.0, 1e3], dtype=torch.float64)
    assert torch.allclose(cv.response(s, c), (1 - torch.exp(-c * s)) / s, rtol=1e-12)
    assert abs(float(cv.response(torch.tensor([1e3], dtype=torch.float64), c)) - 1e-3) < 1e-12
    # propagation: exp(−cσ), 1 where there is no curvature
    assert torch.allclose(cv.propagation(s, c), torch.exp(-c * s))
    assert float(cv.propagation(torch.tensor([-1.0]), c)) == 1.0
    # F(σ) = ∫_0^c exp(−tσ) dt: check by quadrature at a moderate σ
    t = torch.linspace(0, c, 200001, dtype=torch.float64)
    quad = torch.trapezoid(torch.exp(-t * 0.05), t)
    assert abs(float(cv.response(torch.tensor([0.05], dtype=torch.float64), c)) - float(quad)) < 1e-6


def test_layers_without_kronecker_factors_are_listed_not_dropped():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    layers, left = cv.curvature_layers(model)
    assert [L.name for L in layers] == ["0", "3"]
    assert set(left) == {"1.weight", "1.bias"} and "LayerNorm" in left["1.weight"]
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    layers, left = cv.curvature_layers(grouped)
    assert [L.name for L in layers] == ["2"] and "grouped" in left["0.weight"]


def test_layout_round_trip():
    from engine.autodiff import GradientComputer

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3, bias=False))
    layers, _ = cv.curvature_layers(model)
    comp = GradientComputer(model, tracked=cv.covered_param_names(layers))
    layout = cv.LayerBlocks(layers, comp.layout)
    flat = torch.randn(5, comp.n_params)
    mats = layout.to_layers(flat)
    assert [tuple(m.shape[1:]) for m in mats] == [(2, 10), (3, 32)]
    assert torch.equal(layout.to_flat(mats), flat)
    # into a given tensor, converted to its dtype, every entry written (no stale values left)
    out = torch.full((5, comp.n_params), float("nan"), dtype=torch.float64)
    assert layout.covers_all and layout.to_flat(mats, out=out) is out and torch.equal(out, flat.double())
    # a layout wider than the layers (a BatchNorm's parameters tracked too): the rest is zeroed
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3, bias=False))
    wide = cv.LayerBlocks(cv.curvature_layers(bn)[0], GradientComputer(bn).layout)
    assert not wide.covers_all
    out = torch.full((5, wide.n), float("nan"))
    got = wide.to_flat(wide.to_layers(torch.randn(5, wide.n)), out=out)
    assert torch.isfinite(got).all() and torch.equal(got, wide.to_flat(wide.to_layers(got)))


def test_ekfac_method_stores_factors_and_reuses_them(logreg_project, copy_project, monkeypatch):
    from engine.methods.ekfac import EKFAC

    p = copy_project(logreg_project)
    a = EKFAC().fit(p)
    S1 = a.scores("test")
    files = sorted(f.name for f in (p.state_dir / "factors").glob("*.safetensors"))
    assert any(f.startswith("cov-") for f in files) and any(f.startswith("lambda-") for f in files)
    assert a.meta["left_out"] == {} and a.meta["layers"] == [""]

    def boom(*args, **kw):
        raise AssertionError("factors were recomputed instead of reused")

    for name in ("fit_covariances", "fit_covariances_sampled", "_covariances", "fit_eigenvalues", "fisher_targets"):
        monkeypatch.setattr(cv, name, boom)
    S2 = EKFAC().fit(p).scores("test")
    np.testing.assert_array_equal(S1, S2)
    # factor_products: the logistic regression is below the bfloat16 floor, so auto fits in float32 (the files
    # above); asked for bfloat16, its factors are keyed apart (never read by a float32 fit, nor the reverse)
    assert a.meta["factor_products"] == "float32"
    monkeypatch.undo()
    b = EKFAC(EKFAC.Settings(factor_products="bfloat16")).fit(p)
    assert b.meta["factor_products"] == "bfloat16"
    after = sorted(f.name for f in (p.state_dir / "factors").glob("*.safetensors"))
    assert len(after) == 2 * len(files) and set(files) < set(after)


def test_eigen_curvature_operator_is_ekfac_in_flat_layout():
    """EigenCurvature applies h(σ) in the Kronecker eigenbasis of each covered layer (flat layout of
    the tracked parameters); an uncovered parameter (LayerNorm) gets h of the mean eigenvalue."""
    from engine.autodiff.functional import FunctionalModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, _ = _tiny_data()
    x = x.double()
    layout = FunctionalModel(model).layout
    curv = cv.EigenCurvature(model, layout, x, weight_decay=0.01, seed=1)
    assert set(curv.left_out) == {"1.weight", "1.bias"}
    v = torch.randn(3, layout.n, dtype=torch.float64)
    same = curv.apply(v, lambda s: torch.ones_like(s))
    assert torch.allclose(same, v, atol=1e-10)
    # K then K⁻¹ is the identity; K matches the factors built by the shared functions
    back = curv.apply(curv.apply(v, lambda s: s), lambda s: 1.0 / s)
    assert torch.allclose(back, v, rtol=1e-8, atol=1e-8)
    layers, _ = cv.curvature_layers(model)
    labels, weights = cv.fisher_targets(model, x, -1, seed=1)
    basis = cv.eigenbasis(cv.fit_covariances(model, layers, x, labels, weights), layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, weights)
    blocks = cv.LayerBlocks(layers, layout)
    want = blocks.to_flat([cv.apply_eigen_fn(V, basis[f"{L.name}.QS"], basis[f"{L.name}.QA"], lam[f"{L.name}.lambda"] + 0.01)
                           for L, V in zip(layers, blocks.to_layers(v))])
    got = curv.apply(v, lambda s: s)
    covered = curv.covered
    assert torch.allclose(got[:, covered], want[:, covered], rtol=1e-8, atol=1e-10)
    ln = torch.cat([torch.arange(layout["1.weight"].offset, layout["1.weight"].offset + 5),
                    torch.arange(layout["1.bias"].offset, layout["1.bias"].offset + 5)])
    assert not covered[ln].any()
    assert torch.allclose(got[:, ln], v[:, ln] * curv.mean_eigenvalue)
    sig = torch.cat([(lam[f"{L.name}.lambda"] + 0.01).flatten() for L in layers])
    assert abs(curv.mean_eigenvalue - float(sig.mean())) <= 1e-12 * float(sig.mean())


def test_curvature_methods_do_not_project_gradients_that_fit():
    """A random projection of the stored gradients cost EK-FAC 0.15 LDS on the digits CNN (9,930
    parameters, k = 2048); curvature methods project only when n_train × p would not fit."""
    from engine.methods.ekfac import EKFACSettings
    from engine.methods.settings import CURVATURE_STORE_ENTRIES, ProjectionSettings
    from engine.methods.source import SourceSettings

    for S in (EKFACSettings, SourceSettings):
        assert S().projection_plan(9930, 1445) == ("none", 0)
        kind, k = S().projection_plan(10**6, 10**6)
        assert kind != "none" and 2048 <= k <= 16384 and 10**6 * k <= 8 * CURVATURE_STORE_ENTRIES
        assert S(proj_dim=512).projection_plan(9930, 1445) == ("auto", 512)
        # the 32×32 RGB CNN of scripts/bench_gpu.py: streamed from disk, so not projected (SJLT there cost LDS)
        assert S().projection_plan(94762, 5000) == ("none", 0)
    # TRAK's rule is unchanged: its kernel lives in the projected space
    assert ProjectionSettings().projection_plan(9930, 1445) == ("auto", 2048)


def _small_cnn(seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


def test_float32_model_factors_match_float64_arithmetic(monkeypatch):
    """A float32 model's products are formed in float32 and summed in float64 (ACCUMULATE_ROWS rows
    at a time for the covariances): they agree with the same fit in float64 to float32 precision."""
    model = _small_cnn()
    x = torch.randn(37, 3, 8, 8)
    layers, _ = cv.curvature_layers(model)
    labels, w = cv.fisher_targets(model, x, 0)
    monkeypatch.setattr(cv, "ACCUMULATE_ROWS", 100)  # several partial products per batch
    cov = cv.fit_covariances(model, layers, x, labels, w, batch_size=16)
    basis = cv.eigenbasis(cov, layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, w, batch_size=16)
    assert all(t.dtype == torch.float64 for t in (*cov.values(), *lam.values()))
    m64 = _small_cnn().double()
    layers64, _ = cv.curvature_layers(m64)
    cov64 = cv.fit_covariances(m64, layers64, x.double(), labels, w, batch_size=16)
    lam64 = cv.fit_eigenvalues(m64, layers64, x.double(), labels, basis, w, batch_size=16)
    for k in cov64:
        assert torch.allclose(cov[k], cov64[k], rtol=1e-4, atol=1e-6 * float(cov64[k].abs().max())), k
    for k in lam64:
        assert torch.allclose(lam[k], lam64[k], rtol=1e-4, atol=1e-6 * float(lam64[k].abs().max())), k
    # and the float64 path still equals brute force (per-example autograd) exactly
    G = cv.brute_force_pseudo_grads(m64, layers64, x.double()[:6], labels[:6])
    lam_bf = cv.fit_eigenvalues(m64, layers64, x.double()[:6], labels[:6], basis, w[:6], batch_size=4)
    for L in layers64:
        QS, QA = basis[f"{L.name}.QS"], basis[f"{L.name}.QA"]
        wf = w[:6].reshape(-1)[:, None, None]  # G is ordered example-major, label-minor, as w.reshape(-1)
        expect = (wf * (QS.T @ G[L.name] @ QA) ** 2).sum(0) / 6
        assert torch.allclose(lam_bf[f"{L.name}.lambda"], expect, rtol=1e-9, atol=1e-14), L.name


def test_pseudo_gradients_form_no_parameter_gradients():
    """The label passes differentiate with respect to the layers' outputs only: no .grad is written
    (a full backward formed every weight gradient too, at about twice the cost), and a covered layer
    whose output does not reach the loss gets zero output gradients instead of an error."""
    model = _small_cnn()
    x = torch.randn(5, 3, 8, 8)
    layers, _ = cv.curvature_layers(model)
    labels, w = cv.fisher_targets(model, x, 2, seed=0)
    seen = 0
    for lo, j, batch, wb in cv._pseudo_grad_batches(model, layers, x, labels, w, 4, "cpu"):
        assert all(p.grad is None for p in model.parameters())
        seen += 1
    assert seen == 2 * labels.shape[1]

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    dead = Dead()
    xl = torch.randn(6, 4)
    layers, _ = cv.curvature_layers(dead)
    lab, wl = cv.fisher_targets(dead, xl, 1, seed=0)
    cov = cv.fit_covariances(dead, layers, xl, lab, wl)
    assert float(cov["unused.S"].abs().max()) == 0.0 and float(cov["used.S"].abs().max()) > 0


def test_curvature_batches_are_bounded_by_bytes_and_give_the_same_factors(monkeypatch):
    """A conv layer's unfolded patches grow with the image: curvature batches are sized from one
    example's layer inputs and output gradients (CURVATURE_BATCH_BYTES), not a fixed 256 rows, and the
    factors do not depend on the batching."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 12 * 12, 5)).double()
    x = torch.randn(30, 3, 12, 12, dtype=torch.float64)
    layers, _ = cv.curvature_layers(model)
    # per example: 144 positions × 2 × (in + out) × 8 bytes per conv layer, and the Linear's one position
    per = 144 * 2 * ((27 + 1 + 8) + (72 + 1 + 8)) * 8 + 2 * (8 * 144 + 1 + 5) * 8
    assert cv.curvature_batch_size(model, layers, x) == min(256, cv.CURVATURE_BATCH_BYTES // per)
    monkeypatch.setattr(cv, "CURVATURE_BATCH_BYTES", per * 7)
    assert cv.curvature_batch_size(model, layers, x) == 7
    seen = []
    real = cv._pseudo_grad_batches

    def spy(model, layers, x, labels, weights, batch_size, device, products=None):
        seen.append(batch_size)
        return real(model, layers, x, labels, weights, batch_size, device, products)

    monkeypatch.setattr(cv, "_pseudo_grad_batches", spy)
    labels, w = cv.fisher_targets(model, x, 0)
    cov = cv.fit_covariances(model, layers, x, labels, w)
    basis = cv.eigenbasis(cov, layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, w)
    assert seen == [7, 7]
    cov_all = cv.fit_covariances(model, layers, x, labels, w, batch_size=256)
    lam_all = cv.fit_eigenvalues(model, layers, x, labels, basis, w, batch_size=256)
    for k in cov:
        assert torch.allclose(cov[k], cov_all[k], rtol=1e-10, atol=1e-14)
    for k in lam:
        assert torch.allclose(lam[k], lam_all[k], rtol=1e-10, atol=1e-14)


def test_normalized_layers_are_found_by_rescaling_and_leave_the_model_untouched():
    """A layer is 'normalised' when rescaling its parameters leaves the outputs unchanged with
    BatchNorm on batch statistics: a convolution feeding BatchNorm (directly or through a ReLU), a
    Linear feeding LayerNorm; not a layer whose output reaches the logits unnormalised."""
    cnn = _small_cnn()  # conv → BN → ReLU → pool → conv → ReLU → flatten → linear
    layers, _ = cv.curvature_layers(cnn)
    x = torch.randn(16, 3, 8, 8)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert cv.normalized_layers(cnn, layers, x) == ["0"]
    # nothing changed: weights, BatchNorm's running statistics, every module's mode
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert not any(m.training for m in cnn.modules())
    cnn.train()
    assert cv.normalized_layers(cnn, layers, x) == ["0"] and all(m.training for m in cnn.modules())
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    # the layers may be listed on another instance of the architecture: the probed model's weights count
    assert cv.normalized_layers(cnn, cv.curvature_layers(_small_cnn(seed=9))[0], x) == ["0"]

    torch.manual_seed(0)  # through a ReLU (positively homogeneous) and with a bias; LayerNorm
    relu_then_bn = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    ln = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, _ = _tiny_data(n=32)
    for model, want in ((relu_then_bn, ["0"]), (ln, ["0"]), (plain, [])):
        assert cv.normalized_layers(model, cv.curvature_layers(model)[0], x) == want
    # batch statistics need two rows: one row finds nothing rather than a false positive
    assert cv.normalized_layers(relu_then_bn, cv.curvature_layers(relu_then_bn)[0], x[:1]) == []


class _ResidualNet(nn.Module):
    """A convolution whose output a ReLU changes in place, and a residual ``out += h`` on another:
    with ``inplace=False`` the same function written without in-place operations."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x):
        h = self.act(self.conv1(x))
        r = self.conv2(h)
        if self.inplace:
            r += h
        else:
            r = r + h
        return self.fc(self.act(r).flatten(1))


def _twin_models():
    torch.manual_seed(3)
    plain = _ResidualNet(inplace=False).eval()
    inplace = _ResidualNet(inplace=True).eval()
    inplace.load_state_dict(plain.state_dict())
    return plain, inplace


def test_layers_changed_in_place_after_capture_give_their_own_statistics():
    """A model that changes a covered layer's output in place (ReLU(inplace=True), a residual +=)
    gets the same curvature statistics and factorized features as the same function without
    in-place operations: the capture sees the change and captures again from copies."""
    from engine.autodiff.factorized import FactorizedGradients

    plain, inplace = _twin_models()
    x = torch.randn(24, 3, 5, 5)
    y = torch.randint(0, 4, (24,))
    with torch.no_grad():
        torch.testing.assert_close(inplace(x.clone()), plain(x))
    labels = cv.sample_labels(plain, x, samples=2, seed=1)
    covs = []
    for model in (plain, inplace):
        layers, left = cv.curvature_layers(model)
        assert not left
        covs.append(cv.fit_covariances(model, layers, x, labels, batch_size=10))
    for k in covs[0]:
        torch.testing.assert_close(covs[1][k], covs[0][k], rtol=1e-6, atol=1e-9)
    feats = []
    for model in (plain, inplace):
        fg = FactorizedGradients(model, 48, seed=2)
        feats.append(torch.cat([fg.features(x[lo:lo + 8], y[lo:lo + 8], "margin") for lo in (0, 8, 16)]))
        assert fg._protect is (model is inplace)  # found once, remembered for the later batches
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-5, atol=1e-6)


def test_a_layer_called_at_every_step_gets_the_fisher_of_its_summed_gradient():
    """A recurrent cell (one Linear called once per step): its per-example gradient is the sum over
    the calls, so the EK-FAC eigenvalues equal the diagonal of the brute-force Fisher in the basis."""
    from tests.test_factorized import Recurrent

    torch.manual_seed(4)
    model = Recurrent().double().eval()
    x = torch.randn(12, 4, 3, dtype=torch.float64)
    layers, left = cv.curvature_layers(model)
    assert not left and {L.name for L in layers} == {"inp", "cell", "out"}
    labels = cv.sample_labels(model, x, samples=2, seed=1)
    basis = cv.eigenbasis(cv.fit_covariances(model, layers, x, labels, batch_size=5), layers)
    lam = cv.fit_eigenvalues(model, layers, x, labels, basis, batch_size=7)
    G = cv.brute_force_pseudo_grads(model, layers, x, labels)
    for L in layers:
        expect = _kron_fisher_diag(G[L.name], basis[f"{L.name}.QS"], basis[f"{L.name}.QA"])
        torch.testing.assert_close(lam[f"{L.name}.lambda"], expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rotate_first", [True, False])
def test_both_eigenvalue_orders_equal_brute_force(monkeypatch, rotate_first):
    """The eigenvalue pass rotates per position or forms G first, whichever takes fewer products
    (rotate_positions_first); each order alone gives E[(Q_Sᵀ G Q_A)²] of the per-example gradients."""
    m64 = _small_cnn().double()
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    layers, _ = cv.curvature_layers(m64)
    labels, w = cv.fisher_targets(m64, x, 2, seed=4)
    basis = cv.eigenbasis(cv.fit_covariances(m64, layers, x, labels, w, batch_size=4), layers)
    monkeypatch.setattr(cv, "rotate_positions_first", lambda *a, **k: rotate_first)
    lam = cv.fit_eigenvalues(m64, layers, x, labels, basis, w, batch_size=3)
    G = cv.brute_force_pseudo_grads(m64, layers, x, labels)
    for L in layers:
        QS, QA = basis[f"{L.name}.QS"], basis[f"{L.name}.QA"]
        expect = (w.reshape(-1)[:, None, None] * (QS.T @ G[L.name] @ QA) ** 2).sum(0) / len(x)
        assert torch.allclose(lam[f"{L.name}.lambda"], expect, rtol=1e-9, atol=1e-14), L.name


def test_the_eigenvalue_order_follows_the_product_count():
    # a Linear (one position) rotates first; the benchmark CNN's 32->64 convolution at 16x16 (256
    # positions, 288 inputs) forms G; its 64->128 one at 8x8 (64 positions, 576 inputs) rotates first
    assert cv.rotate_positions_first(1, 129, 10)
    assert not cv.rotate_positions_first(256, 288, 64)
    assert cv.rotate_positions_first(64, 576, 128)


@pytest.mark.parametrize("d,block", [(7, 96), (7, 2), (290, 96)])
def test_gram_sums_float32_chunks_in_float64(monkeypatch, d, block):
    """Σ_rows x xᵀ from Xᵀ (contiguous or a transposed view), float32 products of ACCUMULATE_ROWS rows
    summed in float64: equal to the float64 product, and exactly symmetric however many upper-triangle blocks
    (one; 3 of 7 columns, uneven; 3 of 290); float64 input multiplied in float64."""
    X = torch.randn(300, d)
    monkeypatch.setattr(cv, "ACCUMULATE_ROWS", 64)
    monkeypatch.setattr(cv, "GRAM_BLOCK", block)
    blocks = len(cv._gram_edges(d)) - 1
    assert blocks == (1 if (d, block) == (7, 96) else 3)
    want = X.double().T @ X.double()
    for XT in (X.T.contiguous(), X.T):
        got = cv._gram(XT)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # float32 sums of 64 products
        assert blocks == 1 or torch.equal(got, got.T)  # one full product: symmetric only to rounding
    torch.testing.assert_close(cv._gram(X.double().T), want, rtol=1e-12, atol=1e-12)
    # bfloat16 inputs (the factor products' dtype where the CPU multiplies it): the same blocks, bfloat16 rounding
    Xb = X.bfloat16()
    got = cv._gram(Xb.T)
    torch.testing.assert_close(got, Xb.double().T @ Xb.double(), rtol=2e-2, atol=0.5)
    assert blocks == 1 or torch.equal(got, got.T)


def test_convolution_input_covariance_equals_the_patches_second_moment():
    """A of a convolution without bias (its patches a transposed view, summed through
    _gram) is E[Σ_t patch_t patch_tᵀ] over the examples, computed here from F.unfold."""
    import torch.nn.functional as F

    m64 = _small_cnn().double()
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    layers, _ = cv.curvature_layers(m64)
    conv = next(L for L in layers if L.kind == "conv2d" and not L.bias)
    labels, w = cv.fisher_targets(m64, x, 0)
    cov = cv.fit_covariances(m64, layers, x, labels, w, batch_size=4)
    P = F.unfold(x, 3, padding=1)  # [n, 27, 64]: the first layer's input patches
    expect = torch.einsum("nit,njt->ij", P, P) / len(x)
    torch.testing.assert_close(cov[f"{conv.name}.A"], expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_patches_equal_unfold_in_either_column_order(memory_format):
    """conv_patches (strided slices of a padded channels-last copy) gives F.unfold's patches for strides,
    dilations, asymmetric kernels and every padding form; kernel-major columns map back through
    kernel_major_order, and a bias's ones column is written in place."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    for kw in [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), padding=(1, 2), stride=2),
               dict(kernel_size=3, dilation=2, padding="same"), dict(kernel_size=2, stride=2),
               dict(kernel_size=1), dict(kernel_size=3, padding="valid", stride=(1, 2)), dict(kernel_size=4, padding=3, stride=3)]:
        m = nn.Conv2d(5, 7, **kw)
        k = m.kernel_size[0] * m.kernel_size[1]
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = torch.randn(4, 5, 11, 9).to(dtype).contiguous(memory_format=memory_format)
            want = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=cv._conv_padding(m), stride=m.stride).transpose(1, 2)
            got = cv.conv_patches(m, x)
            assert got.is_contiguous() and got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            kmajor = cv.conv_patches(m, x, kernel_major=True)
            assert not torch.equal(kmajor, want) or k == 1  # really another order
            torch.testing.assert_close(kmajor[..., cv.kernel_major_order(5, k)], want, rtol=0, atol=0)
            ones = cv.conv_patches(m, x, kernel_major=True, ones_column=True)
            assert bool((ones[..., -1] == 1).all())
            torch.testing.assert_close(ones[..., cv.kernel_major_order(5, k, 1)][..., :-1], want, rtol=0, atol=0)


def test_eigenvalues_with_an_adam_scale_equal_brute_force_on_convolutions():
    """The √P ⊙ G variant (formed G, scaled, rotated) on kernel-major convolution patches: the scale and Q_A
    follow the patches' column order, so Λ = E[(Q_Sᵀ (√P ⊙ G) Q_A)²] of the weight-ordered gradients."""
    m64 = _small_cnn().double()
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    layers, _ = cv.curvature_layers(m64)
    labels, w = cv.fisher_targets(m64, x, 1, seed=2)
    basis = cv.eigenbasis(cv.fit_covariances(m64, layers, x, labels, w, batch_size=4), layers)
    gen = torch.Generator().manual_seed(5)
    scale = {L.name: torch.rand(L.out_dim, L.in_dim, generator=gen, dtype=torch.float64) + 0.5 for L in layers}
    lam = cv.fit_eigenvalues(m64, layers, x, labels, basis, w, scale=scale, batch_size=3)
    G = cv.brute_force_pseudo_grads(m64, layers, x, labels)
    for L in layers:
        QS, QA = basis[f"{L.name}.QS"], basis[f"{L.name}.QA"]
        expect = (w.reshape(-1)[:, None, None] * (QS.T @ (G[L.name] * scale[L.name]) @ QA) ** 2).sum(0) / len(x)
        torch.testing.assert_close(lam[f"{L.name}.lambda"], expect, rtol=1e-9, atol=1e-14)


def test_bfloat16_factor_products_stay_close_on_wide_layers_and_leave_narrow_ones_exact():
    """products=bfloat16: a float32 model's layers of at least BF16_FACTOR_MIN_IN inputs form their input
    Gram matrices and eigenvalue rotations in bfloat16 (off by about 2^-9 per entry, averaging out); narrower
    layers and S stay float32, bit for bit; a float64 model ignores the request."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 5)).eval()
    x = torch.randn(48, 3, 10, 10)
    layers, _ = cv.curvature_layers(model)
    wide = [L.name for L in layers if L.in_dim >= cv.BF16_FACTOR_MIN_IN]
    assert wide == ["2"]  # 32 channels × 9 + bias
    labels, w = cv.fisher_targets(model, x, 1, seed=1)
    cov32 = cv.fit_covariances(model, layers, x, labels, w)
    cov16 = cv.fit_covariances(model, layers, x, labels, w, products=torch.bfloat16)
    basis = cv.eigenbasis(cov32, layers)
    lam32 = cv.fit_eigenvalues(model, layers, x, labels, basis, w)
    lam16 = cv.fit_eigenvalues(model, layers, x, labels, basis, w, products=torch.bfloat16)
    for L in layers:
        for key, a, b in ((f"{L.name}.A", cov32, cov16), (f"{L.name}.S", cov32, cov16), (f"{L.name}.lambda", lam32, lam16)):
            err = float((b[key] - a[key]).norm() / a[key].norm())
            if L.name in wide and not key.endswith(".S"):
                assert 0 < err < 1e-2, (key, err)  # really bfloat16, and close
            else:
                assert err == 0, (key, err)
    m64 = model.double()
    c64 = cv.fit_covariances(m64, layers, x.double(), labels, w)
    assert all(torch.equal(c64[k], v) for k, v in cv.fit_covariances(m64, layers, x.double(), labels, w,
                                                                       products=torch.bfloat16).items())
