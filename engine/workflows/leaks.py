"""Train/test leak detection: each test query's top-1 training match, and a calibrated flag.

For every test query q, with s = S[q, :] the method's scores over the training set:

- ``z``: robust z-score of the top-1, (s₁ − median s) / (1.4826 · MAD s);
- ``gap``: the top-1/top-2 gap in the same robust units, (s₁ − s₂) / (1.4826 · MAD s);
- ``separation``: (s₁ − s₂) / (s₂ − s₁₀): how far the top-1 stands out from the runner-up,
  relative to how tightly the next neighbours bunch up;
- ``self_ratio`` ρ = s₁ / c(i₁) and ``self_match`` = −|log ρ| (the default decision
  statistic): the top-1 match's score against c(i₁), the score an exact copy of that training
  example would get (engine.api.copy_scores: the diagonal of the scoring function, for every method
  whose query and training sides are the same function of an example: Forward-INF, TRAK,
  Grad-Dot/Cos, kNN). That is the self-score, except for TRAK under the training-time rule, whose
  self-influence keeps the ratio rule's kernel (against that, the flag found none of 240 planted
  copies on generated suite projects; docs/bench/leak-copy-scores.json). An exact copy gives
  ρ = 1 (self_match 0); near-duplicates come close; a merely similar example falls short.
  Score-shape statistics (z, gap, separation) do not separate copies on data with many natural
  near-twins (8×8 digits), where the runner-up scores almost as high as the copy.

The flag is ``statistic > threshold``. Unless given, the threshold holds a false-positive rate
``fpr`` on clean queries: it is the (1 − fpr) quantile of the same statistic over a null of
training examples used as queries against the rest of the training set (own column removed),
each null row's scores put back on an unseen query's scale where the method says how
(``training_query_scale``: TRAK's 1 / (1 − leverage), exact for taking the row out of its kernel;
without it 3.7-10.2% of clean queries were flagged at fpr 0.01 on the suite projects).
No test query, and never the truth file, is used to set it.

Beside the attribution evidence each pair carries the input-space cosine (raw inputs) and the
penultimate-feature cosine, so a user can tell a literal copy from a near-duplicate.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.api import cached_scores, copy_scores, fit_method, run_dir, run_key
from engine.autodiff.threads import intra_op_threads
from engine.autodiff.embeddings import penultimate_features
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.methods.base import Queries, coerce_settings, get_method, settings_dict
from engine.storage.arrays import atomic_save_npy, read_cached_npy, scratch_array, stable_hash

STATISTICS = ("self_match", "separation", "z", "gap")
# leak-search defaults a method gets unless the user sets them: Forward-INF's raw loss change is
# dominated by high-gradient examples (every query's top-1 is a mislabeled point), so duplicate
# search uses plain gradient steps with the self-normalised (mirrored-cosine) score.
LEAK_DEFAULTS = {"forward-inf": {"optimizer": "sgd", "normalize": "self"}}
NEIGHBOURS = 10
# the quick check: among each test query's QUICK_TOP strongest proponents, the input-closest one is a
# suspected copy when its raw-input cosine reaches QUICK_COSINE. Natural near-twins (8x8 digits) reach
# 0.98-0.99; copies, noisy and re-brightened copies reach 0.995 or more.
QUICK_TOP = 100
QUICK_COSINE = 0.995


def leak_settings(method: str, settings) -> dict:
    """The method's settings for leak search: ``LEAK_DEFAULTS`` under whatever the user set."""
    get_method(method)  # unknown method: one-line error
    if settings is None:
        return dict(LEAK_DEFAULTS.get(method, {}))
    if isinstance(settings, dict):
        return {**LEAK_DEFAULTS.get(method, {}), **settings}
    return settings_dict(settings)  # a full Settings object: taken as is


def row_statistics(S: np.ndarray, reference: np.ndarray, exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per row: top-1 index and score, top-2 score, and the self_match / z / gap / separation
    statistics (``reference``: each training row's copy score, engine.api.copy_scores). ``exclude[r]``
    (optional) is a column to leave out of row r (a training query's own entry)."""
    S = np.array(S, dtype=np.float64, copy=True)
    if S.ndim != 2 or S.shape[1] < 3:
        raise ProponentError(f"leak detection needs scores over at least 3 training examples, not shape {S.shape}")
    if exclude is not None:
        S[np.arange(len(S)), exclude] = np.nan
    S = np.where(np.isfinite(S), S, np.nan)
    k = min(NEIGHBOURS, S.shape[1] - 1 - (exclude is not None))
    filled = np.where(np.isnan(S), -np.inf, S)
    top = np.argsort(-filled, axis=1, kind="stable")[:, :k]
    st = np.take_along_axis(filled, top, 1)
    med = np.nanmedian(S, axis=1)
    mad = 1.4826 * np.nanmedian(np.abs(S - med[:, None]), axis=1)
    scale = np.maximum(mad, 1e-12 * np.maximum(np.nanmax(np.abs(S), axis=1), 1e-300))
    z = (st[:, 0] - med) / scale
    gap = (st[:, 0] - st[:, 1]) / scale
    spread = st[:, 1] - st[:, -1]
    separation = (st[:, 0] - st[:, 1]) / np.maximum(spread, 1e-12 * scale)
    ref = np.asarray(reference, dtype=np.float64)[top[:, 0]]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = st[:, 0] / ref
        self_match = np.where(ratio > 0, -np.abs(np.log(np.where(ratio > 0, ratio, 1.0))), -np.inf)
    return {"train_index": top[:, 0], "score": st[:, 0], "second": st[:, 1], "z": z, "gap": gap,
            "separation": separation, "self_ratio": ratio, "self_match": self_match}


def _fit_once(project: Project, method: str, settings, device: str, progress):
    """A callable that fits the method's run on its first call and returns the same attributor after:
    the copy scores and the null share one refit."""
    held = []

    def fitted():
        if not held:
            held.append(fit_method(project, method, settings, device=device, progress=progress)[0])
        return held[0]
    return fitted


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def null_statistics(project: Project, method: str, settings: dict, reference: np.ndarray, *, n_null: int = 300,
                    seed: int = 0, device: str = "auto", progress=None, fitted=None) -> dict[str, np.ndarray]:
    """The statistics of training examples used as queries against the rest of the training set
    (cached beside the method's run; ``fitted``: a callable returning the run's fitted attributor)."""
    n = len(project.train_dataset)
    m = int(min(n_null, n))
    idx = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    key = run_key(project, method, coerce_settings(get_method(method), settings))
    # v4: measured against copy scores, training queries leverage-scaled (earlier nulls are not reused)
    path = run_dir(project, key) / f"leak_null_{stable_hash({'n': m, 'seed': seed, 'k': NEIGHBOURS, 'v': 4})}.npy"
    arr = read_cached_npy(path, ndim=2, mmap=False)
    if arr is not None and len(arr) == len(STATISTICS):  # else a damaged file: recomputed and replaced
        return {s: arr[j] for j, s in enumerate(STATISTICS)}
    att = fitted() if fitted else fit_method(project, method, settings, device=device, progress=progress)[0]
    with intra_op_threads(att.meta.get("threads") or torch.get_num_threads()):
        S = att.scores(Queries.resolve(project, ("train", idx)))
        # a training row is part of the fit a test query is not: its scores are put back on an unseen query's scale
        scale = att.training_query_scale(idx)
    if scale is not None:
        S = S * np.asarray(scale, np.float64)[:, None]
    st = row_statistics(S, reference, exclude=idx)
    atomic_save_npy(path, np.stack([st[s] for s in STATISTICS]))
    return {s: st[s] for s in STATISTICS}


def detect_leaks(project: Project, method: str = "forward-inf", settings=None, *, device: str = "auto", progress=None,
                 threshold: float | None = None, fpr: float = 0.01, statistic: str = "self_match",
                 n_null: int = 300, seed: int = 0) -> dict:
    """{"method", "statistic", "threshold", "fpr", "settings", "pairs": [{"test_index", "train_index", "score",
    "flagged", "z", "gap", "separation", "input_cosine", "feature_cosine"}, ...]} with one pair per test query."""
    if statistic not in STATISTICS:
        raise ProponentError(f"leak statistic must be one of {', '.join(STATISTICS)}, not {statistic!r}")
    if threshold is None and not (0.0 < fpr < 1.0):
        raise ProponentError(f"fpr must be between 0 and 1 (exclusive), not {fpr!r}")
    settings = leak_settings(method, settings)
    res = cached_scores(project, method, settings, device=device, progress=progress)
    S = np.asarray(res["scores"], dtype=np.float64)
    fitted = _fit_once(project, method, settings, device, progress)
    reference = copy_scores(project, method, settings, res, device=device, progress=progress, fitted=fitted)
    st = row_statistics(S, reference)
    calibration = {"kind": "given"}
    if threshold is None:
        null = null_statistics(project, method, settings, reference, n_null=n_null, seed=seed, device=device,
                               progress=progress, fitted=fitted)
        vals = null[statistic][np.isfinite(null[statistic])]
        if len(vals) == 0:
            raise ProponentError(f"{method}: the leak null has no finite statistics; cannot calibrate a threshold")
        threshold = float(np.quantile(vals, 1.0 - fpr, method="higher"))
        calibration = {"kind": "null of training queries", "n_null": int(len(vals)), "fpr": fpr,
                       "null_flag_rate": float((vals > threshold).mean())}
    flagged = st[statistic] > threshold
    train, test = project.train_dataset, project.test_dataset
    ti = st["train_index"]
    input_cos = input_cosines(project, np.arange(len(test)), ti)
    model = project.load_model(project.final_checkpoint())
    f_test = penultimate_features(model, test.x).double().numpy()
    f_train = penultimate_features(model, train.x[torch.as_tensor(ti)]).double().numpy()
    feat_cos = np.einsum("ik,ik->i", _unit(f_test), _unit(f_train))
    pairs = [{"test_index": int(q), "train_index": int(ti[q]), "score": float(st["score"][q]),
              "flagged": bool(flagged[q]), "z": float(st["z"][q]), "gap": float(st["gap"][q]),
              "separation": float(st["separation"][q]), "self_ratio": float(st["self_ratio"][q]), "self_match": float(st["self_match"][q]),
              "input_cosine": float(input_cos[q]),
              "feature_cosine": float(feat_cos[q])} for q in range(len(S))]
    for p in pairs:
        p["reason"] = explain_detector_pair(p, statistic, threshold)
    return {"method": method, "statistic": statistic, "threshold": float(threshold), "calibration": calibration,
            "settings": settings, "run": res["key"], "n_flagged": int(flagged.sum()), "pairs": pairs}


def unit_inputs(project: Project, split: str, index: np.ndarray | None = None):
    """Examples ``index`` (default: all) of ``split`` as unit vectors of their raw input: the flattened
    pixels or features, or for text a bag of words (hashed word counts of the text column,
    lower-cased), so a copy with a word dropped or its case changed stays close. Dense [n, d], or a
    sparse matrix for text."""
    if project.data_format == "text":
        # sklearn's text module is a heavy import that only text projects need
        from sklearn.feature_extraction.text import HashingVectorizer

        df = project.train_df if split == "train" else project.test_df
        texts = df[project.text_column].astype(str)
        texts = (texts if index is None else texts.iloc[np.asarray(index)]).tolist()
        return HashingVectorizer(n_features=2**18, alternate_sign=False, norm="l2").transform(texts)
    x = (project.train_dataset if split == "train" else project.test_dataset).x
    index = np.arange(len(x)) if index is None else np.asarray(index, np.int64)
    # on disk, not the heap: [n, d] float64 grows with the split (50,000 32×32 RGB images: 1.2 GB)
    out = scratch_array((len(index), int(np.prod(x.shape[1:]))), np.float64, project.scratch_folder, "unit inputs")
    block = x.block_rows() if hasattr(x, "block_rows") else 4096
    for lo in range(0, len(index), block):  # the split is read in row blocks, never whole
        rows = index[lo:lo + block]
        out[lo:lo + len(rows)] = _unit(x[torch.as_tensor(rows)].flatten(1).double().numpy())
    return out


def paired_cosines(a, a_index: np.ndarray, b, b_index: np.ndarray) -> np.ndarray:
    """cos(a[a_index[j]], b[b_index[j]]) for unit rows from :func:`unit_inputs`."""
    a_rows, b_rows = a[np.asarray(a_index)], b[np.asarray(b_index)]
    if hasattr(a_rows, "multiply"):  # sparse
        return np.asarray(a_rows.multiply(b_rows).sum(1), dtype=np.float64).ravel()
    return np.einsum("ik,ik->i", a_rows, b_rows)


def candidate_cosines(queries, train, candidates: np.ndarray) -> np.ndarray:
    """[q, m] cosines of each query row with its m candidate training rows (unit rows from
    :func:`unit_inputs`; ``queries`` holds only the rows of this chunk)."""
    if hasattr(queries, "multiply"):  # sparse: one [q, n_train] block, bounded by the chunk
        block = np.asarray((queries @ train.T).todense(), dtype=np.float64)
        return np.take_along_axis(block, candidates, 1)
    return np.einsum("qk,qmk->qm", queries, train[candidates])


def input_cosines(project: Project, test_index: np.ndarray, train_index: np.ndarray) -> np.ndarray:
    """Raw-input cosine similarity of test row ``test_index[j]`` and training row ``train_index[j]``."""
    n = len(test_index)
    return paired_cosines(unit_inputs(project, "test", test_index), np.arange(n),
                          unit_inputs(project, "train", train_index), np.arange(n))


def quick_leak_check(project: Project, scores: np.ndarray, *, top: int = QUICK_TOP, cosine: float = QUICK_COSINE,
                     chunk: int = 256) -> dict:
    """The quick leak check: for each test query, the input-closest of its ``top`` strongest proponents
    in ``scores`` [n_test, n_train]; flagged when their raw-input cosine is at least ``cosine``.

    Returns {"top", "threshold", "rule", "pairs": [{"test_index", "train_index", "score", "cosine",
    "rank", "flagged", "reason"}, ...]} with one pair per test query, most similar first. Memory is
    bounded by ``chunk`` queries at a time."""
    S = np.asarray(scores)
    if S.ndim != 2 or S.shape[0] != len(project.test_dataset) or S.shape[1] != len(project.train_dataset):
        raise ProponentError(f"quick leak check needs scores of shape [{len(project.test_dataset)}, "
                             f"{len(project.train_dataset)}] (test x train), not {list(S.shape)}")
    m = int(min(top, S.shape[1]))
    xn_train = unit_inputs(project, "train")
    xn_test = unit_inputs(project, "test")
    best = np.empty(len(S), dtype=np.int64)
    best_cos = np.empty(len(S))
    best_rank = np.empty(len(S), dtype=np.int64)
    for lo in range(0, len(S), chunk):
        rows = np.asarray(S[lo:lo + chunk], dtype=np.float64)
        cand = np.argpartition(-rows, m - 1, axis=1)[:, :m]  # each query's top-m proponents
        cos = candidate_cosines(xn_test[lo:lo + len(rows)], xn_train, cand)
        j = cos.argmax(1)
        b = cand[np.arange(len(rows)), j]
        best[lo:lo + len(rows)] = b
        best_cos[lo:lo + len(rows)] = cos[np.arange(len(rows)), j]
        # 1-based rank of that proponent among the query's scores
        best_rank[lo:lo + len(rows)] = 1 + (rows > rows[np.arange(len(rows)), b][:, None]).sum(1)
    order = np.argsort(-best_cos, kind="stable")
    pairs = []
    for t in order:
        flagged = bool(best_cos[t] >= cosine)
        reason = (f"input cosine {best_cos[t]:.4f} {'≥' if flagged else '<'} {cosine} with its proponent "
                  f"ranked {int(best_rank[t])} of the top {m}")
        pairs.append({"test_index": int(t), "train_index": int(best[t]), "score": float(S[t, best[t]]),
                      "cosine": float(best_cos[t]), "rank": int(best_rank[t]), "flagged": flagged, "reason": reason})
    return {"top": m, "threshold": float(cosine), "pairs": pairs,
            "rule": f"the input-closest of a test query's top-{m} proponents is flagged when their raw-input "
                    f"cosine is ≥ {cosine}"}


def explain_detector_pair(pair: dict, statistic: str, threshold: float) -> str:
    """Why the calibrated detector flagged (or did not flag) one pair, in one line."""
    v = pair.get(statistic)
    if v is None:
        return "no statistic recorded"
    side = ">" if pair.get("flagged") else "≤"
    extra = f" (score / copy score {pair['self_ratio']:.3f})" if statistic == "self_match" and "self_ratio" in pair else ""
    return f"{statistic} {v:.4g} {side} threshold {threshold:.4g}{extra}"


# ----------------------------------------------------------------------------- the default detector
DETECTOR_FPR = 0.001
# Text's one non-exact view counts whole words, so its null has no mass between "identical" and "one
# word added or dropped", and a natural corpus holds such pairs: in 20 generated text projects
# (seeds 3-22, 2,240 clean test queries) 0.4% of clean queries and 0.6% of training rows had one.
# At 0.001 the flag fired on one-word copies only where the null happened to hold none (10/40 found,
# P 1.000, R 0.812); at 0.01 it flags them (P 0.962, R 0.956; 6 false flags, 0.27% of clean queries).
# scripts/text_leak_validation.py --seeds 3-22 (held out, --seeds 23-42: P 0.924, R 0.981 at 0.01).
# Those figures are from the generator before it dropped its natural one-word neighbours (2026-12-05,
# sample_projects/text/make_data.py); on the cleaned corpus: seeds 3-22 P 0.988 R 0.994 at 0.01 (P 1.000
# at 0.001), seeds 23-42 P 1.000 R 0.994 at both. 0.01 stays: a user's corpus has such neighbours, and
# 0.001 missed one-word copies wherever the null held any.
TEXT_DETECTOR_FPR = 0.01
DETECTOR_NULL = 2000
ATTRIBUTION_NULL = 300


def calibrate_threshold(null: np.ndarray, q: float, higher_is_copy: bool) -> float:
    """The threshold a clean query passes with probability ≈ ``q``: a quantile of the null."""
    v = np.asarray(null, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.inf if higher_is_copy else -np.inf
    return float(np.quantile(v, 1.0 - q, method="higher") if higher_is_copy else np.quantile(v, q, method="lower"))


def detector_fpr(project: Project) -> float:
    """The false-positive rate the detector holds by default for this project's kind of data."""
    return TEXT_DETECTOR_FPR if project.data_format == "text" else DETECTOR_FPR


def detect_copies(project: Project, method: str = "trak", settings=None, *, fpr: float | None = None,
                  n_null: int = DETECTOR_NULL, device: str = "auto", progress=None, seed: int = 0) -> dict:
    """The default leak detector: for each test query, its best training match under each kind of
    input evidence, flagged when any passes its threshold; the attribution run's view of the pair is
    attached as corroboration.

    Evidence (engine.workflows.copies): an exact copy of the decoded input; the input cosine (images:
    centred pixels, the best over one-pixel moves and zooms; tabular); the perceptual-hash distance
    (images); the number of words added or dropped (text, in place of the bag-of-words cosine: on
    the 20 text projects above, letting the cosine flag too gave P 0.931 R 0.925 against 0.962 /
    0.956 without it, at fpr 0.01; measured with a variant of scripts/text_leak_validation.py). ``fpr`` defaults to ``detector_fpr(project)``.
    Each threshold holds ``fpr / (number of kinds)`` on a null
    of training examples used as queries against the rest of the training set (own row and its
    identical twins excluded), so the flag's false-positive rate on
    clean queries is at most about ``fpr`` (union bound; resolution 1 / null size). No test query and
    no truth file sets a threshold.

    Attribution (``method``): the rank of the matched example among the query's proponents, its top
    proponent and that one's self-match (score / copy score, 1 for a copy). On the validation
    suite's fit projects (seeds 101-103), letting the self-match also flag on its own found 1 more
    of the 120 planted copies and added 15 false flags, so it corroborates and does not decide."""
    fpr = detector_fpr(project) if fpr is None else fpr
    if not 0.0 < fpr < 1.0:
        raise ProponentError(f"fpr must be between 0 and 1 (exclusive), not {fpr!r}")
    from engine.workflows.copies import best_matches

    n_train = len(project.train_dataset)
    rng = np.random.default_rng(seed)
    null_idx = np.sort(rng.choice(n_train, size=int(min(n_null, n_train)), replace=False))
    if progress:
        progress("input evidence", 0, 2)
    q = best_matches(project, "test")
    null = best_matches(project, "train", null_idx, exclude_self=True)
    if progress:
        progress("input evidence", 2, 2)
    kinds = ["edits"] if "word_edits" in q else ["cosine"] + (["hash"] if "hash_distance" in q else [])
    attr = None
    if method:
        settings = leak_settings(method, settings)
        res = cached_scores(project, method, settings, device=device, progress=progress)
        fitted = _fit_once(project, method, settings, device, progress)
        reference = copy_scores(project, method, settings, res, device=device, progress=progress, fitted=fitted)
        if np.isfinite(reference).all() and n_train >= 3:
            S = res["scores"]
            top = np.empty(len(S), np.int64)
            sm = np.empty(len(S))
            for lo in range(0, len(S), 256):
                st = row_statistics(np.asarray(S[lo:lo + 256]), reference)
                top[lo:lo + len(st["score"])] = st["train_index"]
                sm[lo:lo + len(st["score"])] = st["self_match"]
            a_null = null_statistics(project, method, settings, reference, n_null=ATTRIBUTION_NULL, seed=seed,
                                     device=device, progress=progress, fitted=fitted)["self_match"]
            attr = {"index": top, "self_match": sm, "null": a_null, "scores": S}
    per = fpr / len(kinds)
    thr = {}
    if "cosine" in kinds:
        thr["cosine"] = calibrate_threshold(null["cosine"], per, True)
    if "hash" in kinds:
        thr["hash"] = calibrate_threshold(null["hash_distance"], per, False)
    if "edits" in kinds:
        thr["edits"] = calibrate_threshold(null["word_edits"], per, False)
    if attr is not None:
        thr["self_match"] = calibrate_threshold(attr["null"], fpr, True)
    pairs = []
    for t in range(len(q["cosine"])):
        fired = []
        if q["exact"][t] >= 0:
            more = q["exact_all"][t][1:]
            fired.append(("exact", int(q["exact"][t]), "identical input"
                          + (f" (also identical: train {', '.join(map(str, more[:5]))})" if more else "")))
        if "cosine" in thr and q["cosine"][t] > thr["cosine"]:
            fired.append(("cosine", int(q["cos_index"][t]), f"input cosine {q['cosine'][t]:.4f} > {thr['cosine']:.4f}"))
        if "hash" in thr and q["hash_distance"][t] < thr["hash"]:
            fired.append(("hash", int(q["hash_index"][t]),
                          f"perceptual-hash distance {int(q['hash_distance'][t])} < {thr['hash']:.0f} bits"))
        if "edits" in thr and q["word_edits"][t] < thr["edits"]:
            n_ed = int(q["word_edits"][t])
            fired.append(("edits", int(q["edit_index"][t]),
                          f"{n_ed} word{'s' if n_ed != 1 else ''} added or dropped < {thr['edits']:.0f}"))
        train_index = fired[0][1] if fired else int(q["cos_index"][t])
        pair = {"test_index": t, "train_index": train_index, "flagged": bool(fired),
                "identical_train": [int(i) for i in q["exact_all"][t]],
                "evidence": [f[0] for f in fired],
                "reason": "; ".join(f"{f[2]} (train {f[1]})" for f in fired) or
                          f"no evidence passes its threshold (nearest input: train {int(q['cos_index'][t])}, "
                          f"cosine {q['cosine'][t]:.4f})",
                "input_cosine": float(q["cosine"][t]), "input_match": int(q["cos_index"][t])}
        if "hash_distance" in q:
            pair["hash_distance"], pair["hash_match"] = int(q["hash_distance"][t]), int(q["hash_index"][t])
        if "word_edits" in q:
            pair["word_edits"], pair["edit_match"] = int(q["word_edits"][t]), int(q["edit_index"][t])
        if attr is not None:
            row = np.asarray(attr["scores"][t], np.float64)
            pair["self_match"], pair["top_proponent"] = float(attr["self_match"][t]), int(attr["index"][t])
            pair["match_proponent_rank"] = int(1 + (row > row[train_index]).sum())
            pair["attribution"] = (f"{method} ranks train {train_index} as proponent #{pair['match_proponent_rank']}; "
                                   f"its top proponent (train {int(attr['index'][t])}) scores "
                                   f"{np.exp(attr['self_match'][t]):.3f}× what an exact copy of it would"
                                   + (" (copy-like)" if attr["self_match"][t] > thr["self_match"] else ""))
        pairs.append(pair)
    return {"method": "detector", "attribution_method": method or None, "fpr": fpr, "thresholds": thr,
            "calibration": {"kind": "null of training queries", "n_null": int(len(null_idx)),
                            "n_null_attribution": int(len(attr["null"])) if attr is not None else 0,
                            "per_evidence_fpr": per},
            "n_flagged": int(sum(p["flagged"] for p in pairs)), "pairs": pairs}
