"""DDM (distilled datamodel, reconstructed): clustering, resumable distillation, online
leave-one-cluster-out checked against real leave-one-cluster-out retraining on a convex model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Project
from engine.core.errors import Cancelled, ProponentError
from engine.evaluate.metrics import pearson, spearman
from engine.methods.base import coerce_settings, get_method
from engine.methods.ddm.method import DDM, DDMSettings, cluster_quality, cluster_table, synset_images
from engine.methods.ddm.synset import cluster_per_class
from engine.core.train import record_training, train_model
from tests.conftest import write_tabular_project


def _margins(model, ds):
    from engine.autodiff import correct_class_margin
    with torch.no_grad():
        return correct_class_margin(model(ds.x), ds.y).double().numpy()


def _fit(project, workdir=None, **kw):
    return DDM(DDMSettings(**kw), workdir=workdir).fit(project)


@pytest.fixture(scope="module")
def real_loco(logreg_project):
    """Real leave-one-cluster-out: margin(full) − margin(retrained without cluster k), [n_test, K]."""
    p = logreg_project
    att = _fit(p, clusters_per_class=4, distill_steps=0)
    cl = att.clustering
    base = _margins(p.load_model(), p.test_dataset)
    eff = np.stack([base - _margins(train_model(p, indices=np.flatnonzero(cl.assign != k)), p.test_dataset)
                    for k in range(cl.n_clusters)], 1)
    return cl, eff


def test_clustering_is_per_class_with_medoid_init(logreg_project):
    p = logreg_project
    att = _fit(p, clusters_per_class=4, distill_steps=0)
    cl = att.clustering
    y = p.train_dataset.y.numpy()
    x = p.train_dataset.x.numpy()
    assert (cl.assign >= 0).all() and cl.sizes.sum() == len(y)
    for c in np.unique(y):
        assert 1 <= (cl.classes == c).sum() <= 4
    for k in range(cl.n_clusters):
        mem = cl.members(k)
        assert (y[mem] == cl.classes[k]).all(), "a cluster mixes classes"
        assert cl.medoids[k] in mem
        # the medoid is the member nearest the cluster centre (for a linear model the penultimate
        # features are the inputs, and a converged k-means centre is its members' mean)
        d = ((x[mem] - x[mem].mean(0)) ** 2).sum(1)
        assert mem[np.argmin(d)] == cl.medoids[k]
    # each synthetic example starts equal to a real member (0 steps: the synset is the initialisation)
    imgs = synset_images(att)
    np.testing.assert_array_equal(imgs["x"], x[cl.medoids])
    np.testing.assert_array_equal(imgs["init"], x[cl.medoids])
    assert list(imgs["classes"]) == list(cl.classes)
    # with distillation the synset moves away from, but starts at, the medoids
    att2 = _fit(p, clusters_per_class=4, distill_steps=5)
    assert not np.array_equal(synset_images(att2)["x"], x[cl.medoids])
    np.testing.assert_array_equal(synset_images(att2)["init"], x[cl.medoids])


def test_cluster_per_class_small_classes():
    feats = np.array([[0.0], [0.0], [1.0], [5.0], [6.0]])
    cl = cluster_per_class(feats, np.array([0, 0, 0, 1, 1]), 3, seed=0)
    # class 0 has only 2 distinct points → 2 clusters; class 1 has 2 → 2 clusters
    assert sorted(cl.classes.tolist()) == [0, 0, 1, 1]
    assert cl.sizes.sum() == 5
    with pytest.raises(ProponentError):
        cluster_per_class(feats, np.zeros(5), 0)


def test_distillation_lowers_residual_and_resumes(logreg_project, tmp_path):
    p = logreg_project
    kw = dict(clusters_per_class=4, distill_steps=25, save_every=5)
    full = _fit(p, tmp_path / "a", **kw)
    assert full.residuals().shape == (full.clustering.n_clusters,)
    assert full.residuals().mean() < 0.8 * full.residual_init.mean(), (full.residual_init.mean(), full.residuals().mean())
    assert full.meta["residual_mean"] < full.meta["residual_init_mean"]

    seen = {"done": 0}

    def progress(stage, done, total):
        if stage == "distill synset":
            seen["done"] = done

    stopper = DDM(DDMSettings(**kw), workdir=tmp_path / "b", progress=progress, cancel=lambda: seen["done"] >= 17)
    with pytest.raises(Cancelled):
        stopper.fit(p)
    resumed = DDM(DDMSettings(**kw), workdir=tmp_path / "b").fit(p)
    assert resumed.meta["distill_resumed_from"] == 15
    np.testing.assert_allclose(resumed.synset_x.numpy(), full.synset_x.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed.residuals(), full.residuals(), atol=1e-6)
    # a changed setting does not reuse the saved state
    other = DDM(DDMSettings(**{**kw, "distill_lr": 0.02}), workdir=tmp_path / "b").fit(p)
    assert other.meta["distill_resumed_from"] == 0


@pytest.mark.parametrize("variant", ["ascent", "refit"])
def test_leave_one_cluster_out_matches_retraining(logreg_project, real_loco, variant):
    """Predicted cluster-removal effects have the sign and ranking of real retraining (convex model)."""
    cl, real = real_loco
    att = _fit(logreg_project, clusters_per_class=4, distill_steps=20, variant=variant)
    np.testing.assert_array_equal(att.clustering.assign, cl.assign)
    C = att.cluster_scores("test")
    assert C.shape == real.shape
    assert pearson(C.ravel(), real.ravel()) > 0.6
    per_query = np.nanmean([spearman(C[q], real[q]) for q in range(C.shape[0])])
    assert per_query > 0.5, per_query
    # the sign of large effects agrees
    big = np.abs(real) > np.quantile(np.abs(real), 0.75)
    assert (np.sign(C[big]) == np.sign(real[big])).mean() > 0.8


def test_scores_are_cluster_derived(logreg_project):
    p = logreg_project
    att = _fit(p, clusters_per_class=3, distill_steps=3)
    cl = att.clustering
    S = att.scores("test")
    assert S.shape == (len(p.test_dataset), len(p.train_dataset))
    C = att.cluster_scores("test")
    for k in range(cl.n_clusters):
        mem = cl.members(k)
        np.testing.assert_allclose(S[:, mem], np.repeat(C[:, [k]] / len(mem), len(mem), 1), rtol=1e-12)
    assert att.scores(("train", [0, 5])).shape == (2, len(p.train_dataset))
    sus = att.suspicion()
    val = cluster_quality(att)
    np.testing.assert_allclose(sus, -val[cl.assign] / cl.sizes[cl.assign])
    table = cluster_table(att)
    assert len(table) == cl.n_clusters and sum(r["size"] for r in table) == len(p.train_dataset)
    assert [r["validation_loss_change"] for r in table] == sorted(r["validation_loss_change"] for r in table)
    assert get_method("ddm") is DDM and DDM.granularity == "cluster"
    assert "cluster-derived" in DDM.description and att.meta["per_example"].startswith("cluster-derived")


def test_harmful_cluster_is_found_and_removal_really_helps(tmp_path):
    """A planted group of mislabeled points forms a cluster DDM ranks harmful; real retraining
    without the top-ranked cluster lowers the loss on held-out (training) validation rows."""
    root = write_tabular_project(tmp_path / "bad", n_train=120, n_test=30, classes=3, seed=3)
    import pandas as pd
    df = pd.read_csv(root / "train.csv")
    src = df.index[df.label == 0][:12]
    df.loc[src, "label"] = 1  # a block of class-0 points labelled 1
    df.to_csv(root / "train.csv", index=False)
    p = Project.load(root)
    record_training(p)
    att = _fit(p, clusters_per_class=4, distill_steps=10, variant="refit")
    table = cluster_table(att)
    top = table[0]
    assert top["harmful"] and top["class_index"] == 1
    assert len(set(top["members"]) & set(src.tolist())) >= 0.75 * top["size"]
    # real check: removing the top-ranked cluster vs the least harmful one
    val = np.setdiff1d(att.validation_rows, np.concatenate([top["members"], table[-1]["members"]]))
    from engine.autodiff.measurement import example_loss

    def val_loss(drop):
        m = train_model(p, indices=np.setdiff1d(np.arange(len(p.train_dataset)), drop))
        with torch.no_grad():
            return float(example_loss(m(p.train_dataset.x[val]), p.train_dataset.y[val]).mean())
    full = val_loss([])
    assert val_loss(top["members"]) < full
    assert np.argsort(-att.suspicion())[0] in top["members"]


def test_runs_through_the_cached_api(logreg_project):
    from engine.api import cached_scores
    res = cached_scores(logreg_project, "ddm", {"clusters_per_class": 2, "distill_steps": 3})
    assert res["scores"].shape == (len(logreg_project.test_dataset), len(logreg_project.train_dataset))
    assert res["meta"]["clusters"] <= 6 and res["meta"]["granularity"] == "cluster"
    assert np.isfinite(res["suspicion"]).all()


def test_bad_settings_are_one_line_errors(logreg_project):
    with pytest.raises(ProponentError, match="variant"):
        coerce_settings(DDM, {"variant": "nope"})
    with pytest.raises(ProponentError, match="clusters_per_class"):
        _fit(logreg_project, clusters_per_class=0)
    with pytest.raises(ProponentError, match="validation_fraction"):
        _fit(logreg_project, validation_fraction=1.5)
