"""Materialise the text sample: sentences from the docstrings of Python's standard library,
labelled by the topic of the module they document, plus planted problems; then fine-tune the
model by a plain PyTorch loop, as a user would have done elsewhere.

The data is deterministic for a given Python minor version (3.11): every sentence comes from
``inspect.getdoc`` of a module, or of its public classes, functions and methods, split into
sentences and filtered to plain prose of 30–220 characters. A sentence that appears under two
topics, or twice after lower-casing and dropping punctuation, is left out, and so is one within a
single word inserted or deleted of a sentence already kept (under any topic), so the only
duplicates and one-word near-duplicates between train and test are the planted ones.

Planted (recorded in truth.json, which no method reads):
- about 6% of training labels flipped to another topic;
- eight test sentences copied into train: four exact, four lightly edited (lower-cased, a word
  dropped, a word doubled, the final full stop removed).

``train(root)`` fine-tunes the classification head (the encoder stays as pretrained) with AdamW in
a plain PyTorch loop and writes ``weights/model.safetensors``: the project has no trajectory and
no ``[training]`` recipe, like a model trained elsewhere.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import numpy as np

# topic → standard-library modules whose documentation gives its sentences
TOPICS = {
    "files": ["os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "stat", "fileinput"],
    "text": ["string", "textwrap", "re", "difflib", "unicodedata", "codecs", "html", "shlex"],
    "math": ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"],
    "network": ["socket", "http.client", "http.server", "urllib.request", "urllib.parse", "smtplib", "ftplib", "ssl",
                "ipaddress", "imaplib", "poplib"],
    "concurrency": ["threading", "multiprocessing.pool", "multiprocessing.process", "queue", "concurrent.futures",
                    "asyncio.tasks", "asyncio.locks", "asyncio.queues", "subprocess", "sched", "selectors"],
    "compression": ["zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "binascii", "base64"],
}
N_TRAIN_PER_TOPIC = 70
N_TEST_PER_TOPIC = 20
LEAK_KINDS = ["exact", "exact", "exact", "exact", "lowercase", "drop_word", "double_word", "no_period"]
FLIP_FRACTION = 0.06


def _docstrings(modname: str) -> list[str]:
    mod = importlib.import_module(modname)
    out, seen = [], set()

    def add(obj):
        doc = inspect.getdoc(obj)
        if doc:
            out.append(doc)

    add(mod)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or id(obj) in seen:
            continue
        if getattr(obj, "__module__", None) not in (mod.__name__, None) and not inspect.isbuiltin(obj):
            continue  # documented where it is defined, not where it is re-exported
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            seen.add(id(obj))
            add(obj)
            if inspect.isclass(obj):
                for n2, o2 in sorted(vars(obj).items()):
                    if not n2.startswith("_") and (inspect.isfunction(o2) or inspect.ismethoddescriptor(o2)):
                        add(o2)
    return out


def _sentences(doc: str) -> list[str]:
    out = []
    for para in doc.strip().split("\n\n")[:3]:
        para = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+", para):
            prose = sum(c.isalpha() or c == " " for c in s) / max(1, len(s))
            if 30 <= len(s) <= 220 and s[0].isupper() and ">>>" not in s and prose > 0.85:
                out.append(s)
    return out


def _key(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()


def _words(s: str) -> list[str]:
    # the copy detector's text normalisation (engine.workflows.copies._normal_text: lower-cased,
    # sentence punctuation dropped), restated here so that the sample's data, and so its truth, do
    # not change when the detector does, and make_data.py runs without Proponent's engine
    return re.sub(r"[.,;:!?\"'`()\[\]{}]", " ", s.lower()).split()


def _drop_one_word_neighbours(per: dict[str, list[str]]) -> dict[str, list[str]]:
    """Leave out each sentence within one word inserted or deleted of a sentence kept before it,
    under any topic. The corpus has natural pairs such as "Returns b'' if the file is at EOF." /
    "Returns b'' if the file is already at EOF."; split between train and test they look exactly
    like a planted drop-word copy, which truth.json would not list."""
    from rapidfuzz.distance import Indel  # a dependency of Proponent

    by_len: dict[int, list[list[str]]] = {}  # kept sentences' words, by word count
    out = {}
    for t, ss in per.items():
        kept = []
        for s in ss:
            w = _words(s)
            near = (v for n in (len(w) - 1, len(w), len(w) + 1) for v in by_len.get(n, ()))
            if any(Indel.distance(w, v, score_cutoff=1) <= 1 for v in near):
                continue
            by_len.setdefault(len(w), []).append(w)
            kept.append(s)
        out[t] = kept
    return out


def topic_sentences() -> dict[str, list[str]]:
    """Each topic's sentences, in a fixed order, with cross-topic and near-exact repeats removed, and
    then any sentence one word inserted or deleted away from one kept before it (any topic)."""
    per = {t: list(dict.fromkeys(s for m in mods for d in _docstrings(m) for s in _sentences(d)))
           for t, mods in TOPICS.items()}
    owners: dict[str, set] = {}
    for t, ss in per.items():
        for s in ss:
            owners.setdefault(_key(s), set()).add(t)
    out = {}
    for t, ss in per.items():
        kept, keys = [], set()
        for s in ss:
            k = _key(s)
            if len(owners[k]) == 1 and k not in keys:
                keys.add(k)
                kept.append(s)
        out[t] = kept
    return _drop_one_word_neighbours(out)


def _edit(s: str, kind: str, rng: np.random.Generator) -> str:
    words = s.split()
    if kind == "lowercase":
        return s.lower()
    if kind == "drop_word" and len(words) > 4:
        i = int(rng.integers(1, len(words) - 1))
        return " ".join(words[:i] + words[i + 1:])
    if kind == "double_word":
        i = int(rng.integers(0, len(words)))
        return " ".join(words[:i + 1] + [words[i]] + words[i + 1:])
    if kind == "no_period":
        return s.rstrip(".")
    return s


def materialise(root: Path, *, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    topics = topic_sentences()
    classes = sorted(topics)
    train, test = [], []  # (text, label, origin)
    for t in classes:
        ss = topics[t]
        need = N_TRAIN_PER_TOPIC + N_TEST_PER_TOPIC
        if len(ss) < need:
            raise RuntimeError(f"topic {t!r} has {len(ss)} sentences, fewer than {need}")
        pick = rng.choice(len(ss), size=need, replace=False)
        test += [(ss[i], t, f"{t}:{i}") for i in pick[:N_TEST_PER_TOPIC]]
        train += [(ss[i], t, f"{t}:{i}") for i in pick[N_TEST_PER_TOPIC:]]
    test_order = rng.permutation(len(test))
    test = [test[i] for i in test_order]
    # leaks: copies of test sentences placed in train, exact and lightly edited
    leak_test = rng.choice(len(test), size=len(LEAK_KINDS), replace=False)
    n_orig = len(train)
    leaks = []
    for t, kind in zip(leak_test, LEAK_KINDS):
        text, label, _ = test[t]
        train.append((_edit(text, kind, rng), label, f"leak:test{t}"))
        leaks.append({"test_index": int(t), "kind": kind})
    perm = rng.permutation(len(train))
    train = [train[i] for i in perm]
    pos = {int(old): new for new, old in enumerate(perm)}
    for j, leak in enumerate(leaks):
        leak["train_index"] = pos[n_orig + j]
    # flipped labels, never on leaked copies
    candidates = np.array([i for i, (_, _, o) in enumerate(train) if not o.startswith("leak")])
    flip = np.sort(rng.choice(candidates, size=int(round(FLIP_FRACTION * len(train))), replace=False))
    labels = [lab for _, lab, _ in train]
    true_labels = list(labels)
    for i in flip:
        labels[i] = str(rng.choice([c for c in classes if c != true_labels[i]]))

    import pandas as pd  # a dependency of Proponent; imported here to keep module import light

    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": [s for s, _, _ in train], "label": labels}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"text": [s for s, _, _ in test], "label": [lab for _, lab, _ in test]}).to_csv(data / "test.csv",
                                                                                               index=False)
    truth = {"flipped": [{"train_index": int(i), "given_label": labels[i], "true_label": true_labels[i]} for i in flip],
             "leaks": leaks, "n_train": len(train), "n_test": len(test), "seed": seed,
             "source": "docstrings of the Python standard library, labelled by module topic"}
    (Path(root) / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def train(root: Path, *, seed: int = 0, epochs: int = 20, lr: float = 5e-3, batch_size: int = 32,
          progress=None) -> Path:
    """Fine-tune the classification head by a plain PyTorch loop (AdamW, cross-entropy) on the frozen
    encoder's sentence embeddings, and write weights/model.safetensors (every parameter, encoder
    included): the model a user would bring, trained outside Proponent."""
    import importlib.util

    import pandas as pd
    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("_proponent_text_sample_model", Path(root) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    df = pd.read_csv(Path(root) / "data" / "train.csv")
    classes = sorted(df["label"].unique())  # Proponent's class order: sorted training labels
    y = torch.tensor([classes.index(v) for v in df["label"]])
    x = mod.tokenize(df["text"].tolist())
    torch.manual_seed(seed)
    model = mod.build(len(classes)).eval()
    # the encoder is frozen, so its sentence embeddings are computed once
    with torch.no_grad():
        emb = torch.cat([model.embed({k: v[lo:lo + 64] for k, v in x.items()}) for lo in range(0, len(y), 64)])
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for lo in range(0, len(y), batch_size):
            idx = order[lo:lo + batch_size]
            loss = torch.nn.functional.cross_entropy(model.head(emb[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            progress("train text head", epoch + 1, epochs)
    out = Path(root) / "weights" / "model.safetensors"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out)
    return out
