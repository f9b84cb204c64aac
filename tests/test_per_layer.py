"""Per-example gradients by layer (one batched backward, closed forms per module) against torch.func,
and the gradient computer's choice between them: where the per-layer pass does not apply or
disagrees, torch.func answers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.autodiff.per_example import GradientComputer
from engine.autodiff.per_layer import CONV_WEIGHT_GRADS, LayerGradients, layer_plan
from engine.core.errors import ProponentError


class Mixed(nn.Module):
    """Every module kind the per-layer pass covers, with strides, dilation, groups and a Linear over
    positions (a [b, T, d] input)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, dilation=2, padding=2, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.tok = nn.Linear(8, 5)  # over the 4x4 positions as tokens
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5 * 16, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = self.gn(self.conv3(torch.relu(self.conv2(h))))
        t = self.ln(self.tok(h.flatten(2).transpose(1, 2)))  # [b, 16, 5]
        return self.bn1d(self.head(torch.tanh(t).flatten(1)))


def _mixed(dtype=torch.float32):
    torch.manual_seed(0)
    m = Mixed().to(dtype).eval()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for bn in (m.bn, m.bn1d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        for norm in (m.bn, m.bn1d, m.gn, m.ln):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    return m


def _data(n=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("kind", ["margin", "loss"])
@pytest.mark.parametrize("conv", sorted(CONV_WEIGHT_GRADS))
def test_every_covered_module_equals_torch_func(kind, conv):
    model = _mixed(torch.float64)
    x, y = _data(dtype=torch.float64)
    ref = GradientComputer(model, backend="vmap")
    parts, why = layer_plan(model, ref.layout)
    assert why is None and {p.kind for p in parts} == {"linear", "conv2d", "batchnorm", "layernorm", "groupnorm"}
    lg = LayerGradients(model, ref.layout, parts)
    lg.conv_methods = {p.layer.name: conv for p in parts if p.kind == "conv2d" and p.layer.module.groups == 1}
    got, values = lg.per_example(x, y, kind)
    want = ref.per_example(x, y, kind)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        logits = model(x)
    from engine.autodiff.measurement import correct_class_margin, example_loss
    torch.testing.assert_close(values, (correct_class_margin if kind == "margin" else example_loss)(logits, y))


def test_partly_tracked_parameters_and_margin_with_loss_scale():
    """Only some parameters tracked (a bias without its weight, one norm's weight): the flat layout
    of the tracked ones; margin_and_loss_scale gives torch.func's ∇f and 1 − p_y."""
    model = _mixed()
    x, y = _data(9)
    tracked = ["conv1.bias", "bn.weight", "tok.weight", "head.weight", "head.bias"]
    auto = GradientComputer(model, tracked=tracked, backend="layers")
    ref = GradientComputer(model, tracked=tracked, backend="vmap")
    assert auto.backend == "layers" and auto.n_params == ref.n_params
    g, s = auto.margin_and_loss_scale(x, y)
    g_ref, s_ref = ref.margin_and_loss_scale(x, y)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(auto.per_example(x, y, "loss"), ref.per_example(x, y, "loss"), rtol=1e-4, atol=1e-6)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))  # one module, two calls


class UsedOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + 0.5 * F.linear(x, self.fc.weight)  # the weight used outside fc
        return self.out(h)


class MixesRows(nn.Module):
    """Centres its hidden layer over the batch: a row's output depends on the other rows (no layer rule
    sees it; only the first-batch check can)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h - 0.5 * h.mean(0, keepdim=True))


class MixesRowsDetached(MixesRows):
    """Shifts by a detached batch statistic: within the batch each row's gradient is what the closed forms
    compute, but it changes with the other rows (measured alone, as torch.func does, it is another one)."""

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h - 0.5 * h.mean(0, keepdim=True).detach())


class NeverCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))  # fc's forward never runs


def test_a_module_called_several_times_gets_the_sum_over_its_calls():
    torch.manual_seed(0)
    model = Reused().eval()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    comp = GradientComputer(model, backend="layers")
    for kind in ("margin", "loss"):
        got = comp.per_example(x, y, kind)
        assert comp.backend == "layers"
        torch.testing.assert_close(got, GradientComputer(model, backend="vmap").per_example(x, y, kind),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_cls,why", [(NeverCalled, "did not run its own forward"),
                                           (UsedOutside, "disagreed with autograd"),
                                           (MixesRows, "disagreed with autograd")])
def test_models_the_per_layer_pass_gets_wrong_fall_back_to_torch_func(model_cls, why):
    torch.manual_seed(0)
    model = model_cls().eval()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    comp = GradientComputer(model, backend="layers")
    assert comp.backend == "layers"
    got = comp.per_example(x, y)
    assert comp.backend == "vmap" and why in comp.backend_reason
    torch.testing.assert_close(got, GradientComputer(model, backend="vmap").per_example(x, y), rtol=1e-6, atol=1e-7)


def test_rows_that_interact_fall_back_even_when_the_batch_is_the_checked_rows():
    """A batch of CHECK_ROWS rows is its own reference batch, so only measuring each row alone shows that
    its value (and gradient) depends on the other rows."""
    from engine.autodiff.per_example import CHECK_ROWS

    torch.manual_seed(0)
    model = MixesRowsDetached().eval()
    x, y = torch.randn(CHECK_ROWS, 6), torch.randint(0, 3, (CHECK_ROWS,))
    comp = GradientComputer(model, backend="layers")
    got = comp.per_example(x, y)
    assert comp.backend == "vmap" and "examples that interact" in comp.backend_reason
    torch.testing.assert_close(got, GradientComputer(model, backend="vmap").per_example(x, y), rtol=1e-6, atol=1e-7)
    # a model whose rows do not interact keeps the per-layer pass on such a batch
    ok = GradientComputer(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).eval(), backend="layers")
    ok.per_example(x, y)
    assert ok.backend == "layers"


def test_models_without_per_layer_rules_say_why():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    bn_batch = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    tied[2].weight = tied[0].weight
    for model, why in ((emb, "Embedding has no per-layer gradient rule"), (bn_batch, "examples interact"),
                       (tied, "shared between modules")):
        comp = GradientComputer(model.eval())
        assert comp.backend == "vmap" and why in comp.backend_reason
        with pytest.raises(ProponentError, match="gradient backend 'layers' cannot differentiate this model"):
            GradientComputer(model, backend="layers")


def test_inputs_that_require_grad_keep_the_graph():
    """A synset being distilled (DDM) differentiates the gradients with respect to the inputs."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).eval()
    comp = GradientComputer(model, backend="layers")
    x = torch.randn(4, 5, requires_grad=True)
    g = comp.per_example(x, torch.tensor([0, 1, 2, 0]), "loss")
    assert g.requires_grad
    (gx,) = torch.autograd.grad(g.square().sum(), x)
    assert gx.abs().sum() > 0 and comp.backend == "layers"


def test_in_place_operations_after_a_layer():
    from tests.test_curvature import _twin_models

    plain, inplace = _twin_models()
    x, y = torch.randn(40, 3, 5, 5), torch.randint(0, 4, (40,))
    a = GradientComputer(inplace, backend="layers")
    got = a.per_example(x, y)
    assert a.backend == "layers" and a._layers._protect
    torch.testing.assert_close(got, GradientComputer(plain, backend="vmap").per_example(x, y), rtol=1e-5, atol=1e-6)


def test_auto_takes_the_per_layer_pass_where_it_was_measured_faster(monkeypatch):
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    assert GradientComputer(mlp).backend == "vmap" and "Linear layers only" in GradientComputer(mlp).backend_reason
    assert GradientComputer(cnn).backend == "layers"
    monkeypatch.setenv("PROPONENT_GRADIENTS", "vmap")
    assert GradientComputer(cnn).backend == "vmap"
    monkeypatch.setenv("PROPONENT_GRADIENTS", "layers")
    assert GradientComputer(mlp).backend == "layers"
    monkeypatch.setenv("PROPONENT_GRADIENTS", "fast")
    with pytest.raises(ProponentError, match="PROPONENT_GRADIENTS must be one of"):
        GradientComputer(mlp)


def test_a_failing_per_layer_pass_falls_back(monkeypatch):
    from engine.autodiff import per_layer

    def broken(*a, **k):
        raise RuntimeError("shape the closed forms did not foresee")

    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    comp = GradientComputer(cnn)
    monkeypatch.setattr(per_layer, "_part_grads", broken)
    got = comp.per_example(x, y)
    assert comp.backend == "vmap" and "per-layer pass failed (RuntimeError: shape the closed forms" in comp.backend_reason
    torch.testing.assert_close(got, GradientComputer(cnn, backend="vmap").per_example(x, y))


class Pooled(nn.Module):
    """A convolution, ReLU, max pooling and a head: the layer passes take its image batches channels_last
    on the CPU (engine.autodiff.compute.fast_layout)."""

    def __init__(self, view_after_conv: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 3)
        self.view_after_conv = view_after_conv
        self.seen: list[tuple[int, bool]] = []  # (rows, channels_last) of each forward's batch

    def forward(self, x):
        self.seen.append((len(x), x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        h = F.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv(x)))), 2)
        # .view needs the default layout's strides: such a model must keep it
        return self.head(h.view(h.shape[0], -1) if self.view_after_conv else h.flatten(1))


def test_image_batches_run_channels_last_where_the_model_agrees(monkeypatch):
    """On the CPU the per-layer gradient pass, the factorized projection, the curvature passes and
    plain forwards (predictions) give a convolutional model its image batches channels_last (max pooling and oneDNN's convolutions are
    vectorised over channels there), with the same gradients, features and covariances as the default
    layout. A model that calls .view on an activation (it raises on channels_last), one without a
    convolution, and PROPONENT_CHANNELS_LAST=0 keep the default layout."""
    from engine.autodiff import curvature as cv
    from engine.autodiff.compute import CHANNELS_LAST_ENV, fast_layout
    from engine.autodiff.factorized import FactorizedGradients
    from engine.autodiff.functional import FORWARD_PROBE_ROWS
    from engine.core.train import predict_logits

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)

    def run(model):
        torch.manual_seed(0)
        model.load_state_dict(Pooled().state_dict())  # the same weights every time
        model.eval()
        comp = GradientComputer(model, backend="layers")
        layouts = []

        def whole_batch_layout(rows=len(x)):  # of the pass's forwards over all 12 rows (not a probe or a check's few)
            flags = {cl for n, cl in model.seen if n == rows}
            model.seen.clear()
            assert len(flags) == 1
            return flags.pop()

        grads = comp.per_example(x, y, "loss")
        layouts.append(whole_batch_layout())
        feats = FactorizedGradients(model, 64).features(x, y)
        layouts.append(whole_batch_layout())
        layers, _ = cv.curvature_layers(model, None)
        cov = cv.fit_covariances(model, layers, x, y[:, None], device="cpu")
        layouts.append(whole_batch_layout())
        logits = predict_logits(model, x)  # a plain forward (predictions): the rows after its activation probe
        layouts.append(whole_batch_layout(len(x) - FORWARD_PROBE_ROWS))
        ref = GradientComputer(model, backend="vmap").per_example(x, y, "loss")
        return comp, grads, (feats, logits), cov, ref, layouts

    comp, grads, (feats, logits), cov, ref, layouts = run(Pooled())
    assert comp.backend == "layers"
    assert layouts == [True, True, True, True]  # the per-layer, factorized, covariance passes and a forward
    monkeypatch.setenv(CHANNELS_LAST_ENV, "0")
    comp0, grads0, (feats0, logits0), cov0, _, layouts0 = run(Pooled())
    assert layouts0 == [False, False, False, False]
    torch.testing.assert_close(logits, logits0, rtol=0, atol=1e-5 * float(logits0.abs().max()))
    scale = float(ref.abs().max())
    torch.testing.assert_close(grads, ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(grads, grads0, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(feats, feats0, rtol=0, atol=1e-5 * float(feats0.abs().max()))
    for k in cov0:
        torch.testing.assert_close(cov[k], cov0[k], rtol=0, atol=1e-5 * float(cov0[k].abs().max()))
    monkeypatch.delenv(CHANNELS_LAST_ENV)
    # .view after a convolution: the probe sees channels_last fail, and the passes keep working
    comp_v, grads_v, _, _, _, layouts_v = run(Pooled(view_after_conv=True))
    assert comp_v.backend == "layers" and layouts_v == [False, False, False, False]
    torch.testing.assert_close(grads_v, ref, rtol=0, atol=1e-5 * scale)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    assert fast_layout(mlp, x) is x
    assert fast_layout(Pooled().train(), x) is x  # the probe would move BatchNorm statistics


def test_a_check_that_fails_in_channels_last_is_judged_in_the_default_layout(monkeypatch):
    """Rounding in the other layout can flip a max-pool window whose two largest values nearly tie (two
    of 200 random-noise images on a BatchNorm CNN). A first-batch check that fails channels_last is
    made again in the default layout, which the model then keeps, instead of giving up the per-layer pass."""
    from engine.autodiff import per_example

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    model = Pooled().eval()
    comp = GradientComputer(model, backend="auto")
    real, calls = GradientComputer._disagrees, []

    def flaky(self, grads, xb, yb, kind):  # the channels_last pass's check "fails" once
        calls.append(kind)
        return len(calls) == 1 or real(self, grads, xb, yb, kind)

    monkeypatch.setattr(GradientComputer, "_disagrees", flaky)
    got = comp.per_example(x, y, "margin")
    assert comp.backend == "layers", comp.backend_reason
    assert calls == ["margin", "margin"]  # judged again, on the default layout's pass
    assert not [rows for rows, cl in model.seen if cl and rows == len(x)][1:]  # at most the failed pass
    model.seen.clear()
    comp.per_example(x, y, "margin")  # the default layout kept from then on
    assert model.seen and not any(cl for _, cl in model.seen)
    ref = GradientComputer(Pooled().eval(), backend="vmap")
    ref.model.load_state_dict(model.state_dict())
    torch.testing.assert_close(got, ref.per_example(x, y, "margin"), rtol=1e-5, atol=1e-6)
    assert per_example.CHECK_ROWS >= 1


def test_training_batches_run_channels_last_with_the_same_result(monkeypatch):
    """The trainer gives a convolutional model its image batches channels_last too (probed in eval mode,
    so no BatchNorm statistic moves), its recorded weights and optimizer state stay writable as
    safetensors, and the trained weights equal a default-layout run's to float32 rounding."""
    from safetensors.torch import save

    from engine.autodiff.compute import CHANNELS_LAST_ENV
    from engine.core.project import Recipe
    from engine.core.train import fit_model

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    built: list[Pooled] = []

    def build():
        built.append(Pooled())
        return built[-1]

    recipe = Recipe(epochs=2, batch_size=8, lr=0.05, momentum=0.9)
    fast = fit_model(build, x, y, recipe, record=True)
    steps = [cl for rows, cl in built[-1].seen if rows == 8]  # the training batches (not the 2-row probe)
    assert len(steps) == 6 and all(steps)
    for ck in fast.checkpoints:
        save(ck.state), save(ck.optimizer_state)  # safetensors takes only contiguous tensors
    assert any(k.endswith("momentum_buffer") for k in fast.checkpoints[-1].optimizer_state)
    monkeypatch.setenv(CHANNELS_LAST_ENV, "0")
    plain = fit_model(build, x, y, recipe)
    assert not any(cl for _, cl in built[-1].seen)
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(fast.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_low_precision_passes_take_the_per_layer_path_checked_in_float32():
    """grad_precision='bfloat16' (an option of TRAK, EK-FAC and Source): the closed forms run on the
    bfloat16 copy, and the first batch of each kind is checked in float32 against torch.func, so a model
    the per-layer pass gets wrong still falls back (a check between two bfloat16 computations would have
    to allow their per-row rounding, several per cent)."""
    model = _mixed()
    x, y = _data(16)
    for kind in ("loss", "margin"):
        ref = GradientComputer(model, backend="vmap").per_example(x, y, kind)
        low = GradientComputer(model, precision="bfloat16")
        assert low.backend == "layers" and low.backend_reason.startswith("per-layer closed forms in bfloat16")
        g = low.per_example(x, y, kind)
        assert g.dtype == torch.float32 and all(q.dtype == torch.float32 for q in model.parameters())
        assert low.backend == "layers"
        rel = float((g - ref).norm() / ref.norm())
        assert 0 < rel < 0.05, rel  # really bfloat16 (not the float32 pass), and close
        by_vmap = GradientComputer(model, precision="bfloat16", backend="vmap").per_example(x, y, kind)
        assert float((g - by_vmap).norm() / ref.norm()) < 0.05
        m, s = low.margin_and_loss_scale(x, y)
        assert m.dtype == s.dtype == torch.float32 and low.backend == "layers"
    for model_cls, why in ((NeverCalled, "did not run its own forward"), (UsedOutside, "disagreed with autograd")):
        torch.manual_seed(0)
        wrong = model_cls().eval()
        xw, yw = torch.randn(10, 6), torch.randint(0, 3, (10,))
        low = GradientComputer(wrong, precision="bfloat16", backend="layers")
        got = low.per_example(xw, yw, "loss")
        assert low.backend == "vmap" and why in low.backend_reason
        want = GradientComputer(wrong, backend="vmap").per_example(xw, yw, "loss")
        assert float((got - want).norm() / want.norm()) < 0.05


def test_accumulate_adds_each_layer_straight_into_the_callers_rows(monkeypatch):
    """EK-FAC's trajectory points add their training gradients into one float32 block: after the first
    (checked) batch, each layer's closed form is added into the block's rows, with no [b, p] gradient
    tensor assembled; the sum equals the assembled gradients' to float32 rounding, row for row."""
    from engine.autodiff import per_layer

    model = _mixed()
    x, y = _data(23)
    comp = GradientComputer(model)
    assert comp.backend == "layers"
    monkeypatch.setattr(GradientComputer, "auto_batch_size", lambda self, x: 5)  # five batches, the last of 3
    calls = []
    real = per_layer.LayerGradients.per_example
    monkeypatch.setattr(per_layer.LayerGradients, "per_example",
                        lambda self, xb, yb, kind, into=None, alpha=1.0: calls.append(into is not None) or
                        real(self, xb, yb, kind, into=into, alpha=alpha))
    base = torch.randn(23, comp.n_params)
    for kind in ("loss", "margin"):
        calls.clear()
        got = base.clone()
        comp.accumulate(x, y, kind, into=got, alpha=0.25)
        want = base + 0.25 * GradientComputer(model, backend="vmap").per_example(x, y, kind)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # the first batch of each kind is computed, checked against torch.func and added; later ones go straight in
        assert calls == [False] + [True] * 4
    with pytest.raises(ValueError, match="shape"):
        comp.accumulate(x, y, "loss", into=torch.zeros(22, comp.n_params))
    # torch.func (a model without per-layer rules) and a low-precision pass: computed, then added
    low = GradientComputer(model, precision="bfloat16")
    got = base.clone()
    low.accumulate(x, y, "loss", into=got, alpha=0.25)
    ref = 0.25 * GradientComputer(model).per_example(x, y, "loss")
    assert float((got - base - ref).norm() / ref.norm()) < 0.05


def test_a_convolution_is_timed_once_per_process_and_shape(monkeypatch):
    """The grouped/unfolded choice is timed on a layer's first batch and remembered by shape, so the next
    LayerGradients of the same model (an EK-FAC run builds one per trajectory point) reuses it untimed."""
    from engine.autodiff import per_layer as pl

    monkeypatch.setattr(pl, "_CONV_METHOD_BY_SHAPE", {})
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(pl.TIME_CONV_FROM_ROWS, 3, 8, 8)
    y = torch.randint(0, 3, (len(x),))
    calls = []
    timed = {k: (lambda f: lambda *a: calls.append(1) or f(*a))(f) for k, f in pl.CONV_WEIGHT_GRADS.items()}
    monkeypatch.setattr(pl, "CONV_WEIGHT_GRADS", timed)
    ref = GradientComputer(model, backend="vmap")
    parts, _ = layer_plan(model, ref.layout)
    first = LayerGradients(model, ref.layout, parts)
    first.per_example(x, y, "loss")
    assert len(calls) == 2 * 2 + 1  # each way twice, then the batch itself
    second = LayerGradients(model, ref.layout, parts)
    calls.clear()
    got, _ = second.per_example(x, y, "loss")
    assert len(calls) == 1 and second.conv_methods == first.conv_methods
    torch.testing.assert_close(got, ref.per_example(x, y, "loss"), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv", [dict(in_channels=4, out_channels=16, kernel_size=3, padding=1),  # 9 positions < 16
                                  dict(in_channels=4, out_channels=5, kernel_size=3, padding=1),  # 9 positions ≥ 5
                                  dict(in_channels=3, out_channels=7, kernel_size=(2, 3), stride=2, padding=(1, 0))])
def test_unfolded_convolution_weight_gradients_in_either_branch_and_layout(conv, channels_last):
    """The unfolded weight gradient reorders either the kernel-major patches (fewer positions than output
    channels) or the product (returned as a strided view, reordered by the caller's write): both equal each
    example's own autograd gradient, written into rows as per_example writes them, in either memory layout."""
    from engine.autodiff.per_layer import _conv_weight_unfolded

    torch.manual_seed(3)
    m = nn.Conv2d(**conv, bias=False).double()
    a = torch.randn(5, m.in_channels, 3, 3, dtype=torch.float64)
    g = torch.randn_like(m(a))
    want = []
    for i in range(len(a)):
        w = m.weight.detach().clone().requires_grad_(True)
        out = F.conv2d(a[i:i + 1], w, stride=m.stride, padding=m.padding)
        want.append(torch.autograd.grad((out * g[i:i + 1]).sum(), w)[0])
    if channels_last:
        a, g = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
    got = _conv_weight_unfolded(m, a, g)
    assert got.shape == (len(a), *m.weight.shape)
    rows = torch.zeros(len(a), 2 + m.weight.numel(), dtype=torch.float64)
    rows[:, 2:].view(got.shape).add_(got, alpha=0.5)  # per_example's write into a slot of a caller's block
    torch.testing.assert_close(rows[:, 2:], 0.5 * torch.stack(want).flatten(1), rtol=1e-10, atol=1e-12)
    assert rows[:, :2].abs().max() == 0
