"""Gradients, projections and the chunked feature store: determinism and resumption."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from engine import attribute
from engine.core.errors import Cancelled
from engine.autodiff import GradientComputer, correct_class_margin, make_projector
from engine.autodiff.features import featurize


def test_per_example_gradients_match_autograd(digits_project):
    p = digits_project
    model = p.load_model()
    comp = GradientComputer(model)
    x, y = p.train_dataset.x[:5], p.train_dataset.y[:5]
    G = comp.per_example(x, y, "margin")
    for i in range(5):
        model.zero_grad()
        correct_class_margin(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        ref = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        torch.testing.assert_close(G[i], ref, rtol=1e-4, atol=1e-6)


def _fake_cuda_oom(comp, monkeypatch, fits: int):
    """Make ``comp`` fail the way CUDA does when a batch holds more than ``fits`` examples."""
    real = comp.per_example
    sizes = []

    def per_example(x, y, kind="margin"):
        sizes.append(len(y))
        if len(y) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, y, kind)

    monkeypatch.setattr(comp, "per_example", per_example)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return sizes


def test_out_of_memory_batches_back_off_to_the_same_features(digits_project, monkeypatch):
    from engine.autodiff.features import project_gradients

    p = digits_project
    x, y = p.train_dataset.x[:300], p.train_dataset.y[:300]
    proj = make_projector("rademacher", GradientComputer(p.load_model()).n_params, 64, seed=0)
    want = project_gradients(GradientComputer(p.load_model()), proj, x, y, batch_size=300)
    comp = GradientComputer(p.load_model())
    sizes = _fake_cuda_oom(comp, monkeypatch, fits=70)
    got = project_gradients(comp, proj, x, y, batch_size=256)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # 256 → 128 → 64 fits; later batches start at the size that fitted
    assert sizes[:3] == [256, 128, 64] and max(sizes[3:]) == 64 and comp.max_batch == 64 and comp.oom_retries == 2
    assert comp.batch_size(example_numel=64) <= 64
    # a non-memory error is not swallowed
    monkeypatch.setattr(comp, "per_example", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        project_gradients(comp, proj, x, y)


def test_out_of_memory_at_one_example_is_one_line(digits_project, monkeypatch):
    from engine.autodiff.features import project_gradients
    from engine.core.errors import ProponentError

    p = digits_project
    comp = GradientComputer(p.load_model())
    _fake_cuda_oom(comp, monkeypatch, fits=0)
    proj = make_projector("rademacher", comp.n_params, 64, seed=0)
    with pytest.raises(ProponentError, match="CUDA out of memory at one example per batch") as e:
        project_gradients(comp, proj, p.train_dataset.x[:8], p.train_dataset.y[:8])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("precision,tol", [("bfloat16", 0.05), ("float16", 5e-3)])
def test_low_precision_gradients_are_close_and_leave_the_model_float32(digits_project, precision, tol):
    p = digits_project
    model = p.load_model()
    x, y = p.train_dataset.x[:32], p.train_dataset.y[:32]
    ref = GradientComputer(model).per_example(x, y)
    low = GradientComputer(model, precision=precision)
    g = low.per_example(x, y)
    assert g.dtype == torch.float32 and all(q.dtype == torch.float32 for q in model.parameters())
    rel = float((g - ref).norm() / ref.norm())
    assert 0 < rel < tol, rel  # not bit-equal (it really ran in low precision), but close
    assert low.outputs(x).dtype == torch.float32


def test_trak_grad_precision_is_a_separate_store(digits_project, copy_project):
    from engine.api import cached_scores

    p = copy_project(digits_project)
    # the same projection on both sides (auto would be per layer in float32, dense for bfloat16)
    a = cached_scores(p, "trak", {"proj_dim": 256, "ensemble": "final", "projection": "rademacher"})
    b = cached_scores(p, "trak", {"proj_dim": 256, "ensemble": "final", "grad_precision": "bfloat16",
                                  "projection": "rademacher"})
    assert a["key"] != b["key"]
    sa, sb = np.asarray(a["scores"], np.float64), np.asarray(b["scores"], np.float64)
    assert not np.array_equal(sa, sb)
    top_a, top_b = np.argsort(-sa, 1)[:, :10], np.argsort(-sb, 1)[:, :10]
    assert np.mean([len(set(u) & set(v)) / 10 for u, v in zip(top_a, top_b)]) > 0.8


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_projection_preserves_inner_products(kind):
    g = torch.randn(20, 5000)
    P = make_projector(kind, 5000, 2048, seed=3, model_id=1)
    z = P.project(g)
    exact = g @ g.T
    approx = z @ z.T
    rel = (approx - exact).norm() / exact.norm()
    assert rel < 0.15, rel
    # generated once per (seed, model) and deterministic
    again = make_projector(kind, 5000, 2048, seed=3, model_id=1).project(g)
    torch.testing.assert_close(z, again)
    other = make_projector(kind, 5000, 2048, seed=3, model_id=2).project(g)
    assert not torch.allclose(z, other)


def test_same_seed_same_scores(digits_project, copy_project):
    a = attribute(digits_project, "trak", settings={"proj_dim": 512, "max_models": 2})
    other = copy_project(digits_project)
    b = attribute(other, "trak", settings={"proj_dim": 512, "max_models": 2})
    np.testing.assert_array_equal(a, b)
    c = attribute(other, "trak", settings={"proj_dim": 512, "max_models": 2, "seed": 1})
    assert not np.array_equal(a, c)


def _featurize_and_die(root, folder, die_after):
    os.environ["PROPONENT_THREADS"] = "1"
    from engine import Project

    p = Project.load(root)
    comp = GradientComputer(p.load_model())
    proj = make_projector("rademacher", comp.n_params, 256, seed=0)

    def progress(stage, done, total):
        if done >= die_after:
            os._exit(9)  # a hard kill: no cleanup, no exception handlers

    featurize(comp, proj, p.train_dataset.x, p.train_dataset.y, folder, chunk_rows=200, progress=progress)


def test_killed_featurization_resumes_to_same_result(digits_project, tmp_path):
    p = digits_project
    comp = GradientComputer(p.load_model())
    proj = make_projector("rademacher", comp.n_params, 256, seed=0)
    full = featurize(comp, proj, p.train_dataset.x, p.train_dataset.y, tmp_path / "ref", chunk_rows=200).to_array()

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_featurize_and_die, args=(str(p.root), str(tmp_path / "run"), 600))
    proc.start()
    proc.join(300)
    assert proc.exitcode == 9
    done = (tmp_path / "run" / "done.bin").read_bytes()  # the done-mask: one byte per chunk
    assert 0 < done.count(1) < 8 and done.count(1) + done.count(0) == len(done), done
    assert not list((tmp_path / "run").glob("*.tmp"))  # nothing half-written

    seen = []
    store = featurize(comp, proj, p.train_dataset.x, p.train_dataset.y, tmp_path / "run", chunk_rows=200,
                      progress=lambda s, d, t: seen.append(d))
    assert seen[0] == 200 * done.count(1)  # resumed where it stopped
    np.testing.assert_array_equal(store.to_array(), full)


def test_cancelled_fit_resumes(digits_project, copy_project):
    p = copy_project(digits_project)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        attribute(p, "trak", settings={"proj_dim": 256, "max_models": 2}, cancel=cancel)
    from engine.storage.statedb import StateDB
    runs = StateDB.for_project(p).list_runs()
    assert runs[0]["status"] == "cancelled"
    S = attribute(p, "trak", settings={"proj_dim": 256, "max_models": 2})
    ref = attribute(copy_project(digits_project, "fresh"), "trak", settings={"proj_dim": 256, "max_models": 2})
    np.testing.assert_allclose(S, ref, rtol=1e-6, atol=1e-9)
    assert StateDB.for_project(p).list_runs()[0]["status"] == "done"


def test_run_cache_is_reused(digits_project, copy_project, monkeypatch):
    p = copy_project(digits_project)
    a = attribute(p, "grad-dot")
    from engine.methods import grad_dot

    def boom(*a, **k):
        raise AssertionError("refit although the run is cached")

    monkeypatch.setattr(grad_dot.GradDot, "_fit", boom)
    b = attribute(p, "grad-dot")
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_runs_differing_only_in_damping_share_the_training_stores(digits_project, logreg_project, copy_project):
    """TRAK's features and EK-FAC's training gradients sit in .proponent/features, keyed by what their rows
    depend on: another damping is a new run (new scores) that featurizes nothing, and its scores equal a
    fresh project's. Another projection seed is a new store. The stores are cache entries ``cache`` prunes."""
    from engine.api import cached_scores
    from engine.storage.cache import cache_entries

    p = copy_project(digits_project)
    trak = {"proj_dim": 256, "ensemble": "final"}
    a = cached_scores(p, "trak", trak)
    stores = sorted((p.state_dir / "features").glob("trak_*"))
    written = (stores[0] / "features" / "data.npy").stat().st_mtime_ns
    b = cached_scores(p, "trak", {**trak, "damping_scale": 1.0})
    assert b["key"] != a["key"] and not np.allclose(np.asarray(a["scores"]), np.asarray(b["scores"]))
    assert sorted((p.state_dir / "features").glob("trak_*")) == stores
    assert (stores[0] / "features" / "data.npy").stat().st_mtime_ns == written  # read, not featurized again
    # one kernel per damping beside the shared features (and the ratio rule's, which self-influence keeps)
    assert len(list(stores[0].glob("kernel_*"))) == 3
    want = cached_scores(copy_project(digits_project, "fresh"), "trak", {**trak, "damping_scale": 1.0})
    np.testing.assert_allclose(np.asarray(b["scores"]), np.asarray(want["scores"]), rtol=1e-5, atol=1e-9)
    cached_scores(p, "trak", {**trak, "seed": 1})
    assert len(list((p.state_dir / "features").glob("trak_*"))) == 2

    q = copy_project(logreg_project, "logreg")
    # float32: the walked self-scores are compared with a fit pass's, which dots unrounded gradients
    one = {"trajectory_points": 1, "gradient_dtype": "float32"}
    ek = cached_scores(q, "ekfac", one)
    grads = sorted((q.state_dir / "features").glob("grads_*"))
    assert len(grads) == 1
    before = (grads[0] / "data.npy").stat().st_mtime_ns
    ek2 = cached_scores(q, "ekfac", {**one, "damping_ratio": 0.01})
    assert sorted((q.state_dir / "features").glob("grads_*")) == grads
    assert (grads[0] / "data.npy").stat().st_mtime_ns == before  # read, not rewritten
    assert not np.allclose(np.asarray(ek["scores"]), np.asarray(ek2["scores"]))
    # self-influence: from the first run's gradient pass; the second run had no pass, so it walked its rows,
    # and got what a fresh project's fit-pass gives for that damping
    assert ek["meta"]["self_influence_rows_in_fit"] == len(q.train_dataset)
    assert ek2["meta"]["self_influence_rows_in_fit"] == 0
    fresh = cached_scores(copy_project(logreg_project, "logreg-fresh"), "ekfac",
                          {**one, "damping_ratio": 0.01})
    assert fresh["meta"]["self_influence_rows_in_fit"] == len(q.train_dataset)
    np.testing.assert_allclose(np.asarray(ek2["self_scores"]), np.asarray(fresh["self_scores"]), rtol=1e-5,
                               atol=1e-7 * float(np.abs(np.asarray(fresh["self_scores"])).max()))
    kinds = {e.kind for e in cache_entries(q.root)}
    assert {"features", "factors", "runs"} <= kinds


def test_float16_feature_store_halves_the_disk_and_keeps_the_scores(digits_project, tmp_path):
    """float16 stores take half the bytes, read back as float32 within float16's rounding, and a
    chunk out of float16's range is stored scaled rather than overflowing."""
    p = digits_project
    comp = GradientComputer(p.load_model())
    proj = make_projector("rademacher", comp.n_params, 64, seed=0)
    x, y = p.train_dataset.x[:300], p.train_dataset.y[:300]
    full = featurize(comp, proj, x, y, tmp_path / "f32", chunk_rows=128)
    half = featurize(comp, proj, x, y, tmp_path / "f16", chunk_rows=128, dtype="float16")
    size = lambda d: (d / "data.npy").stat().st_size
    assert size(tmp_path / "f16") < 0.6 * size(tmp_path / "f32")
    a, b = full.to_array(), half.to_array()
    assert b.dtype == np.float32 and np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
    np.testing.assert_allclose(half.read_rows(np.array([5, 200])), b[[5, 200]])
    # values beyond float16's range: that chunk is stored divided by a power of two, not overflowed
    from engine.storage.arrays import F16_MAX

    xb = x * 1e6
    big32 = featurize(comp, proj, xb, y, tmp_path / "big32", chunk_rows=128).to_array()
    big = featurize(comp, proj, xb, y, tmp_path / "big", chunk_rows=128, dtype="float16")
    assert np.abs(big32[:128]).max() > F16_MAX and big.scale(0) > 1
    assert np.isfinite(big.to_array()).all()
    assert np.abs(big.to_array() - big32).max() <= 1e-3 * np.abs(big32).max()
    with pytest.raises(Exception, match="feature dtype"):
        featurize(comp, proj, x, y, tmp_path / "bad", dtype="int8")


def test_trak_float16_features_give_the_same_ranking(digits_project, copy_project):
    s16 = attribute(copy_project(digits_project), "trak", "test", {"feature_dtype": "float16"}, device="cpu")
    s32 = attribute(digits_project, "trak", "test", {"feature_dtype": "float32"}, device="cpu")
    q = np.arange(20)
    top16 = np.argsort(-s16[q], axis=1)[:, :10]
    top32 = np.argsort(-s32[q], axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top16, top32)])
    assert overlap >= 0.9, overlap
    assert np.corrcoef(s16[q].ravel(), s32[q].ravel())[0, 1] > 0.999


def test_dense_projection_matrices_held_within_budget(monkeypatch):
    """An ensemble's projection matrices are regenerated bit for bit rather than all held."""
    from engine.autodiff import projection

    monkeypatch.setattr(projection, "HELD_MATRIX_BYTES", 4 * 3000 * 64 * 2)  # room for two matrices
    monkeypatch.setattr(projection, "_HELD_MATRIX", {})
    g = torch.randn(4, 3000)
    members = [make_projector("rademacher", 3000, 64, seed=0, model_id=m) for m in range(3)]
    first = [p.project(g) for p in members]
    assert len(projection._HELD_MATRIX) == 2  # the third evicted the least recently used
    again = [p.project(g) for p in members]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])


def test_hashed_rademacher_matrix_is_a_pure_function_of_its_coordinates(monkeypatch):
    """Any block of rows is the same slice of the whole matrix, whatever the generation block
    (so CPU and GPU, full and blocked generation, agree); entries are ±1 and look independent."""
    from engine.autodiff import projection

    full = projection.rademacher_rows(11, 0, 3000, 200, "cpu")
    monkeypatch.setattr(projection, "HASH_BLOCK_ENTRIES", 64 * 4 * 3)  # three rows per block
    torch.testing.assert_close(projection.rademacher_rows(11, 1234, 1300, 200, "cpu"), full[1234:1300], rtol=0, atol=0)
    assert set(full.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(full.mean())) < 4 / (3000 * 200) ** 0.5
    cols = (full.T @ full / 3000).fill_diagonal_(0).abs().max()
    rows = (full[:300] @ full[:300].T / 200).fill_diagonal_(0).abs().max()
    assert cols < 6 / 3000 ** 0.5 and rows < 6 / 200 ** 0.5, (cols, rows)
    other = projection.rademacher_rows(12, 0, 3000, 200, "cpu")
    assert abs(float((other * full).mean())) < 4 / (3000 * 200) ** 0.5
    # a width that is not a multiple of 64 uses the leading bits of the same words
    torch.testing.assert_close(projection.rademacher_rows(11, 0, 10, 70, "cpu"),
                               projection.rademacher_rows(11, 0, 10, 128, "cpu")[:, :70], rtol=0, atol=0)


def test_sketch_buckets_are_a_sparse_jl_transform_of_the_coordinates():
    """The embedding sketch's buckets and signs: a pure function of (seed, coordinate), in range,
    ±1/√c, spread evenly, and the sketch keeps inner products of sparse vectors (JL) where its
    width allows."""
    from engine.autodiff import projection

    coords = torch.arange(200_000)
    b, s = projection.sketch_buckets(5, coords, 1000, 4)
    assert b.shape == s.shape == (4, 200_000) and int(b.min()) >= 0 and int(b.max()) < 1000
    assert set(s.unique().tolist()) == {-0.5, 0.5} and abs(float(s.mean())) < 0.01
    counts = torch.bincount(b[0], minlength=1000).float()
    assert float(counts.std() / counts.mean()) < 0.2  # about 200 per bucket, Poisson spread 0.07
    some = torch.tensor([[7, 123_456], [99_999, 3]])
    b2, s2 = projection.sketch_buckets(5, some, 1000, 4)
    assert torch.equal(b2, b[:, some]) and torch.equal(s2, s[:, some])  # any shape, same values
    assert not torch.equal(projection.sketch_buckets(6, coords[:50], 1000, 4)[0], b[:, :50])

    def sketch(idx, val, k):
        bb, ss = projection.sketch_buckets(5, idx, k, 4)
        out = torch.zeros(k, dtype=torch.float64)
        for j in range(4):
            out.index_add_(0, bb[j], val * ss[j].double())
        return out

    gen = torch.Generator().manual_seed(0)
    errs = []
    for _ in range(20):  # two sparse vectors sharing half their support, in a 10^7-dimensional space
        idx = torch.randint(0, 10**7, (600,), generator=gen).unique()
        x, y = torch.randn(len(idx), generator=gen, dtype=torch.float64), torch.randn(len(idx), generator=gen, dtype=torch.float64)
        y[::2] = x[::2]
        exact = float(x @ y)
        errs.append(abs(float(sketch(idx, x, 4096) @ sketch(idx, y, 4096)) - exact) / float(x.norm() * y.norm()))
    assert float(np.median(errs)) < 0.03, errs


def test_hashed_rademacher_matches_a_plain_python_splitmix64():
    """Golden values: the tensor arithmetic (wrapping int64, emulated logical shifts, the byte view)
    equals splitmix64 written with Python integers, entry (i, j) = bit j mod 64 of word (i, j // 64)."""
    from engine.autodiff import projection

    M = 2**64

    def word(seed, index):
        z = (index * 0x9E3779B97F4A7C15 + seed * 0xD1B54A32D192ED03) % M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
        return z ^ (z >> 31)

    seed, k = 987654321, 150
    words = -(-k // 64)
    got = projection.rademacher_rows(seed, 5, 9, k, "cpu")
    want = torch.tensor([[1.0 if (word(seed, i * words + j // 64) >> (j % 64)) & 1 else -1.0 for j in range(k)]
                         for i in range(5, 9)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hashed_rademacher_is_the_same_on_cuda():
    from engine.autodiff import projection

    torch.testing.assert_close(projection.rademacher_rows(3, 0, 500, 2048, "cuda").cpu(),
                               projection.rademacher_rows(3, 0, 500, 2048, "cpu"), rtol=0, atol=0)


def test_batches_count_the_activations_autograd_saves():
    """A model with few parameters and large activations gets batches bounded by what autograd saves
    per example, measured once (two rows minus one, each saved tensor once), not by its [p] gradients."""
    from torch import nn

    from engine.autodiff.per_example import ACTIVATION_FACTOR

    torch.manual_seed(0)
    # 1x1 convolutions to 32 channels over 32x32 images: each ReLU output (32·32·32 float32, 128 KiB)
    # is saved once though two operations save it; 4,419 parameters
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 3))
    comp = GradientComputer(model, memory_budget_mb=16, backend="vmap")
    x, y = torch.randn(300, 3, 32, 32), torch.randint(0, 3, (300,))
    saved = comp.saved_bytes_per_example(x)
    relu_out, image = 32 * 32 * 32 * 4, 3 * 32 * 32 * 4
    assert 2 * relu_out <= saved <= 2 * relu_out + image  # the two ReLU outputs, and the image the first conv keeps
    per_example = 4 * (3 * comp.n_params + 8 * 3 * 32 * 32) + ACTIVATION_FACTOR * saved
    assert comp.batch_size(3 * 32 * 32, saved) == int(16 * 2**20 // per_example) < 20
    # the computer's own batches use it, and their gradients equal one whole-batch pass
    got = list(comp.iter_batches(x[:60], y[:60], "loss"))
    assert max(hi - lo for lo, hi, _ in got) == int(16 * 2**20 // per_example)
    want = comp.per_example(x[:60], y[:60], "loss")
    torch.testing.assert_close(torch.cat([g for _, _, g in got]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("projection", ["auto", "rademacher"])  # per layer (factorized), or the gradient computer's
def test_trak_takes_the_loss_scale_from_its_featurization_pass_and_keeps_it_beside_the_features(
        digits_project, copy_project, monkeypatch, projection):
    """TRAK's Q_i = 1 − p(y_i|x_i) comes from the featurization's own forward pass (no second pass over the
    training set), is kept beside the features and read back by a run with another damping, and is rebuilt by a
    forward pass where a store lacks it. Every way, it is 1 − p(y|x) of the member's model."""
    import shutil

    from engine.api import fit_method
    from engine.autodiff import factorized, per_example

    p = copy_project(digits_project)
    forward_rows = []
    for cls in (factorized.FactorizedGradients, per_example.GradientComputer):
        monkeypatch.setattr(cls, "outputs", lambda self, x, batch=4096, orig=cls.outputs:
                            forward_rows.append(len(x)) or orig(self, x, batch))
    settings = {"proj_dim": 256, "ensemble": "final", "projection": projection}
    att, _ = fit_method(p, "trak", settings)
    assert forward_rows == []  # the featurization's pass gave Q
    assert att.meta["projection"]["kind"] == ("factorized" if projection == "auto" else "dense-rademacher")
    model = p.load_model(p.final_checkpoints()[0]).double().eval()
    ds = p.train_dataset
    with torch.no_grad():
        probs = torch.softmax(model(ds.x[torch.arange(len(ds))].double()), -1)
    want = 1 - probs[torch.arange(len(ds)), ds.y].numpy()
    np.testing.assert_allclose(att.q, want, rtol=2e-5, atol=1e-7)
    companion = att.feature_members[0].store.folder / "margin_scale"
    assert (companion / "data.npy").is_file()

    again, _ = fit_method(p, "trak", {**settings, "damping_scale": 1.0})
    assert forward_rows == [] and np.array_equal(again.q, att.q)  # read back, not recomputed

    shutil.rmtree(companion)  # a store written before the companion existed
    rebuilt, _ = fit_method(p, "trak", {**settings, "damping_scale": 2.0})
    assert sum(forward_rows) == len(ds) and (companion / "data.npy").is_file()
    np.testing.assert_allclose(rebuilt.q, att.q, rtol=1e-5, atol=1e-7)
