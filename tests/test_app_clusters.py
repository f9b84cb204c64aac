"""Cluster-level results (DDM) in the app: the app/clusters.py services against the fitted method
and the run on disk, and the Explore / Triage / Synset pages headless (AppTest) on digits."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from app.services import clusters
from app import jobs
from app import services as svc
from engine import Project
from engine.api import fit_method, run_dir
from engine.core.errors import ProponentError
from engine.methods import get_method
from engine.methods.ddm.method import cluster_table
from engine.storage.arrays import load_npy

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
# small and fast, same code paths: 2 clusters per class, 4 matching steps at 2 checkpoints
DDM_FAST = {"clusters_per_class": 2, "distill_steps": 4, "max_checkpoints": 2, "save_every": 2}


@pytest.fixture(scope="module")
def ddm_run(digits_project, tmp_path_factory):
    """A digits copy with a finished TRAK run and then a finished DDM run, both made through the job service."""
    dest = tmp_path_factory.mktemp("appcl") / "digits"
    shutil.copytree(digits_project.root, dest, ignore=shutil.ignore_patterns(".proponent"))
    p = Project.load(dest)
    for method, settings in (("trak", {"ensemble": "final"}), ("ddm", DDM_FAST)):
        jid = jobs.start_job(p, "attribute", {"method": method, "settings": settings, "device": "auto"},
                             background=False)
        assert jobs.get_job(p, jid)["status"] == "done"
    runs = {r["method"]: r for r in svc.done_runs(p)}
    clusters.clear_cache()
    return p, runs["ddm"], runs["trak"]


@pytest.fixture(scope="module")
def fresh(ddm_run):
    """The same DDM run fitted independently of the app's service (its own attributor and table)."""
    p, run, _ = ddm_run
    att, key = fit_method(p, "ddm", DDM_FAST)
    assert key == run["key"]
    return att, cluster_table(att, "test"), np.asarray(att.cluster_scores("test"))


# ------------------------------------------------------------------------------------- services
def test_loaded_run_matches_the_method_and_the_scores_on_disk(ddm_run, fresh):
    p, run, trak = ddm_run
    att, table, C = fresh
    assert clusters.is_cluster_run(run) and not clusters.is_cluster_run(trak)
    assert clusters.cluster_runs([trak, run]) == [run]
    cr = clusters.load_cluster_run(p, run)
    assert clusters.load_cluster_run(p, run) is cr  # cached
    assert [r["cluster"] for r in cr.table] == [r["cluster"] for r in table]
    assert [r["size"] for r in cr.table] == [r["size"] for r in table]
    np.testing.assert_allclose([r["residual"] for r in cr.table], [r["residual"] for r in table])
    np.testing.assert_allclose(cr.effects, C, rtol=1e-6, atol=1e-9)
    # per-example scores persisted by the run are cluster effect / cluster size: the reloaded
    # attributor reproduces the run that the rest of the app reads from disk
    S = np.asarray(load_npy(run_dir(p, run["key"]) / "scores.npy", mmap=False), dtype=np.float64)
    cl = cr.attributor.clustering
    np.testing.assert_allclose(S * cl.sizes[cl.assign][None, :], cr.effects[:, cl.assign], rtol=1e-4, atol=1e-5)
    assert sum(r["size"] for r in cr.table) == len(p.train_dataset)
    with pytest.raises(ProponentError, match="has no cluster-level results"):
        clusters.load_cluster_run(p, trak)
    with pytest.raises(ProponentError, match="no longer matches"):
        clusters.load_cluster_run(p, {**run, "key": "ddm-000000000000"})
    assert "retraining" in clusters.method_description("ddm")


def test_query_clusters_are_the_largest_effects_of_each_sign(ddm_run, fresh):
    p, run, _ = ddm_run
    att, table, C = fresh
    cr = clusters.load_cluster_run(p, run)
    sizes = {r["cluster"]: r["size"] for r in table}
    for q in (0, 7, 123):
        qc = clusters.query_clusters(cr, q, 3)
        pos = [k for k in np.argsort(-C[q]) if C[q, k] > 0][:3]
        neg = [k for k in np.argsort(C[q]) if C[q, k] < 0][:3]
        assert [r["cluster"] for r in qc["proponents"]] == pos
        assert [r["cluster"] for r in qc["opponents"]] == neg
        for r in qc["proponents"] + qc["opponents"]:
            assert r["effect"] == pytest.approx(C[q, r["cluster"]])
            assert r["size"] == sizes[r["cluster"]] == len(r["members"])
            assert r["medoid"] in r["members"]
        frame = clusters.query_cluster_frame(qc)
        assert list(frame["role"]) == ["proponent"] * len(pos) + ["opponent"] * len(neg)
    with pytest.raises(ProponentError, match="out of range"):
        clusters.query_clusters(cr, C.shape[0], 3)


def test_harmful_clusters_and_bulk_flag(ddm_run, fresh, tmp_path):
    p, run, _ = ddm_run
    att, table, C = fresh
    cr = clusters.load_cluster_run(p, run)
    hz = clusters.harmful_clusters(cr)
    val = att.validation_effects
    want = [int(k) for k in np.argsort(val, kind="stable") if val[k] < 0]
    assert list(hz["cluster"]) == want
    np.testing.assert_allclose(hz["validation loss change"], val[want])
    assert (np.diff(hz["validation loss change"]) >= 0).all() and (hz["validation loss change"] < 0).all()
    # flag through a throwaway state db so the page tests start clean
    from engine.storage.statedb import StateDB

    db = StateDB(tmp_path / "state.db")
    two = want[:2]
    n = clusters.flag_cluster_members(db, cr, two, "mislabeled")
    members = sorted(set(cr.by_id[two[0]]["members"]) | set(cr.by_id[two[1]]["members"]))
    assert n == len(members)
    flags = svc.flag_state(db, "train")
    assert sorted(i for i, r in flags.items() if r["flag"] == "mislabeled") == members
    hz2 = clusters.harmful_clusters(cr, flags).set_index("cluster")
    assert hz2.at[two[0], "flagged members"] == cr.by_id[two[0]]["size"]
    with pytest.raises(ProponentError, match="flag must be one of"):
        clusters.flag_cluster_members(db, cr, two, "bogus")
    with pytest.raises(ProponentError, match="does not exist"):
        clusters.flag_cluster_members(db, cr, [10_000])


def test_synset_gallery_images(ddm_run, fresh):
    p, run, _ = ddm_run
    att, table, C = fresh
    cr = clusters.load_cluster_run(p, run)
    gal = clusters.synset_gallery(p, cr, size=96)
    K = len(att.clustering.classes)
    assert [g["cluster"] for g in gal] == list(range(K))
    np.testing.assert_allclose([g["residual"] for g in gal], att.residuals())
    x = p.train_dataset.x[:].numpy()
    for g in gal[:4]:
        np.testing.assert_array_equal(g["init"], x[g["medoid"]])
        np.testing.assert_allclose(g["synthetic"], att.synset_x[g["cluster"]].numpy())
        img = np.asarray(g["synthetic_image"])
        assert img.shape == (96, 96)  # 8x8 upscaled x12, nearest neighbour: every block is one pixel value
        want = np.round(np.clip(g["synthetic"][0], 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(img[::12, ::12], want)
        np.testing.assert_array_equal(img, np.kron(want, np.ones((12, 12), np.uint8)))
    assert any(not np.array_equal(g["synthetic"], g["init"]) for g in gal), "4 matching steps changed nothing"
    with pytest.raises(ProponentError, match="cannot show"):
        clusters.to_image(np.zeros(5))


# ------------------------------------------------------------------------------------- pages
def _app(monkeypatch, project, page, state=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROPONENT_PROJECT", str(project.root))
    monkeypatch.setenv("PROPONENT_SYNC_JOBS", "1")
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.switch_page(f"views/{page}.py")
    for k, v in (state or {}).items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _frame(at, columns):
    found = [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]
    assert found, [list(d.value.columns) for d in at.dataframe]
    return found[0]


def test_explore_shows_the_clusters_that_drive_the_query(monkeypatch, ddm_run, fresh):
    p, run, trak = ddm_run
    att, table, C = fresh
    sizes = {r["cluster"]: r["size"] for r in table}
    desc = get_method("ddm").description
    at = _app(monkeypatch, p, "explore", {"run": run["key"], "q": 11})
    assert "These groups drive this prediction" in [h.value for h in at.subheader]
    assert any(desc in i.value for i in at.info)
    f = _frame(at, ["role", "cluster", "predicted effect", "size", "residual"])
    pos = [int(k) for k in np.argsort(-C[11]) if C[11, k] > 0][:3]
    neg = [int(k) for k in np.argsort(C[11]) if C[11, k] < 0][:3]
    assert list(f["cluster"]) == pos + neg
    assert list(f["size"]) == [sizes[k] for k in pos + neg]
    np.testing.assert_allclose(f["predicted effect"], C[11, pos + neg], rtol=1e-6)
    text = " ".join(m.value for m in at.markdown)
    cls0 = p.class_name(int(att.clustering.classes[pos[0]]))
    assert f"Proponent cluster {pos[0]}** · class {cls0} · {sizes[pos[0]]} members" in text
    assert any("Cluster-derived" in c.value for c in at.caption)
    # more clusters per side, another query: the table follows
    at.slider(key="k_clusters").set_value(5).run()
    at.number_input(key="q").set_value(40).run()
    f = _frame(at, ["role", "cluster", "predicted effect"])
    pos = [int(k) for k in np.argsort(-C[40]) if C[40, k] > 0][:5]
    neg = [int(k) for k in np.argsort(C[40]) if C[40, k] < 0][:5]
    assert list(f["cluster"]) == pos + neg
    # an example-level run shows no cluster section
    at = _app(monkeypatch, p, "explore", {"run": trak["key"]})
    assert "These groups drive this prediction" not in [h.value for h in at.subheader]


def test_triage_ranks_harmful_clusters_and_flags_their_members(monkeypatch, ddm_run, fresh):
    p, run, _ = ddm_run
    att, table, C = fresh
    harmful = [r for r in table if r["validation_loss_change"] < 0]
    at = _app(monkeypatch, p, "triage", {"run": run["key"]})
    assert "Cluster data-quality assessment" in [h.value for h in at.subheader]
    assert any(get_method("ddm").description in i.value for i in at.info)
    f = _frame(at, ["cluster", "size", "validation loss change", "flagged members"])
    assert list(f["cluster"]) == [r["cluster"] for r in harmful]
    assert list(f["size"]) == [r["size"] for r in harmful]
    np.testing.assert_allclose(f["validation loss change"], [r["validation_loss_change"] for r in harmful])
    top = harmful[0]["cluster"]
    at.multiselect(key="cluster_sel").set_value([top]).run()
    btn = at.button(key="cluster_flag_apply")
    assert btn.label == f"Flag the {harmful[0]['size']} member(s) of 1 cluster(s)"
    btn.click().run()
    assert not at.exception
    flags = svc.flag_state(svc.db_for(p), "train")
    assert sorted(i for i, r in flags.items() if r.get("flag") == "mislabeled") == sorted(harmful[0]["members"])
    f = _frame(at, ["cluster", "flagged members"]).set_index("cluster")
    assert f.at[top, "flagged members"] == harmful[0]["size"]
    svc.bulk_update(svc.db_for(p), "train", harmful[0]["members"], flag=None)


def test_synset_page_shows_one_synthetic_example_per_cluster(monkeypatch, ddm_run, fresh):
    p, run, _ = ddm_run
    att, table, C = fresh
    at = _app(monkeypatch, p, "synset")
    assert any(get_method("ddm").description in i.value for i in at.info)
    f = _frame(at, ["cluster", "class", "size", "residual"])
    K = len(att.clustering.classes)
    assert list(f["cluster"]) == list(range(K))
    assert list(f["size"]) == att.clustering.sizes.tolist()
    np.testing.assert_allclose(f["residual"], att.residuals())
    assert [m.value for m in at.metric if m.label.startswith("Clusters")] == [str(K)]
    caps = " ".join(c.value for c in at.caption)
    assert f"cluster 0 · class {att._p.class_name(att.clustering.classes[0])} · {att.clustering.sizes[0]} members" in caps
    at.selectbox(key="syn_order").set_value("residual (worst first)").run()
    f = _frame(at, ["cluster", "residual"])
    assert list(f["cluster"])[0] == int(np.argmax(att.residuals()))
