"""Streamed scoring: TRAK's chunked k×k kernel equals the dense formula, scores reach disk block by
block, and the running top-k equals a full sort."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine import Project
from engine.api import cached_scores, fit_method
from engine.autodiff.features import project_gradients
from engine.methods.trak import solve_kernel
from engine.storage.arrays import ChunkedArray, load_npy
from engine.storage.blocks import RunningTopK, iter_row_blocks, write_blocks


@pytest.fixture
def project(digits_project, tmp_path):
    dest = tmp_path / "digits"
    shutil.copytree(digits_project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    return Project.load(dest)


def _dense_trak(att, project, queries):
    """TRAK from its definition with every array in memory: Ψ = Φ(ΦᵀΦ+λI)⁻¹, S = mean_m φ_q Ψᵀ ⊙ Q."""
    total = 0
    for m, lam in zip(att._proj, att.meta["lambda"]):
        phi = m.store.to_array().astype(np.float64)
        psi, _ = solve_kernel(phi, lam, att.settings.damping_ratio)  # the λ the fit chose (training-time rule)
        phi_q = project_gradients(m.computer, m.projector, queries.x, queries.y, "margin").numpy().astype(np.float64)
        total = total + phi_q @ psi.T
    return total / len(att._proj) * att.q[None, :]


@pytest.mark.parametrize("proj_dim", [64, 0])  # 64 ≤ n: streamed primal form; 0 = all parameters > n: dual form
def test_streamed_trak_equals_the_dense_formula(project, proj_dim):
    # float32 features: the comparison is exact (float16 storage is tested in test_features.py)
    att, _ = fit_method(project, "trak", {"proj_dim": proj_dim, "ensemble": "final", "feature_dtype": "float32"})
    n = len(project.train_dataset)
    primal = not att._proj[0].dual
    assert primal == (att._proj[0].projector.out_dim <= n)
    assert att.meta["kernel_form"].startswith("primal" if primal else "dual")
    q = att._queries(("test", np.arange(40)))
    S = att.scores(q)
    np.testing.assert_allclose(S, _dense_trak(att, project, q), rtol=1e-6, atol=1e-9 * np.abs(S).max())
    # self-scores: the diagonal of the train × train scores of the ratio rule's kernel (which the default
    # keeps for self-influence; test scores use the training-time ridge)
    ratio, _ = fit_method(project, "trak", {"proj_dim": proj_dim, "ensemble": "final", "feature_dtype": "float32",
                                            "damping_rule": "ratio"})
    tr = ratio._queries(("train", np.arange(30)))
    np.testing.assert_allclose(ratio.self_scores()[:30], np.diag(ratio.scores(tr)[:, :30]), rtol=1e-6,
                               atol=1e-9 * np.abs(S).max())
    np.testing.assert_allclose(att.self_scores(), ratio.self_scores(), rtol=1e-9)


def test_chunk_size_does_not_change_the_kernel(tmp_path):
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(500, 40)).astype(np.float32)
    from engine.methods.trak import accumulate_gram, primal_kernel_inverse

    for rows in (7, 128, 500):
        store = ChunkedArray(tmp_path / f"s{rows}", len(phi), rows)
        for c in range(store.n_chunks):
            lo, hi = store.chunk_bounds(c)
            store.write_chunk(c, phi[lo:hi])
        M, lam = primal_kernel_inverse(*accumulate_gram(store), -1.0, 10.0)
        psi, lam_dense = solve_kernel(phi, -1.0, 10.0)
        assert lam == pytest.approx(lam_dense)
        np.testing.assert_allclose(phi.astype(np.float64) @ M, psi, rtol=1e-7, atol=1e-12)


def test_primal_kernel_inverse_is_the_exact_symmetric_inverse_and_survives_a_rank_deficient_gram():
    """M = (ΦᵀΦ + λI)⁻¹ through the Cholesky factor: the inverse to rounding, exactly symmetric; with λ = 0 on a
    rank-deficient Gram (no Cholesky factor) the pseudo-inverse, finite and symmetric."""
    from engine.methods.trak import primal_kernel_inverse

    rng = np.random.default_rng(3)
    phi = rng.normal(size=(300, 60))
    gram = phi.T @ phi
    M, lam = primal_kernel_inverse(gram, 300, -1.0, 0.1)
    assert lam == pytest.approx(0.1 * np.trace(gram) / 60)
    np.testing.assert_allclose(M, np.linalg.inv(gram + lam * np.eye(60)), rtol=1e-10, atol=1e-14)
    assert np.array_equal(M, M.T)
    low = phi[:, :10] @ rng.normal(size=(10, 60))  # rank 10 of 60
    P, lam0 = primal_kernel_inverse(low.T @ low, 300, 0.0, 0.1)
    assert lam0 == 0.0 and np.isfinite(P).all() and np.array_equal(P, P.T)
    np.testing.assert_allclose(P, np.linalg.pinv(low.T @ low), rtol=1e-6, atol=1e-9)


def test_cached_scores_are_the_blocks_written_to_disk(project, monkeypatch):
    from engine.methods.base import Attributor

    blocks = []
    orig = Attributor.score_blocks

    def counting(self, queries="test", block=None):
        for lo, hi, b in orig(self, queries, block):
            blocks.append((lo, hi))
            yield lo, hi, b

    monkeypatch.setattr(Attributor, "query_block", 37)  # several blocks, the last one partial
    monkeypatch.setattr(Attributor, "score_blocks", counting)
    res = cached_scores(project, "knn")  # kNN scores by query blocks (no column pass)
    n_test = len(project.test_dataset)
    assert blocks == [(lo, min(n_test, lo + 37)) for lo in range(0, n_test, 37)]
    assert isinstance(res["scores"], np.memmap)  # read back from disk, not held
    att, _ = fit_method(project, "knn")
    np.testing.assert_allclose(res["scores"], att.scores("test").astype(np.float32), rtol=1e-6)


def test_write_blocks_is_all_or_nothing(tmp_path):
    a = np.arange(20, dtype=np.float32).reshape(5, 4)
    path = write_blocks(tmp_path / "m.npy", a.shape, iter_row_blocks(a, 2))
    assert np.array_equal(load_npy(path), a)

    def broken():
        yield 0, 2, a[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_blocks(tmp_path / "m.npy", a.shape, broken())
    assert np.array_equal(load_npy(path), a)  # the old file stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy"]  # no temporary left
    with pytest.raises(RuntimeError, match="3 of 5 rows"):
        write_blocks(tmp_path / "x.npy", a.shape, iter_row_blocks(a[:3], 2))


def test_running_topk_equals_a_full_sort():
    rng = np.random.default_rng(0)
    S = np.round(rng.normal(size=(6, 103)), 1)  # rounded: many ties
    top = RunningTopK(6, 9)
    for lo in range(0, 103, 10):
        top.update(lo, S[:, lo:lo + 10])
    r = top.result()
    want_top = np.argsort(-S, axis=1, kind="stable")[:, :9]
    want_bot = np.argsort(S, axis=1, kind="stable")[:, :9]
    assert np.array_equal(r["proponents"], want_top) and np.array_equal(r["opponents"], want_bot)
    assert np.array_equal(r["proponent_scores"], np.take_along_axis(S, want_top, 1))


def test_trak_column_pass_equals_query_blocks(project):
    from engine.autodiff.threads import intra_op_threads

    att, _ = fit_method(project, "trak", {"proj_dim": 64, "ensemble": "checkpoints", "max_models": 2})
    assert len(att._proj) == 2
    # with the thread count the run scores with (measured per machine): float32 query gradients
    # round differently under another count, which a per-element rtol would see on small scores
    with intra_op_threads(att.meta["threads"]):
        S = att.scores("test")
        cols = att.score_columns("test")
        assert cols is not None
        got = np.zeros_like(S)
        widths = []
        for lo, hi, block in cols:
            got[:, lo:hi] = block
            widths.append(hi - lo)
    assert len(widths) > 1 or len(project.train_dataset) <= 1024
    # float32 products over the float16 store (TRAK v9): the column pass sums the members' blocks in float32,
    # the query blocks in float64, so they agree to float32 rounding
    np.testing.assert_allclose(got, S, rtol=1e-6, atol=1e-7 * np.abs(S).max())
    res = cached_scores(project, "trak", {"proj_dim": 64, "ensemble": "checkpoints", "max_models": 2})
    np.testing.assert_allclose(res["scores"], S.astype(np.float32), rtol=1e-6)


def test_column_blocks_write(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_blocks(tmp_path / "c.npy", a.shape, ((lo, lo + 2, a[:, lo:lo + 2]) for lo in (0, 2)), axis=1)
    assert np.array_equal(load_npy(path), a)


@pytest.mark.parametrize("method,settings", [("trak", {"proj_dim": 64, "ensemble": "checkpoints", "max_models": 2}),
                                             ("grad-dot", {}), ("ekfac", {"trajectory_points": 2})])
def test_score_columns_stay_within_the_score_block_budget(project, monkeypatch, method, settings):
    """With many queries a training chunk's column block is cut into slices whose [n_queries, columns]
    float64 scores keep to SCORE_BLOCK_BYTES (here: 7 columns), and the slices equal the scores."""
    from engine.methods.base import Attributor

    att, _ = fit_method(project, method, settings)
    q = ("test", np.arange(len(project.test_dataset)))
    n_q, n = len(q[1]), len(project.train_dataset)
    want = att.scores(q)
    monkeypatch.setattr(Attributor, "SCORE_BLOCK_BYTES", 8 * 4 * n_q * 7)
    cols = att.score_columns(q)
    assert cols is not None
    got, widths = np.full((n_q, n), np.nan), []
    for lo, hi, block in cols:
        assert block.shape == (n_q, hi - lo)
        got[:, lo:hi] = block
        widths.append(hi - lo)
    assert max(widths) == 7 and sum(widths) == n
    # bfloat16 products round each score to 8 bits; a narrower product may round the other way (one unit). Float32
    # products (EK-FAC on a CPU without bfloat16 GEMMs): a narrower product is another GEMM kernel, summing in another
    # order, a few float32 units of the largest score apart (2.7e-7 of 1.5 seen on an AVX2 EPYC; 1e-7 was below one)
    rtol = 2.0 ** -7 if getattr(att, "bf16_products", False) else 1e-5
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6 * np.abs(want).max())


def test_influence_index_matches_trak_scores(project):
    from engine.workflows.index import InfluenceIndex, head_rows, plan_index, recall_at_k

    att, _ = fit_method(project, "trak", {"proj_dim": 64, "ensemble": "checkpoints", "max_models": 2,
                                          "projection": "rademacher"})
    q = att._queries(("test", np.arange(30)))
    want = att.topk(q, k=10)
    exact = InfluenceIndex(att, backend="exact")
    u = exact.query_vectors(q.x, q.y)
    got = exact.search(u, 10)
    assert np.array_equal(got["proponents"], want["proponents"]) and np.array_equal(got["opponents"], want["opponents"])
    np.testing.assert_allclose(got["proponent_scores"], want["proponent_scores"], rtol=1e-4,
                               atol=1e-6 * np.abs(want["proponent_scores"]).max())
    flat = InfluenceIndex(att, backend="faiss")
    assert flat.plan.kind == "flat"
    res = flat.search(u, 10)
    assert recall_at_k(res["proponents"], want["proponents"]) == 1.0
    assert recall_at_k(res["opponents"], want["opponents"]) == 1.0
    ivf = InfluenceIndex(att, backend="faiss", kind="ivfpq")
    assert ivf.plan.kind == "ivfpq" and ivf.plan.dim % ivf.plan.m == 0 and ivf.plan.dim > 128
    approx = ivf.search(u, 10)
    # membership is approximate, scores are exact: re-scored from the on-disk features
    S = att.scores(q)
    np.testing.assert_allclose(approx["proponent_scores"], np.take_along_axis(S, approx["proponents"], 1),
                               rtol=1e-4, atol=1e-6 * np.abs(S).max())
    # the rows of largest norm are kept out of IVF-PQ and scanned exactly: each of them in a query's exact
    # top-10 is found, whatever product quantisation makes of the rest
    v = np.concatenate([c for _, _, c in exact._train_chunks()])
    h = head_rows(len(v), v.shape[1])
    assert 0 < h < len(v) and ivf.index.ntotal == len(v) - h
    assert set(ivf._head_ids) == set(np.argsort(-np.linalg.norm(v, axis=1))[:h])
    for key in ("proponents", "opponents"):
        in_head = [set(w) & set(ivf._head_ids) for w in want[key]]
        assert sum(map(len, in_head)) >= 10  # the check below has rows to find
        assert all(hw <= set(a) for hw, a in zip(in_head, approx[key]))
    r_default = recall_at_k(approx["proponents"], want["proponents"])
    ivf.index.nprobe = ivf.plan.nlist  # every list probed: only PQ's ranking of candidates is approximate
    r_all = recall_at_k(ivf.search(u, 10)["proponents"], want["proponents"])
    assert r_all >= 0.95 and r_all >= r_default, (r_all, r_default)
    assert plan_index(2_000_000, 2048).kind == "ivfpq" and plan_index(1000, 16).kind == "flat"


def test_resident_exact_index_equals_the_streamed_scan(project):
    """The GPU path (training vectors held on the device, one matmul + top-k per query block),
    run here on a CPU tensor: same top-k as the chunked scan."""
    import torch

    from engine.workflows.index import InfluenceIndex

    att, _ = fit_method(project, "trak", {"proj_dim": 64, "ensemble": "checkpoints", "max_models": 2})
    q = att._queries(("test", np.arange(30)))
    scan = InfluenceIndex(att, backend="exact")
    u = scan.query_vectors(q.x, q.y)
    want = scan.search(u, 10)
    resident = InfluenceIndex(att, backend="exact")
    resident._resident = torch.cat([torch.as_tensor(v) for _, _, v in resident._train_chunks()])
    got = resident.search(u, 10)
    assert np.array_equal(got["proponents"], want["proponents"]) and np.array_equal(got["opponents"], want["opponents"])
    np.testing.assert_allclose(got["opponent_scores"], want["opponent_scores"], rtol=1e-4,
                               atol=1e-6 * np.abs(want["opponent_scores"]).max())


@pytest.mark.parametrize("method", ["grad-dot", "grad-cos", "tracin"])
def test_gradient_similarity_streams_to_the_dense_formula(project, method):
    att, _ = fit_method(project, method, {"proj_dim": 64})
    q = att._queries(("test", np.arange(25)))
    want = 0
    for m in att._members:
        side = -m.loss_store.to_array().astype(np.float64)
        g = project_gradients(m.computer, m.projector, q.x, q.y, "margin").numpy().astype(np.float64)
        if method == "grad-cos":
            side /= np.linalg.norm(side, axis=1, keepdims=True)
            g /= np.linalg.norm(g, axis=1, keepdims=True)
        want = want + m.weight * g @ side.T
    S = att.scores(q)
    np.testing.assert_allclose(S, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    got = np.zeros_like(S)
    for lo, hi, block in att.score_columns(q):
        got[:, lo:hi] = block
    np.testing.assert_allclose(got, S, rtol=1e-9, atol=1e-12 * np.abs(S).max())


def test_knn_streams_its_training_embeddings_and_equals_the_dense_formula(project, monkeypatch):
    """kNN keeps the training embeddings on disk in chunks (here 5 of 300 rows) and scores,
    self-scores and its neighbour-label suspicion equal the in-memory definitions."""
    from engine.autodiff.embeddings import penultimate_features
    from engine.methods.knn import EmbeddingKNN

    monkeypatch.setattr(EmbeddingKNN, "EMBED_ROWS", 300)
    att, _ = fit_method(project, "knn")
    assert att.store.n_chunks == -(-len(project.train_dataset) // 300) and att.store.complete
    model = project.load_model(project.final_checkpoint())
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    tr = unit(penultimate_features(model, project.train_dataset.x).double().numpy())
    te = unit(penultimate_features(model, project.test_dataset.x).double().numpy())
    np.testing.assert_allclose(att.scores("test"), te @ tr.T, atol=1e-6)
    np.testing.assert_allclose(att.self_scores(), 1.0, atol=1e-6)
    sim = tr @ tr.T
    np.fill_diagonal(sim, -np.inf)
    k = att.settings.neighbours
    y = project.train_dataset.y.numpy()
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    expect = (y[nn_idx] != y[:, None]).mean(1)
    got = att.suspicion()
    assert np.mean(np.isclose(got, expect)) > 0.99  # float32 storage may swap a tie at the k-th neighbour


def test_dual_kernel_inverse_in_float32_only_when_well_conditioned():
    """A = (ΦΦᵀ+λI)⁻¹: the Cholesky route equals a direct inverse; the float32 route (used over
    float16 stores) is within 1e-4 when the damped matrix is well conditioned, and a tiny damping
    (ill conditioned) falls back to float64."""
    from engine.methods.trak import dual_kernel_inverse

    rng = np.random.default_rng(3)
    phi = rng.normal(size=(120, 300)) * rng.uniform(0.1, 3, size=300)
    gram = phi @ phi.T
    A64, lam = dual_kernel_inverse(gram, 300, -1.0, 10.0)
    direct = np.linalg.inv(gram + lam * np.eye(120))
    np.testing.assert_allclose(A64, direct, rtol=1e-10, atol=1e-14 * np.abs(direct).max())
    assert np.array_equal(A64, A64.T)
    A32, _ = dual_kernel_inverse(gram, 300, -1.0, 10.0, single=True)
    err = np.abs(A32 - direct).max() / np.abs(direct).max()
    assert 0 < err < 1e-4, err  # float32: not bit-equal, but close
    assert A32.dtype == np.float32 and A64.dtype == np.float64  # kept in the precision it was computed in
    assert np.array_equal(A32, A32.T)
    tiny, lam_t = dual_kernel_inverse(gram, 300, 1e-9, 10.0, single=True)
    np.testing.assert_allclose(tiny, np.linalg.inv(gram + lam_t * np.eye(120)), rtol=1e-6)
    assert np.array_equal(tiny, dual_kernel_inverse(gram, 300, 1e-9, 10.0)[0]) and tiny.dtype == np.float64


def test_a_dual_kernel_cached_in_float64_is_cast_once_and_scores_the_same(tmp_path):
    """A kernel cached in float64 by an earlier run, over a float16 store: the member keeps A in
    the store's product precision (no n×n copy per scores call) and scores as float32 products do."""
    from engine.methods.trak import _Member, dual_kernel_inverse

    rng = np.random.default_rng(5)
    phi = rng.normal(size=(60, 200)).astype(np.float32)
    store = ChunkedArray(tmp_path / "s", len(phi), 16, dtype="float16")
    for c in range(store.n_chunks):
        lo, hi = store.chunk_bounds(c)
        store.write_chunk(c, phi[lo:hi])
    stored = store.to_array().astype(np.float64)
    A64, lam = dual_kernel_inverse(stored @ stored.T, 200, -1.0, 10.0)
    member = _Member(None, None, store, A=A64, lam=lam)
    assert member.A.dtype == np.float32 and member.dual
    q = rng.normal(size=(3, 200))
    expect = (q.astype(np.float32) @ stored.astype(np.float32).T) @ A64.astype(np.float32)
    got = member.scores(q, len(phi))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    np.testing.assert_allclose(got, q @ stored.T @ A64, rtol=1e-3, atol=1e-4 * np.abs(expect).max())
    np.testing.assert_allclose(member.self_scores(), 1.0 - lam * np.diag(A64.astype(np.float32)), rtol=1e-6)


def test_primal_kernel_over_a_float16_store_multiplies_in_float32_where_its_rounding_is_below_the_store(tmp_path):
    """Over a float16 store the primal form's products run in float32: the Gram matrix (float32 chunks summed in
    float64), a well-conditioned kernel's factor, the self-influence quadratic forms and the scores. Each is
    within float32 rounding of the float64 formula over the same stored features (not bit-equal to it). An
    ill-conditioned kernel (a near-zero ridge) is still factored in float64 and kept so for the query vectors."""
    from engine.methods.trak import _Member, accumulate_gram, primal_kernel_inverse

    rng = np.random.default_rng(8)
    phi = (rng.normal(size=(700, 48)) * rng.uniform(0.05, 2.0, size=48)).astype(np.float32)
    store = ChunkedArray(tmp_path / "s16", len(phi), 128, dtype="float16")
    for c in range(store.n_chunks):
        lo, hi = store.chunk_bounds(c)
        store.write_chunk(c, phi[lo:hi])
    stored = store.to_array().astype(np.float64)  # the features as stored: the float64 reference uses them
    gram, n = accumulate_gram(store)
    exact = stored.T @ stored
    err = np.abs(gram - exact).max() / np.abs(exact).max()
    assert n == 700 and gram.dtype == np.float64 and 1e-9 < err < 1e-6, err  # float32 products, not float64
    assert np.array_equal(gram, gram.T)

    M32, lam = primal_kernel_inverse(gram, n, -1.0, 10.0, single=True)  # ratio rule: well conditioned
    M_ref = np.linalg.inv(exact + lam * np.eye(48))
    assert M32.dtype == np.float32 and np.array_equal(M32, M32.T)
    assert np.abs(M32 - M_ref).max() / np.abs(M_ref).max() < 1e-4
    M64, lam_t = primal_kernel_inverse(gram, n, 1e-6, 10.0, single=True)  # a near-zero ridge: float64
    assert M64.dtype == np.float64 and lam_t == 1e-6
    np.testing.assert_array_equal(M64, primal_kernel_inverse(gram, n, 1e-6, 10.0)[0])

    q = rng.normal(size=(5, 48))
    for M in (M32, M64):
        member = _Member(None, None, store, M=M, lam=lam)
        assert member.M is M  # the query vectors use the kernel as solved
        ref_M = M.astype(np.float64)
        got = member.scores(q, len(phi))
        assert got.dtype == np.float32
        expect = (q @ ref_M) @ stored.T
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5 * np.abs(expect).max())
        self_ref = np.einsum("ik,ik->i", stored, stored @ ref_M)
        got_self = member.self_scores()
        assert got_self.dtype == np.float64
        np.testing.assert_allclose(got_self, self_ref, rtol=1e-4, atol=1e-6 * np.abs(self_ref).max())
        np.testing.assert_allclose(member.leverage(np.array([3, 650, 11])), self_ref[[3, 650, 11]], rtol=1e-4)


def test_plain_forwards_keep_a_batchs_largest_activation_within_the_budget(monkeypatch):
    """Predictions, accuracy and FunctionalModel.outputs batch a model's rows so that one batch's largest
    activation stays within FORWARD_ACTIVATION_BYTES on the CPU (larger blocks are mapped and page-faulted anew
    each batch), with the same outputs as one forward over every row; a model with small activations still
    takes its rows in one batch after the probe."""
    import torch
    from torch import nn

    from engine.autodiff import functional
    from engine.autodiff.compute import fast_layout
    from engine.autodiff.functional import FORWARD_PROBE_ROWS, FunctionalModel
    from engine.core.train import accuracy, predict_logits

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4)).eval()
    mlp = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    y = torch.randint(0, 4, (103,))
    per_row = 16 * 16 * 16 * 4  # bytes of one row of the convolution's (and the ReLU's) output
    monkeypatch.setattr(functional, "FORWARD_ACTIVATION_BYTES", 5 * per_row)
    for model, x, rows_per_batch in ((conv, torch.randn(103, 3, 16, 16), 5), (mlp, torch.randn(103, 12), 99)):
        with torch.no_grad():
            ref = model(x)
        fast_layout(model, x)  # its layout probe (two rows, once per model) runs before the hook counts rows
        seen: list[int] = []
        hook = model[0].register_forward_hook(lambda m, i, o: seen.append(len(o)))
        try:
            for forward in (predict_logits, lambda m, rows: FunctionalModel(m).outputs(rows)):
                out = forward(model, x)
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
                # the probe's rows, then full batches of what the budget allows, then what is left
                rest = len(x) - FORWARD_PROBE_ROWS
                assert seen == [FORWARD_PROBE_ROWS] + [rows_per_batch] * (rest // rows_per_batch) + (
                    [rest % rows_per_batch] if rest % rows_per_batch else [])
                seen.clear()
            assert accuracy(model, x, y) == int((ref.argmax(1) == y).sum()) / len(x)
            assert sum(seen) == len(x) and max(seen) <= max(FORWARD_PROBE_ROWS, rows_per_batch)
        finally:
            hook.remove()
    x = torch.randn(3, 3, 16, 16)  # no probe below its rows
    assert len(predict_logits(conv, x[:0])) == 0 and len(predict_logits(conv, x)) == 3
