"""The recommended mislabel ranking, the default leak detector and the validation suite they are judged on."""
from __future__ import annotations

import builtins
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine import Project
from engine.evaluate.bench.suite import raw_cosine_baseline, suite_tables
from engine.evaluate.metrics import auroc
from engine.evaluate.suite import SuiteProject, make_suite_project, noisy_labels
from engine.workflows import copies
from engine.workflows.leaks import detect_copies
from engine.workflows.mislabel import EVIDENCE, combine, opposes_own_class, rank_gauss, recommended_ranking


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    spec = SuiteProject("tabular", seed=7, noise="uniform", rate=0.1, n_train=300, n_leaks=6)
    return make_suite_project(spec, tmp_path_factory.mktemp("suite") / spec.name)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    spec = SuiteProject("shapes", seed=8, noise="class-conditional", rate=0.1, n_train=300, n_leaks=10)
    return make_suite_project(spec, tmp_path_factory.mktemp("suite") / spec.name)


def _truth(p: Project) -> dict:
    return json.loads((p.root / "truth.json").read_text())


def test_noise_kinds():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    new, idx = noisy_labels(y, 0.1, 4, "uniform", rng, exclude=[0, 1])
    assert len(idx) == 20 and not np.isin([0, 1], idx).any()
    assert (new[idx] != y[idx]).all() and (np.delete(new, idx) == np.delete(y, idx)).all()
    new, idx = noisy_labels(y, 0.1, 4, "class-conditional", rng)
    assert (new[idx] == (y[idx] + 1) % 4).all()  # a fixed confusion, not uniform
    assert len(np.unique(y[idx])) <= 2  # only half the classes are confused


def test_suite_project_records_what_it_planted(shapes):
    t = _truth(shapes)
    assert t["n_train"] == len(shapes.train_dataset) == 310
    assert {l["kind"] for l in t["leaks"]} == {"exact", "noise", "shift", "brightness", "crop"}
    y = shapes.train_dataset.y.numpy()
    for f in t["flipped"]:
        assert shapes.class_name(y[f["train_index"]]) == f["given"] != f["true"]
    exact = next(l for l in t["leaks"] if l["kind"] == "exact")
    assert torch.equal(shapes.train_dataset.x[exact["train_index"]], shapes.test_dataset.x[exact["test_index"]])


def test_rank_gauss_and_combine():
    g = rank_gauss(np.array([3.0, 1.0, 2.0, 2.0]))
    assert g[1] < g[2] == g[3] < g[0] and abs(g.sum()) < 1e-9
    s, contrib = combine({"a": np.array([1.0, 2.0, 3.0]), "b": np.array([3.0, 2.0, 1.0])}, {"a": 2.0, "b": 1.0})
    assert np.argmax(s) == 2 and set(contrib) == {"a", "b"}


def test_opposes_own_class_by_blocks():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(700, 40))  # more queries than one block
    ty = rng.integers(0, 3, 700)
    y = rng.integers(0, 3, 40)
    got = opposes_own_class(S, y, ty, 3)
    i = 5
    own, other = S[ty == y[i], i].mean(), S[ty != y[i], i].mean()
    assert got[i] == pytest.approx((other - own) / S[:, i].std(), rel=1e-9)


def test_recommended_ranking_finds_flips_with_its_evidence(tabular):
    out = recommended_ranking(tabular, device="cpu")
    assert out["method"] == "recommended" and set(out["evidence_sources"]) == set(EVIDENCE)
    assert "cross-validation" in out["evidence_sources"]["label_improbability"]
    it = out["items"][0]
    assert set(it["evidence"]) == set(EVIDENCE) and set(it["contributions"]) == set(EVIDENCE)
    assert it["score"] == pytest.approx(sum(it["contributions"].values()))
    n = len(tabular.train_dataset)
    score = np.empty(n)
    for x in out["items"]:
        score[x["index"]] = x["score"]
    pos = np.zeros(n, bool)
    pos[[f["train_index"] for f in _truth(tabular)["flipped"]]] = True
    by_index = sorted(out["items"], key=lambda d: d["index"])
    single = {k: auroc(np.array([d["evidence"][k] for d in by_index]), pos) for k in EVIDENCE}
    combined = auroc(score, pos)
    assert combined > 0.85
    assert combined >= max(single.values()) - 0.02, (combined, single)


def _forbid_truth(monkeypatch):
    real_open = builtins.open

    def guarded(file, *a, **k):
        if str(file).endswith("truth.json"):
            raise AssertionError(f"read {file}")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


def test_ranking_and_detector_never_read_truth(tmp_path, monkeypatch):
    spec = SuiteProject("tabular", seed=9, rate=0.1, n_train=200, n_leaks=4)
    p = make_suite_project(spec, tmp_path / spec.name)
    _forbid_truth(monkeypatch)
    with pytest.raises(AssertionError, match="truth.json"):  # the guard itself works
        (p.root / "truth.json").read_text()
    recommended_ranking(p, device="cpu")
    detect_copies(p, "trak", device="cpu")


def test_image_variants_undo_a_shift_and_a_crop():
    x = torch.rand(1, 1, 12, 12)
    rolled = torch.roll(x, 1, dims=-1)
    assert any(torch.allclose(v, rolled) for v in copies._image_variants(x))


def test_detector_finds_every_copy_kind(shapes):
    t = _truth(shapes)
    det = detect_copies(shapes, "trak", device="cpu")
    pairs = {p["test_index"]: p for p in det["pairs"]}
    for l in t["leaks"]:
        assert pairs[l["test_index"]]["train_index"] == l["train_index"], l  # recall@1
    found = [l for l in t["leaks"] if pairs[l["test_index"]]["flagged"]]
    assert len(found) >= 8
    exact = next(l for l in t["leaks"] if l["kind"] == "exact")
    assert "identical input" in pairs[exact["test_index"]]["reason"]
    planted = {l["test_index"] for l in t["leaks"]}
    false = [p for p in det["pairs"] if p["flagged"] and p["test_index"] not in planted]
    assert len(false) <= 2
    assert all("attribution" in p and p["reason"] for p in det["pairs"])
    # the FiftyOne-style baseline misses the shifted copy that the detector flags
    base = {p["test_index"]: p for p in raw_cosine_baseline(shapes, det["fpr"])}
    assert sum(base[l["test_index"]]["flagged"] for l in t["leaks"]) < len(found)


def test_text_normalisation_drops_sentence_punctuation_not_symbols():
    assert copies._normal_text("Hello,  World.") == copies._normal_text("hello world")
    assert copies._normal_text("(those with *** or ---)") != copies._normal_text("(those with ---, +++, or @@)")


def test_text_detector_counts_words_added_or_dropped(tmp_path):
    from engine.core.samples import prepare_sample
    from engine.workflows.leaks import TEXT_DETECTOR_FPR

    root = prepare_sample("text", tmp_path / "text", train=False, seed=1)
    p = Project.load(root, check_model=False)
    t = json.loads((root / "truth.json").read_text())
    det = detect_copies(p, method=None)
    assert det["fpr"] == TEXT_DETECTOR_FPR and set(det["thresholds"]) == {"edits"}
    pairs = {q["test_index"]: q for q in det["pairs"]}
    for l in t["leaks"]:
        pair = pairs[l["test_index"]]
        assert pair["flagged"] and l["train_index"] in [pair["train_index"], *pair["identical_train"]], l
        if l["kind"] in ("drop_word", "double_word"):
            assert pair["word_edits"] == 1 and pair["evidence"] == ["edits"], pair
            assert "1 word added or dropped" in pair["reason"]
    # the null never matches a row with itself: its nearest other sentence is at least one word away
    view = copies.best_matches(p, "train", np.arange(50), exclude_self=True)
    assert (view["word_edits"] >= 1).all() and (view["edit_index"] != np.arange(50)).all()


def test_cli_defaults_are_the_recommended_ranking_and_the_detector(tabular):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True)

    r = run("triage", str(tabular.root), "--json", "--limit", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "recommended" and len(out["items"]) == 3 and "evidence" in out["items"][0]
    r = run("leaks", str(tabular.root), "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "detector" and out["thresholds"]["cosine"] < 1
    r = run("leaks", str(tabular.root), "--threshold", "0.5")
    assert r.returncode == 2 and "--threshold" in r.stderr and "Traceback" not in r.stderr


def test_suite_tables_mean_and_spread():
    def proj(kind, noise, a_rec, a_cl):
        return {"kind": kind, "noise": noise,
                "mislabel": {"recommended": {"auroc": a_rec, "precision_at_k": 0.5},
                             "cleanlab": {"auroc": a_cl, "precision_at_k": 0.4}},
                "leaks": {"detector": {"precision": 1.0, "recall": 1.0,
                                       "per_kind": {"exact": {"n": 2, "recall@1": 2, "flag_recall": 2}}}}}

    tables = suite_tables({"a": proj("tabular", "uniform", 0.9, 0.8), "b": proj("tabular", "uniform", 0.95, 0.85)})
    rows = {(r[1], r[3]): r for r in tables[0]["rows"]}
    assert rows[("all", "recommended")][4] == "0.925 ± 0.035"
    assert rows[("uniform", "cleanlab")][4] == "0.825 ± 0.035"
    assert tables[2]["rows"][0][4:] == ["4/4", "", "4/4"]


def test_null_skips_identical_twins_and_pairs_list_them(tabular, tmp_path):
    """A training set with a duplicated row must not push the similarity null to 1.0 (the twins are
    exact evidence, not near-duplicates), and a test copy of them lists every identical row."""
    import shutil

    import pandas as pd

    root = tmp_path / "twins"
    shutil.copytree(tabular.root, root, ignore=shutil.ignore_patterns(".proponent", "checkpoints"))
    tr = pd.read_csv(root / "train.csv")
    te = pd.read_csv(root / "test.csv")
    n = len(tr)
    pd.concat([tr, tr.iloc[[5]]], ignore_index=True).to_csv(root / "train.csv", index=False)
    feat = [c for c in tr.columns if c != "label"]
    te.loc[0, feat] = tr.loc[5, feat].to_numpy()
    te.to_csv(root / "test.csv", index=False)
    p = Project.load(root)
    null = copies.best_matches(p, "train", np.array([5, n]), exclude_self=True)
    assert list(null["exact_all"]) == [[n], [5]]
    assert (null["cosine"] < 1 - 1e-6).all() and set(null["cos_index"]) & {5, n} == set()
    q = copies.best_matches(p, "test", np.array([0]))
    assert q["exact"][0] == 5 and q["exact_all"][0] == [5, n]


@pytest.mark.parametrize("args, says", [
    (["--parts", "foo"], "--parts takes triage and/or lds"),
    (["--kinds", "tabular,foo"], "--kinds: unknown 'foo'"),
    (["--lds-methods", "trak,bogus"], "--lds-methods: unknown 'bogus'"),
    (["--lds-peers", "nope"], "--lds-peers: unknown peer:method 'nope'"),
])
def test_suite_flags_are_checked_before_any_work(tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "--suite", "--workdir", str(tmp_path / "w"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
