"""The triage table: ranked suspects with their evidence and the flags already set."""
from __future__ import annotations

import numpy as np
import pandas as pd

from app.services.flags import db_for, flag_state
from app.services.projects import truth
from app.services.runs import load_run
from engine.core.errors import ProponentError
from engine.core.project import Project
from engine.storage.statedb import StateDB
from engine.workflows.triage import ensemble_probabilities, suggest_labels


def triage_table(project: Project, key: str, method: str, settings: dict | None = None, flags: dict | None = None):
    """Ranked suspects of a finished run with suggested label, evidence and flag state (DataFrame)."""
    run = load_run(project, key)
    susp = np.asarray(run["suspicion"] if run["suspicion"] is not None else run["self_scores"], dtype=np.float64)
    self_s = np.asarray(run["self_scores"], dtype=np.float64) if run["self_scores"] is not None else susp
    labels = project.train_dataset.y.numpy()
    probs = ensemble_probabilities(project)
    suggested = suggest_labels(probs, labels)
    S = run["scores"]
    # the opponents it creates: test queries for which this example is among the 10 strongest opponents
    opp_count = np.zeros(len(labels), dtype=np.int64)
    if S is not None and S.size:
        k = min(10, S.shape[1])
        for lo in range(0, S.shape[0], 256):  # by query blocks: the matrix is memory-mapped
            bot = np.argpartition(np.asarray(S[lo:lo + 256]), k - 1, axis=1)[:, :k]
            np.add.at(opp_count, bot.ravel(), 1)
    order = np.argsort(-susp, kind="mergesort")
    flags = flags if flags is not None else flag_state(db_for(project), "train")
    rows = []
    for rank, i in enumerate(order):
        f = flags.get(int(i), {})
        rows.append({"rank": rank + 1, "index": int(i), "label": str(project.class_name(labels[i])),
                     "suggested": str(project.class_name(suggested[i])), "suspicion": float(susp[i]),
                     "self_influence": float(self_s[i]), "p_label": float(probs[i, labels[i]]),
                     "model_disagrees": bool(probs[i].argmax() != labels[i]), "opponent_of": int(opp_count[i]),
                     "flag": f.get("flag"), "relabel": f.get("relabel"), "note": f.get("note")})
    return pd.DataFrame(rows)


EVIDENCE_COLUMNS = {
    "self_influence": "self-influence (TRAK): a hard-to-fit example scores high on itself",
    "opposes_own_class": "how strongly it opposes test queries of its given class, over other classes (spread units)",
    "label_improbability": "−log p(given label), out of sample (5-fold cross-validation when affordable)",
    "neighbour_disagreement": "share of its nearest neighbours (penultimate features) with another label",
}


def recommended_table(project: Project, key: str, method: str, ranking: dict, flags: dict | None = None):
    """The run's triage table re-ranked by the recommended ranking (engine.workflows.mislabel; the
    result of a "triage" job), with each evidence as its own column (``ev_<name>``) and the combined
    score as ``suspicion``."""
    t = triage_table(project, key, method, flags=flags)
    items = {int(it["index"]): it for it in ranking["items"]}
    if len(items) != len(t):
        raise ProponentError(f"the recommended ranking covers {len(items)} of {len(t)} training rows; recompute it")
    t["suspicion"] = [float(items[int(i)]["score"]) for i in t["index"]]
    t["suggested"] = [str(items[int(i)]["suggested_label"]) for i in t["index"]]
    for name in EVIDENCE_COLUMNS:
        if name in ranking["items"][0]["evidence"]:
            t[f"ev_{name}"] = [float(items[int(i)]["evidence"][name]) for i in t["index"]]
    t = t.sort_values("suspicion", ascending=False, kind="mergesort").reset_index(drop=True)
    t["rank"] = np.arange(1, len(t) + 1)
    return t


def truth_found(project: Project, db: StateDB) -> dict | None:
    """On a sample with truth.json: how many planted problems the user's flags have found."""
    t = truth(project)
    if not t:
        return None
    train_flags = {int(k): v for k, v in db.flags("train").items()}
    pair_flags = db.flags("pair")
    flipped = {int(f["train_index"]) for f in t.get("flipped", [])}
    leaks = {(int(l["test_index"]), int(l["train_index"])) for l in t.get("leaks", [])}
    flagged_mis = {i for i, r in train_flags.items() if r.get("flag") == "mislabeled" or r.get("relabel")}
    flagged_leak_train = {i for i, r in train_flags.items() if r.get("flag") == "leak"}
    flagged_pairs = set()
    for item, r in pair_flags.items():
        if r.get("flag") == "leak":
            a, _, b = item.partition(":")
            flagged_pairs.add((int(a), int(b)))
    found_leaks = {lk for lk in leaks if lk in flagged_pairs or lk[1] in flagged_leak_train}
    return {"mislabeled_planted": len(flipped), "mislabeled_found": len(flipped & flagged_mis),
            "mislabeled_flagged": len(flagged_mis), "mislabeled_false": len(flagged_mis - flipped),
            "leaks_planted": len(leaks), "leaks_found": len(found_leaks)}


# ----------------------------------------------------------------------------- one-by-one review
REVIEW_ACTIONS = ("mislabeled", "relabel", "ok", "ambiguous", "leak")


def typical_examples(table: pd.DataFrame, label: str, n: int = 6, exclude: int | None = None) -> list[int]:
    """The training examples of class ``label`` the model is surest about (highest p(label)): what the
    class normally looks like, to hold a suspect against."""
    rows = table[(table["label"] == str(label)) & (table["index"] != exclude)]
    return [int(i) for i in rows.sort_values("p_label", ascending=False, kind="stable")["index"].head(n)]


def hurt_queries(scores: np.ndarray, index: int, n: int = 6) -> list[tuple[int, float]]:
    """The test queries this training example opposes most (its most negative scores), read as one
    column of the run's score matrix."""
    col = np.asarray(scores[:, int(index)], dtype=np.float64)
    order = np.argsort(col, kind="stable")[:n]
    return [(int(q), float(col[q])) for q in order if col[q] < 0]


def review_decision(db: StateDB, index: int, action: str, suggested: str | None = None) -> dict:
    """Record one review decision on training example ``index`` and return what it replaced, so
    :func:`undo_decision` can put it back exactly."""
    if action not in REVIEW_ACTIONS:
        raise ProponentError(f"review action must be one of {', '.join(REVIEW_ACTIONS)}, not {action!r}")
    before = (flag_state(db, "train").get(int(index)) or {})
    prior = {"index": int(index), "flag": before.get("flag"), "relabel": before.get("relabel")}
    if action == "relabel":
        if not suggested:
            raise ProponentError(f"training example {index}: no suggested label to relabel to")
        db.set_flag("train", int(index), flag="mislabeled", relabel=str(suggested), source="app-review")
    else:
        db.set_flag("train", int(index), flag=action, relabel=None, source="app-review")
    return prior


def undo_decision(db: StateDB, prior: dict) -> None:
    db.set_flag("train", int(prior["index"]), flag=prior.get("flag"), relabel=prior.get("relabel"), source="app-undo")
