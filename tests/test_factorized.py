"""The per-layer (Kronecker-factored) projection: features equal P_outᵀ G P_in of the exact
per-example gradients, without forming them; wired into TRAK as projection = "factorized"."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.autodiff.curvature import LayerBlocks, covered_param_names
from engine.autodiff.factorized import SKETCH_C, FactorizedGradients, factor_dims, factorized_layers
from engine.autodiff.per_example import GradientComputer
from engine.autodiff.projection import sketch_buckets
from engine.core.errors import ProponentError


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)  # left out of the factorisation
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, bias=False)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


class TinyText(nn.Module):
    """Token inputs as a dict; a Linear over every position (T = tokens), then a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)  # a gather of P_in's rows, none for padding
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, batch):
        h = torch.tanh(self.proj(self.emb(batch["input_ids"])))  # [b, tokens, 5]
        m = batch["attention_mask"].unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


class Categorical(nn.Module):
    """A table's categorical column as one id per row (ids [b]) through an embedding, beside numbers."""

    def __init__(self):
        super().__init__()
        self.cat = nn.Embedding(7, 3)
        self.head = nn.Linear(3 + 2, 4)

    def forward(self, x):  # [b, 3]: the id, then two numbers
        return self.head(torch.cat([self.cat(x[:, 0].long()), x[:, 1:]], 1))


class Recurrent(nn.Module):
    """One Linear cell called once per step (and an input Linear once per step): gradients sum over calls."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.cell = nn.Linear(5, 5)
        self.out = nn.Linear(5, 4)

    def forward(self, x):  # [b, steps, 3]
        h = torch.zeros(len(x), 5, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(h) + self.inp(x[:, t]))
        return self.out(h)


class ConvVariants(nn.Module):
    """Convolutions whose projected patches come from the layer's own convolution: dilated with 'same' padding
    (called twice, on the input and on its mirror image: its patches sum over both calls), and a strided 1×2
    kernel with uneven padding."""

    def __init__(self):
        super().__init__()
        self.dil = nn.Conv2d(2, 6, 3, padding="same", dilation=2)
        self.wide = nn.Conv2d(6, 5, (1, 2), stride=(2, 1), padding=(0, 1), bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.dil(x) + self.dil(x.flip(-1)))
        return self.fc(torch.tanh(self.wide(h)).mean((2, 3)))


class TinyTransformer(nn.Module):
    """Tokens [b, T, 4] through a Linear, one nn.TransformerEncoderLayer and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.embed(x)).mean(1))


def _models():
    from engine.core.data import TensorDict

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 4))
    cnn = SmallCNN()
    cnn.bn.running_mean.uniform_(-0.5, 0.5)
    ids = torch.randint(1, 20, (9, 4))
    ids[1, 2:] = 0  # padding inside the sequence
    ids[4, 0] = ids[4, 3]  # a token twice in one example: its rows sum
    mask = torch.ones(9, 4, dtype=torch.long)
    mask[::2, 3] = 0
    text = TensorDict({"input_ids": ids, "attention_mask": mask})
    table = torch.cat([torch.randint(0, 7, (9, 1)).float(), torch.randn(9, 2)], 1)
    return [(mlp, torch.randn(9, 7), 4), (cnn, torch.randn(9, 3, 8, 8), 5), (TinyText(), text, 3),
            (Recurrent(), torch.randn(9, 4, 3), 4), (Categorical(), table, 4), (ConvVariants(), torch.randn(9, 2, 7, 6), 3)]


def _expected_features(fg: FactorizedGradients, model, x, y, kind) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The features from each covered layer's exact per-example gradient (``torch.func``, every
    parameter): P_outᵀ G P_in for a Linear/Conv2d layer; for an embedding, its flat [V, d] weight
    gradient times the sketch's dense [V·d, k] matrix (or the gradient itself when kept whole).
    Also the exact gradients, per layer."""
    gc = GradientComputer(model, tracked=covered_param_names(fg.layers))
    exact = gc.per_example(x, y, kind)
    feats, grads = [], []
    for L, po, pi, dims, seed in zip(fg.layers, fg.p_out, fg.p_in, fg.dims, fg.sketch_seed):
        if L.kind == "embedding":
            slot = gc.layout[L.weight]
            g = exact[:, slot.offset:slot.offset + slot.numel]
            k = dims[0] * dims[1]
            if k == slot.numel:
                feats.append(g)
            else:
                buckets, signs = sketch_buckets(seed, torch.arange(slot.numel), k, SKETCH_C)
                dense = torch.zeros(slot.numel, k)
                for j in range(SKETCH_C):
                    dense[torch.arange(slot.numel), buckets[j]] += signs[j]
                feats.append(g @ dense)
        else:
            (g,) = LayerBlocks([L], gc.layout).to_layers(exact)
            # a side at the layer's full width is the identity, not a square random factor
            p_out = torch.eye(L.out_dim) if dims[0] == L.out_dim else po.matrix
            p_in = torch.eye(L.in_dim) if dims[1] == L.in_dim else pi.matrix
            assert (po is None) == (dims[0] == L.out_dim) and (pi is None) == (dims[1] == L.in_dim)
            feats.append(torch.einsum("ok,noi,ij->nkj", p_out, g, p_in).reshape(len(x), -1))
        grads.append(g)
    return torch.cat(feats, 1), grads


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["margin", "loss"])
def test_features_equal_the_kronecker_projection_of_exact_gradients(which, kind):
    model, x, classes = _models()[which]
    y = torch.arange(len(x)) % classes
    fg = FactorizedGradients(model, 64, seed=3, model_id=1)
    if which in (1, 5):  # every convolution's input side projected: P_in as filters over the layer's input
        assert all(pi is not None for L, pi in zip(fg.layers, fg.p_in) if L.kind == "conv2d")
    want, grads = _expected_features(fg, model, x, y, kind)
    got = torch.cat([f for _, _, f in fg.iter_batches(x, y, kind, batch_size=4)])
    assert got.shape == (len(x), fg.out_dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    if which == 1:
        assert "bn.weight" in fg.left_out and "bn.bias" in fg.left_out  # named, not silently dropped
        assert fg.projector.describe()["left_out"] == ["bn.bias", "bn.weight"]  # and in the run's metadata
    if which in (2, 4):  # the embeddings are covered: a 20 × 6 table sketched, a 7 × 3 one kept whole
        assert [L.kind for L in fg.layers][0] == "embedding" and not fg.left_out
        assert fg.covered == fg.fm.layout.n
        sketch = fg.projector.describe()["layers"][0]
        assert sketch["sketch"] == ("sjlt" if which == 2 else "exact") and sketch["k"] < 120
    if which == 2:
        assert fg._positions(x) == 4
        assert float(grads[0][1, :6].abs().sum()) == 0.0  # the padding row's exact gradient is zero


def test_embeddings_the_factorisation_cannot_follow_are_left_out_with_the_reason():
    class Tied(nn.Module):  # input and output embeddings share one weight (language-model style)
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.freq = nn.Embedding(11, 4, scale_grad_by_freq=True)
            self.out = nn.Linear(4, 11, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out((self.emb(ids) + self.freq(ids)).mean(1))

    layers, left_out = factorized_layers(Tied())
    assert layers == []  # neither the tied Linear nor either embedding
    assert "shared" in left_out["emb.weight"] and "scale_grad_by_freq" in left_out["freq.weight"]
    with pytest.raises(ProponentError, match="Embedding layers; this model has none"):
        FactorizedGradients(Tied(), 16)


def test_factor_dims_split_k_over_layers_within_each_layer():
    model = _models()[1][0]
    fg = FactorizedGradients(model, 96)
    dims = factor_dims(fg.layers, 96)  # layers (out × in): conv1 6 × 28, conv2 8 × 54, fc 5 × 73
    assert len(dims) == 3 and all(a <= L.out_dim and b <= L.in_dim for (a, b), L in zip(dims, fg.layers))
    assert fg.out_dim == sum(a * b for a, b in dims) and 80 <= fg.out_dim <= 96
    # a 5-class head gets k_out ≤ 5 and gives the rest of its share to the input side
    assert dims[-1][0] <= 5 and dims[-1][0] * dims[-1][1] >= 25
    # a layer that fits its share keeps every entry, and the rest goes to the others
    tiny = factor_dims(fg.layers, 3 * 6 * 28 + 200)
    assert tiny[0] == (6, 28) and sum(a * b for a, b in tiny) > 3 * 6 * 28


def test_trak_runs_with_the_factorized_projection(tmp_path):
    from tests.conftest import write_tabular_project

    from engine import Project
    from engine.api import cached_scores
    from engine.core.train import record_training

    root = write_tabular_project(tmp_path / "tab", n_train=120, n_test=10, d=6)
    record_training(Project.load(root))
    p = Project.load(root)
    r = cached_scores(p, "trak", {"ensemble": "final", "projection": "factorized", "proj_dim": 8})
    assert r["meta"]["projection"]["kind"] == "factorized" and r["scores"].shape == (10, 120)
    assert np.isfinite(np.asarray(r["scores"])).all()
    dense = cached_scores(p, "trak", {"ensemble": "final", "projection": "rademacher", "proj_dim": 8})
    assert not np.allclose(np.asarray(dense["scores"]), np.asarray(r["scores"]))  # another projection, another run
    # the app's top-k index projects new queries with the same per-layer factors
    from engine.api import fit_method
    from engine.workflows.index import InfluenceIndex

    att, _ = fit_method(p, "trak", {"ensemble": "final", "projection": "factorized", "proj_dim": 8})
    q = att._queries(("test", np.arange(10)))
    index = InfluenceIndex(att, backend="exact")
    got = index.search(index.query_vectors(q.x, q.y), 5)
    assert np.array_equal(got["proponents"], att.topk(q, k=5)["proponents"])
    np.testing.assert_allclose(np.asarray(r["scores"]), att.scores(q), rtol=1e-5, atol=1e-6 * np.abs(att.scores(q)).max())


def test_curvature_methods_refuse_the_factorized_projection(tmp_path):
    from engine.core.errors import ProponentError
    from engine.methods.settings import CurvatureSettings

    with pytest.raises(ProponentError, match="factorized"):
        CurvatureSettings(projection="factorized").projection_plan(10**6, 100)


def test_out_of_memory_batches_back_off_to_the_same_features(monkeypatch):
    """The factorized path shares the gradient computer's back-off: a batch that runs out of CUDA
    memory is retried at half the size, the size sticks, and the features are unchanged."""
    model, x, classes = _models()[1]
    y = torch.arange(len(x)) % classes
    fg = FactorizedGradients(model, 64)
    want = torch.cat([f for _, _, f in fg.iter_batches(x, y, batch_size=9)])
    real, sizes = fg.features, []

    def capped(xb, yb, kind="margin"):
        sizes.append(len(yb))
        if len(yb) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(xb, yb, kind)

    monkeypatch.setattr(fg, "features", capped)
    got = torch.cat([f for _, _, f in fg.iter_batches(x, y, batch_size=8)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2 and fg.max_batch == 2 and fg.oom_retries == 2


def test_a_layer_whose_forward_never_runs_is_named():
    """A Linear whose weight the model applies itself (F.linear) has no capture: one line naming it."""
    from engine.core.errors import ProponentError
    from tests.test_per_layer import NeverCalled

    fg = FactorizedGradients(NeverCalled().eval(), 16)
    with pytest.raises(ProponentError, match="layer 'fc' \\(Linear\\) holds tracked parameters but its forward never ran"):
        fg.features(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))


def test_attention_output_projections_are_left_out_not_captured():
    """nn.MultiheadAttention applies out_proj's weight itself: EK-FAC and the factorized projection
    leave it out (named) instead of failing on a capture that never happens."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    fg = FactorizedGradients(model, 32)
    assert "enc.self_attn.out_proj.weight" in fg.left_out
    assert [L.name for L in fg.layers] == ["embed", "enc.linear1", "enc.linear2", "head"]
    x, y = torch.randn(5, 6, 4), torch.tensor([0, 1, 2, 0, 1])
    want, _ = _expected_features(fg, model, x, y, "margin")
    torch.testing.assert_close(fg.features(x, y, "margin"), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_auto_projection_per_method_family():
    """TRAK's "auto" is factorized wherever the layers it covers hold ≥ 90% of the parameters;
    Grad-Dot/Cos and TracIn take it on models with a convolution and where the dense rule would be
    SJLT over a huge gradient, and keep the dense Rademacher projection elsewhere."""
    from engine.autodiff.functional import FunctionalModel
    from engine.methods.gradsim import GradSimSettings
    from engine.methods.trak import TrakSettings

    class BagOfWords(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.emb = nn.Embedding(vocab, 8, padding_idx=0)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    mlp = FunctionalModel(nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 3)))  # 10,403 parameters
    big = FunctionalModel(BagOfWords(2**15))  # 262,171 parameters: 2048 × that is past 2^28
    assert TrakSettings().resolved_projection(mlp, 500) == ("factorized", 2048)
    assert TrakSettings().resolved_projection(big, 500) == ("factorized", 2048)
    assert GradSimSettings().resolved_projection(mlp, 500) == ("auto", 2048)
    assert GradSimSettings().resolved_projection(big, 500) == ("factorized", 2048)
    # an explicit choice is kept, and a model the factorisation barely covers stays dense (SJLT)
    assert GradSimSettings(projection="sjlt").resolved_projection(big, 500) == ("sjlt", 2048)
    norm = FunctionalModel(nn.Sequential(nn.LayerNorm(300_000), nn.Linear(300_000, 2)))
    assert GradSimSettings().resolved_projection(norm, 500) == ("auto", 2048)
    # an image CNN far below 2^28 entries: factorized too (equal LDS on three CNNs, about 4x faster);
    # one whose normalisation holds most of the parameters stays dense
    cnn = FunctionalModel(nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 36, 10)))
    assert cnn.n_params * 2048 < 2**28 and GradSimSettings().resolved_projection(cnn, 500) == ("factorized", 2048)
    conv_norm = FunctionalModel(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.LayerNorm(20_000), nn.Linear(20_000, 2)))
    assert GradSimSettings().resolved_projection(conv_norm, 500) == ("auto", 2048)
