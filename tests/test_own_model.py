"""A model trained outside Proponent: a plain PyTorch loop in this file, an ImageFolder tree,
weights saved as safetensors and loaded through ``[model] weights`` (no trajectory, no recipe).

Also: the same model behind image CSVs whose paths resolve in each supported way, ``proponent
import`` of the user's own checkpoints, and the bad inputs of issue 11, each one line with exit
code 2 and nothing half-written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Project
from engine.cli import main as cli_main
from engine.evaluate.metrics import auroc

CLASSES = ["0", "1", "2", "3", "4"]
N_TRAIN, N_TEST = 60, 15  # per class
MEAN, STD = 0.25, 0.35  # the user's own normalisation, reproduced by [data] normalize

MODEL_PY = '''
from torch import nn


def build(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 32), nn.ReLU(), nn.Linear(32, num_classes))
'''

PROJECT_TOML = f'''
[project]
name = "own"

[data]
format = "image_folder"
train = "train"
test = "test"
normalize = {{mean = [{MEAN}], std = [{STD}]}}

[model]
weights = ["weights/model.safetensors"]
'''


def _user_images(paths: list[Path]) -> torch.Tensor:
    """The user's own preprocessing, written without Proponent: grey, /255, normalised."""
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(p).convert("L"), np.float32) / 255.0 for p in paths])
    return torch.from_numpy((arr[:, None] - MEAN) / STD)


def _train_plain(x: torch.Tensor, y: torch.Tensor, epochs: int = 60, seed: int = 0, snapshots=None):
    """A plain PyTorch loop (not Proponent's trainer): SGD with momentum, minibatches of 32."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, len(CLASSES)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        if snapshots is not None and (epoch + 1) % 20 == 0:
            snapshots.append((step, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return model.eval()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """An ImageFolder tree of 8×8 digits 0–4 with planted flips (files put in another class's
    folder), a model trained on it by a plain loop and saved as safetensors, and its checkpoints
    every 20 epochs with a manifest (for ``proponent import``)."""
    from PIL import Image
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("own") / "own"
    d = load_digits()
    rng = np.random.default_rng(0)
    images = (d.images / 16.0 * 255).round().astype(np.uint8)
    flips = set()
    for c in CLASSES:
        idx = rng.permutation(np.flatnonzero(d.target == int(c)))[: N_TRAIN + N_TEST]
        for j, i in enumerate(idx):
            split = "train" if j < N_TRAIN else "test"
            cls = c
            if split == "train" and j % 16 == 5:  # 4 per class: put into another class's folder
                cls = str((int(c) + 1 + j % 3) % len(CLASSES))
                flips.add(f"{c}_{j:03d}.png")
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{c}_{j:03d}.png")
    (root / "model.py").write_text(MODEL_PY)
    (root / "project.toml").write_text(PROJECT_TOML)
    # the user's own loading: torchvision ImageFolder order (class folder, file name)
    samples = {s: sorted((p for p in (root / s).rglob("*.png")), key=lambda p: (p.parent.name, p.name))
               for s in ("train", "test")}
    x = {s: _user_images(ps) for s, ps in samples.items()}
    y = {s: torch.tensor([CLASSES.index(p.parent.name) for p in ps]) for s, ps in samples.items()}
    snaps = []
    model = _train_plain(x["train"], y["train"], snapshots=snaps)
    (root / "weights").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "weights" / "model.safetensors"))
    saved = root.parent / "my_checkpoints"
    saved.mkdir()
    manifest = []
    for step, epoch, state in snaps:
        torch.save(state, saved / f"epoch{epoch}.pt")  # a plain state dict, as users save them
        manifest.append({"file": f"epoch{epoch}.pt", "step": step, "epoch": epoch, "lr": 0.05})
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        test_acc = float((model(x["test"]).argmax(1) == y["test"]).float().mean())
    flipped = np.array([i for i, p in enumerate(samples["train"]) if p.name in flips])
    return {"root": root, "flipped": flipped, "samples": samples, "test_acc": test_acc, "model": model,
            "x": x, "checkpoints": saved}


def _copy(own, tmp_path, name="p") -> Path:
    dest = tmp_path / name
    shutil.copytree(own["root"], dest, ignore=shutil.ignore_patterns(".proponent"))
    return dest


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- the model as it is
def test_weights_only_project_loads_like_the_users_loop(own):
    p = Project.load(own["root"])
    assert not p.has_trajectory and not p.has_recipe
    assert p.classes == CLASSES and len(p.train_dataset) == N_TRAIN * len(CLASSES)
    # rows follow torchvision's ImageFolder order, and the preprocessing reproduces the user's
    assert [p.root / f for f in p.rows("train")["file"]] == own["samples"]["train"]
    assert torch.allclose(p.train_dataset.x[:], own["x"]["train"], atol=1e-6)
    rep = p.accuracy_report()
    assert rep["warning"] is None
    assert rep["models"][0]["test"] == pytest.approx(own["test_acc"]) and own["test_acc"] > 0.85


def test_near_chance_accuracy_warns(own, tmp_path):
    """Weights that fit but predict at chance (here: never trained) get the preprocessing warning;
    a mismatched normalisation visibly costs accuracy."""
    from safetensors.torch import save_file

    root = _copy(own, tmp_path)
    torch.manual_seed(1)
    untrained = Project.load(root).build_model()
    save_file({k: v.contiguous() for k, v in untrained.state_dict().items()}, str(root / "weights" / "model.safetensors"))
    rep = Project.load(root).accuracy_report()
    assert rep["models"][0]["test"] < 0.3 and rep["chance"] == pytest.approx(0.2)
    assert rep["warning"] and "near chance" in rep["warning"] and "resize, mode and normalize" in rep["warning"]
    root = _copy(own, tmp_path, "mismatch")
    toml = (root / "project.toml").read_text().replace(f"mean = [{MEAN}], std = [{STD}]", "mean = [0.9], std = [0.01]")
    (root / "project.toml").write_text(toml)
    assert Project.load(root).accuracy_report()["models"][0]["test"] < own["test_acc"] - 0.2


@pytest.mark.parametrize("method", ["trak", "ekfac", "grad-cos", "knn", "forward-inf"])
def test_final_weight_methods_run(own, tmp_path, method):
    from engine.api import cached_scores

    p = Project.load(_copy(own, tmp_path))
    res = cached_scores(p, method)
    S = np.asarray(res["scores"])
    assert S.shape == (len(p.test_dataset), len(p.train_dataset)) and np.isfinite(S).all()
    # the strongest proponent of a query mostly carries the query's own (given) label
    y_tr, y_te = p.train_dataset.y.numpy(), p.test_dataset.y.numpy()
    agree = (y_tr[S.argmax(1)] == y_te).mean()
    assert agree > 0.7, f"{method}: top proponent shares the label for only {agree:.2f} of queries"


def test_triage_finds_planted_flips(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    code, out, err = run_cli(capsys, "triage", root, "--method", "trak", "--json")
    assert code == 0, err
    items = json.loads(out)["items"]
    score = np.zeros(len(items))
    for it in items:
        score[it["index"]] = it["score"]
    truth = np.zeros(len(items), bool)
    truth[own["flipped"]] = True
    a = auroc(score, truth)
    print(f"triage AUROC (trak, ImageFolder, {truth.sum()} flips among {len(truth)}): {a:.3f}")
    assert a > 0.9
    # the suggested label of a flipped file is its true class (the folder name it came from)
    top = [it for it in items[:10] if it["index"] in set(own["flipped"])]
    true_class = {i: own["samples"]["train"][i].name.split("_")[0] for i in own["flipped"]}
    assert top and np.mean([it["suggested_label"] == true_class[it["index"]] for it in top]) >= 0.7


@pytest.mark.parametrize("method,what", [("source", "trajectory"), ("tracin", "trajectory")])
def test_trajectory_methods_refuse_in_one_line(own, tmp_path, capsys, method, what):
    root = _copy(own, tmp_path)
    code, out, err = run_cli(capsys, "attribute", root, "--method", method)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{method} needs a recorded trajectory (checkpoints/trajectory.json)" in err
    assert "proponent train" in err and "proponent import" in err and "trak" in err
    assert not (root / ".proponent" / "runs").exists() or not any((root / ".proponent" / "runs").iterdir())


def test_info_lists_what_can_run(own, capsys):
    code, out, err = run_cli(capsys, "info", own["root"], "--json")
    assert code == 0
    info = json.loads(out)
    for m in ("trak", "ekfac", "grad-cos", "grad-dot", "knn", "forward-inf", "gif", "exact-if"):
        assert info["methods"][m] == "ok", (m, info["methods"][m])
    for m in ("source", "tracin", "ddm"):
        assert "needs a recorded trajectory" in info["methods"][m]
    assert info["recipe"] is False and info["weights"] == "weights files"
    # the own model is a Linear stack: torch.func, and why
    assert info["gradients"]["backend"] == "vmap" and "Linear layers only" in info["gradients"]["reason"]
    # and the batch its gradients take at the default budget, from what autograd saves per example
    from engine.autodiff.per_example import GradientComputer
    from engine.autodiff.functional import TrackedParameters
    from engine.core.project import Project

    p = Project.load(own["root"])
    comp = GradientComputer(p.build_model().eval(), tracked=TrackedParameters.of(p))
    saved = comp.saved_bytes_per_example(p.train_dataset.x[0:2])
    assert saved > 0 and info["gradients"]["saved_mb_per_example"] == round(saved / 2**20, 4)
    assert info["gradients"]["batch"] == comp.batch_size(p.train_dataset.x[0:2][0].numel(), saved)
    assert info["gradients"]["budget_mb"] == 512
    from engine.autodiff.compute import bfloat16_products

    # a table's rows have no image layout; EK-FAC's products follow this CPU
    assert info["gradients"]["layout"] == "default" and info["gradients"]["bf16_products"] == bfloat16_products()
    # TRAK's projection at its defaults: this small Linear stack is below the projection threshold (8,192)
    assert info["projection"] == {"kind": "none", "k": 0}
    code, out, _ = run_cli(capsys, "info", own["root"])
    assert "can run: " in out and "cannot run: source: source needs a recorded trajectory" in out
    assert "gradients: vmap (Linear layers only" in out and "image batches" not in out
    assert f"products: EK-FAC and Source scores in {'bfloat16' if bfloat16_products() else 'float32'}" in out
    assert f"; {info['gradients']['batch']} rows per batch at 512 MB (" in out


def test_trak_model_ensemble_needs_several_models(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    code, _, err = run_cli(capsys, "attribute", root, "--method", "trak", "--set", "ensemble=models")
    assert code == 2 and "trak needs several independently trained models (this project has 1)" in err
    # two weight files: two models, and the ensemble runs over both
    shutil.copy(root / "weights" / "model.safetensors", root / "weights" / "model2.safetensors")
    toml = (root / "project.toml").read_text().replace('weights = ["weights/model.safetensors"]',
                                                       'weights = ["weights/model.safetensors", "weights/model2.safetensors"]')
    (root / "project.toml").write_text(toml)
    p = Project.load(root)
    assert p.model_ids() == [0, 1]
    code, out, err = run_cli(capsys, "attribute", root, "--method", "trak", "--set", "ensemble=models")
    assert code == 0, err


@pytest.mark.parametrize("command", [["train", "{root}"], ["bench", "{root}", "--metrics", "lds"]])
def test_retraining_needs_a_recipe(own, tmp_path, capsys, command):
    root = _copy(own, tmp_path)
    code, out, err = run_cli(capsys, *[c.format(root=root) for c in command])
    assert code == 2 and err.count("\n") == 1
    assert "needs a training recipe: add a [training] table" in err
    assert not (root / "checkpoints").exists()


def test_verify_and_whatif_retrain_need_a_recipe(own):
    from engine.core.errors import ProponentError
    from engine.workflows.counterfactual import counterfactual_check
    from engine.workflows.whatif import retrain_edit

    p = Project.load(own["root"])
    with pytest.raises(ProponentError, match="Verify .* needs a training recipe"):
        counterfactual_check(p, 0, scores_row=np.zeros(len(p.train_dataset)))
    with pytest.raises(ProponentError, match="what-if retraining needs a training recipe"):
        retrain_edit(p, [0, 1])


def test_rows_csv_maps_indexes_to_files(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    code, _, err = run_cli(capsys, "attribute", root, "--method", "grad-cos", "--export", tmp_path / "out" / "s.npy")
    assert code == 0, err
    import pandas as pd

    rows = pd.read_csv(tmp_path / "out" / "rows.csv")
    train = rows[rows["split"] == "train"]
    assert list(train["index"]) == list(range(N_TRAIN * len(CLASSES)))
    assert [root / f for f in train["file"]] == [root / p.relative_to(own["root"]) for p in own["samples"]["train"]]
    assert (train["label"].astype(str) == [p.parent.name for p in own["samples"]["train"]]).all()


# ----------------------------------------------------------------------------- the same model behind CSVs
def _csv_variant(own, tmp_path, kind: str) -> Path:
    """The same images listed in CSVs: paths relative to the project root, to the CSV, or under image_root."""
    root = tmp_path / kind
    root.mkdir()
    shutil.copy(own["root"] / "model.py", root)
    shutil.copytree(own["root"] / "weights", root / "weights")
    image_dir = {"root": root / "images", "csv": root / "data" / "images", "image_root": root / "store"}[kind]
    extra = 'image_root = "store"\n' if kind == "image_root" else ""
    for split in ("train", "test"):
        lines = ["path,label"]
        for p in own["samples"][split]:
            dest = image_dir / split / p.parent.name / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
            rel = dest.relative_to({"root": root, "csv": root / "data", "image_root": image_dir}[kind])
            lines.append(f"{rel.as_posix()},{p.parent.name}")
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "project.toml").write_text(f'''
[data]
format = "images"
train = "data/train.csv"
test = "data/test.csv"
{extra}normalize = {{mean = [{MEAN}], std = [{STD}]}}

[model]
weights = ["weights/model.safetensors"]
''')
    return root


@pytest.mark.parametrize("kind", ["root", "csv", "image_root"])
def test_csv_paths_resolve(own, tmp_path, kind):
    root = _csv_variant(own, tmp_path, kind)
    p = Project.load(root)
    assert torch.allclose(p.train_dataset.x[:], own["x"]["train"], atol=1e-6)
    assert p.accuracy_report()["models"][0]["test"] == pytest.approx(own["test_acc"])


def test_csv_missing_image_names_every_place_looked(own, tmp_path, capsys):
    root = _csv_variant(own, tmp_path, "root")
    csv = root / "data" / "train.csv"
    lines = csv.read_text().splitlines()
    lines[3] = "images/train/0/missing.png,0"
    csv.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "info", root)
    assert code == 2 and err.count("\n") == 1
    assert f"{csv}: row 2 (line 4): image file not found: images/train/0/missing.png" in err
    assert str(root / "data" / "images/train/0/missing.png") in err and str(root / "images/train/0/missing.png") in err


# ----------------------------------------------------------------------------- proponent import
def test_import_own_checkpoints_then_tracin_runs(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    code, out, err = run_cli(capsys, "import", root, "--checkpoints", own["checkpoints"])
    assert code == 0, err
    p = Project.load(root)
    assert p.has_trajectory and [c.epoch for c in p.checkpoints] == [20.0, 40.0, 60.0]
    for method in ("tracin", "source"):  # the recorded learning rates stand in for the recipe
        code, out, err = run_cli(capsys, "attribute", root, "--method", method, "--json", "--top", "1")
        assert code == 0, err
        queries = json.loads(out)["queries"]
        assert len(queries) == len(p.test_dataset)
        y_tr, y_te = p.train_dataset.y.numpy(), p.test_dataset.y.numpy()
        agree = np.mean([y_tr[q["proponents"][0]["train_index"]] == y_te[i] for i, q in enumerate(queries)])
        assert agree > 0.7, (method, agree)


def test_import_rejects_a_checkpoint_that_does_not_fit(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    src = tmp_path / "bad_ckpts"
    shutil.copytree(own["checkpoints"], src)
    torch.save({"0.weight": torch.zeros(3, 3)}, src / "epoch40.pt")
    code, _, err = run_cli(capsys, "import", root, "--checkpoints", src)
    assert code == 2 and err.count("\n") == 1 and "epoch40.pt" in err and "do not fit model.py" in err
    assert not (root / "checkpoints" / "trajectory.json").exists()
    assert not (root / "checkpoints" / "imported").exists() and not (root / "checkpoints" / "imported.partial").exists()


# ----------------------------------------------------------------------------- bad input, one line each
def _state_names(root: Path) -> set:
    state = root / ".proponent"
    return {p.relative_to(state).as_posix() for p in state.rglob("*")} if state.exists() else set()


def test_weights_that_do_not_fit_model_py(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    (root / "model.py").write_text(MODEL_PY.replace("32), nn.ReLU(), nn.Linear(32", "16), nn.ReLU(), nn.Linear(16"))
    code, out, err = run_cli(capsys, "attribute", root, "--method", "trak")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(root / "weights" / "model.safetensors") in err
    assert "weights do not fit model.py: key '1.weight' has shape (32, 64) but model.py builds (16, 64)" in err
    assert not any("runs/" in n for n in _state_names(root))


def test_empty_class_folder(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    (root / "train" / "9").mkdir()
    code, _, err = run_cli(capsys, "info", root)
    assert code == 2 and err.count("\n") == 1
    assert f"{root / 'train' / '9'}: class folder '9' has no images" in err


def test_class_folder_only_in_test(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    shutil.copytree(root / "test" / "4", root / "test" / "7")
    code, _, err = run_cli(capsys, "info", root)
    assert code == 2 and err.count("\n") == 1
    assert f"{root / 'test' / '7'}: class folder '7' is in test but not in train" in err


def test_non_image_file_is_skipped_and_counted(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    (root / "train" / "2" / "notes.txt").write_text("not an image")
    (root / "train" / "3" / "Thumbs.db").write_bytes(b"\0\1")
    p = Project.load(root)
    assert len(p.train_dataset) == N_TRAIN * len(CLASSES)
    assert len(p.data_warnings) == 2 and all("skipped, not an image file (2 skipped in all)" in w for w in p.data_warnings)
    assert str(root / "train" / "2" / "notes.txt") in p.data_warnings[1] + p.data_warnings[0]
    code, out, err = run_cli(capsys, "info", root)
    assert code == 0 and "proponent: warning:" in err and "notes.txt: skipped" in err


def test_unreadable_image_with_an_image_extension(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    (root / "train" / "1" / "zz_broken.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "info", root)
    assert code == 2 and err.count("\n") == 1
    assert str(root / "train" / "1" / "zz_broken.png") in err and "unreadable image zz_broken.png" in err


def test_attribute_globs_that_match_nothing(own, tmp_path, capsys):
    root = _copy(own, tmp_path)
    toml = (root / "project.toml").read_text() + 'attribute = ["head.*"]\n'
    (root / "project.toml").write_text(toml)
    code, _, err = run_cli(capsys, "attribute", root, "--method", "grad-cos")
    assert code == 2 and err.count("\n") == 1
    assert f"{root / 'project.toml'}: [model] attribute: 'head.*' matches no parameter of the model" in err
    assert "parameters: 1.weight, 1.bias, 3.weight, 3.bias" in err
    assert not any("runs/" in n and n.endswith(".npy") for n in _state_names(root))


def test_attribute_globs_restrict_gradients(own, tmp_path):
    from engine.api import cached_scores
    from engine.autodiff.functional import FunctionalModel, TrackedParameters

    root = _copy(own, tmp_path)
    (root / "project.toml").write_text((root / "project.toml").read_text() + 'attribute = ["3.*"]\n')
    p = Project.load(root)
    fm = FunctionalModel(p.build_model(), TrackedParameters.of(p))
    assert fm.names == ["3.weight", "3.bias"] and fm.n_params == 32 * 5 + 5
    res = cached_scores(p, "grad-dot")
    assert res["meta"]["projection"]["in_dim"] == 165
    # the head-only gradient dot product, computed by hand for one pair: −∇f(test)·∇ℓ(train)
    from engine.autodiff.measurement import correct_class_margin

    model = p.load_model()
    head = [model[3].weight, model[3].bias]
    x_tr, y_tr = p.train_dataset.x[:1], p.train_dataset.y[:1]
    x_te, y_te = p.test_dataset.x[:1], p.test_dataset.y[:1]
    g_train = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x_tr), y_tr), head)
    g_test = torch.autograd.grad(correct_class_margin(model(x_te), y_te).sum(), head)
    expected = -sum(float((a * b).sum()) for a, b in zip(g_test, g_train))
    assert float(res["scores"][0, 0]) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_categorical_value_unseen_in_train(tmp_path, capsys):
    import pandas as pd

    root = tmp_path / "tab"
    root.mkdir()
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"x": rng.normal(size=12), "colour": ["red", "green"] * 6, "label": [0, 1] * 6})
    test = pd.DataFrame({"x": rng.normal(size=3), "colour": ["red", "blue", "green"], "label": [0, 1, 0]})
    train.to_parquet(root / "train.parquet")
    test.to_csv(root / "test.csv", index=False)
    (root / "model.py").write_text("from torch import nn\ndef build(s, k):\n    return nn.Linear(s[0], k)\n")
    (root / "project.toml").write_text('[data]\nformat = "tabular"\ntrain = "train.parquet"\ntest = "test.csv"\n'
                                       'feature_columns = ["x"]\ncategorical_columns = ["colour"]\n\n[model]\n'
                                       '\n[training]\nepochs = 1\n')
    code, _, err = run_cli(capsys, "train", root)
    assert code == 2 and err.count("\n") == 1
    assert (f"{root / 'test.csv'}: row 1 (line 3): categorical column 'colour': value 'blue' is not among the "
            f"training categories (green, red)") in err
    assert not (root / "checkpoints").exists() and not (root / "checkpoints.partial").exists()
    test.loc[1, "colour"] = "red"
    test.to_csv(root / "test.csv", index=False)
    p = Project.load(root)
    assert p.feature_columns == ["x", "colour=green", "colour=red"] and p.input_shape == (3,)
    assert p.test_dataset.x[1, 1:].tolist() == [0.0, 1.0]


def test_preprocessing_resize_mode_normalize_and_original_pixels_in_the_app(tmp_path):
    """[data] resize/mode/normalize shape what the model sees; the app shows the file's own pixels."""
    import io

    from PIL import Image

    from app import services as svc

    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(3):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), "RGB").save(root / split / c / f"{i}.png")
    (root / "model.py").write_text(MODEL_PY)
    (root / "project.toml").write_text('[data]\nformat = "image_folder"\ntrain = "train"\ntest = "test"\n'
                                       'resize = [6, 8]\nmode = "grey"\nnormalize = {mean = [0.5], std = [0.25]}\n\n'
                                       '[model]\n\n[training]\nepochs = 1\n')
    p = Project.load(root)
    assert p.input_shape == (1, 6, 8)
    f = p.example_file("train", 4)
    expected = np.asarray(Image.open(f).convert("L").resize((8, 6), Image.BILINEAR), np.float32) / 255.0
    assert torch.allclose(p.train_dataset.x[4, 0], torch.from_numpy((expected - 0.5) / 0.25), atol=1e-5)
    shown = np.asarray(Image.open(io.BytesIO(svc.image_png(p, "train", 4, size=16))))
    assert shown.shape == (12, 16, 3) and (shown == np.asarray(Image.open(f))).all()  # original pixels, RGB, 12×16
    # an uploaded query goes through the same resize/mode/normalize
    buf = io.BytesIO()
    Image.open(f).save(buf, format="PNG")
    xq = svc.query_from_upload(p, buf.getvalue(), "q.png")
    assert np.allclose(xq[0], p.train_dataset.x[4].numpy(), atol=1e-5)


def test_project_page_summary_reports_accuracy_and_warnings(own, tmp_path):
    from app import services as svc

    root = _copy(own, tmp_path)
    (root / "train" / "2" / "notes.txt").write_text("not an image")
    s = svc.project_summary(Project.load(root))
    assert s["test_accuracy"] == pytest.approx(own["test_acc"]) and s["accuracy"][0]["train"] > 0.9
    assert any("notes.txt: skipped, not an image file" in w for w in s["warnings"])


def test_upload_weights_from_the_app(own, tmp_path):
    from app import services as svc
    from engine.core.errors import ProponentError

    root = _copy(own, tmp_path)
    data = (root / "weights" / "model.safetensors").read_bytes()
    toml_before = (root / "project.toml").read_text()
    with pytest.raises(ProponentError, match="weights do not fit model.py"):
        svc.add_weights_file(root, "bad.pt", _torch_bytes({"0.weight": torch.zeros(2, 2)}))
    assert not list((root / "weights").glob("*bad*")) and (root / "project.toml").read_text() == toml_before
    rel = svc.add_weights_file(root, "second.safetensors", data)
    assert rel == "weights/second.safetensors"
    p = Project.load(root)
    assert [c.weights.name for c in p.checkpoints] == ["model.safetensors", "second.safetensors"]


def _torch_bytes(state) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_curvature_backprops_only_through_tracked_layers():
    """EK-FAC's Fisher passes leave an untracked backbone alone (no gradients computed for it, its
    requires_grad restored) and give the same head covariances as a fully trainable model."""
    from engine.autodiff.curvature import curvature_layers, fit_covariances

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, labels = torch.randn(20, 6), torch.randint(0, 3, (20, 2))
    layers, _ = curvature_layers(model, ["2.weight", "2.bias"])
    assert [L.name for L in layers] == ["2"]
    backbone_grads = []
    model[0].weight.register_hook(lambda g: backbone_grads.append(g))
    cov = fit_covariances(model, layers, x, labels, batch_size=8)
    assert backbone_grads == [] and model[0].weight.requires_grad  # never differentiated; flag restored
    # reference: the head covariances from per-example autograd on the head's input and output
    h = torch.tanh(model[0](x)).detach()
    a = torch.cat([h, torch.ones(len(x), 1)], 1).double()  # the bias as a column of ones
    assert torch.allclose(cov["2.A"], a.T @ a / len(x), atol=1e-8)
    logits = model[2](h)
    S = torch.zeros(3, 3, dtype=torch.float64)
    for j in range(2):
        g = torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels[:, j], 3)
        S += (g.double().T @ g.double()) / 2
    assert torch.allclose(cov["2.S"], S / len(x), atol=1e-8)


TRANSFORMER_MODEL = '''
from torch import nn


class FeatureTokens(nn.Module):
    """Each tabular feature a token: a shared embedding applied per feature, attention, a head."""

    def __init__(self, d, k):
        super().__init__()
        self.embed = nn.Linear(1, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, k)

    def forward(self, x):
        return self.head(self.enc(self.embed(x.unsqueeze(-1))).mean(1))


def build(input_shape, num_classes):
    return FeatureTokens(input_shape[0], num_classes)
'''


@pytest.mark.parametrize("method", ["ekfac", "trak"])
def test_a_transformer_users_model_attributes(tmp_path, capsys, method):
    """nn.TransformerEncoderLayer (attention applies its out_proj weight itself) through the CLI:
    EK-FAC leaves the output projection out and its run says so (before: a KeyError traceback)."""
    from tests.conftest import write_tabular_project

    root = write_tabular_project(tmp_path / "tok", n_train=60, n_test=12, model=TRANSFORMER_MODEL,
                                 training='optimizer = "adam"\nlr = 0.01\nepochs = 3\nbatch_size = 16\nseed = 0\n'
                                          'checkpoints_per_epoch = 1\n')
    assert run_cli(capsys, "train", str(root))[0] == 0
    code, out, err = run_cli(capsys, "attribute", str(root), "--method", method)
    assert code == 0, err
    from engine import api

    S = api.attribute(Project.load(root), method)  # the cached run
    assert S.shape == (12, 60) and np.isfinite(S).all() and np.abs(S).max() > 0
    if method == "ekfac":  # the run's metadata names what the curvature leaves out, and why
        att, _ = api.fit_method(Project.load(root), method)
        assert "runs inside the attention" in att.meta["left_out"]["enc.self_attn.out_proj.weight"]
