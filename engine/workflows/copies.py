"""Input-space evidence that a test example was copied into the training set.

Four views of an example's input, each cheap and each blind to a different edit:

- ``exact_keys``: a hash of the decoded input (pixels or feature values as stored; for text the
  text lower-cased with sentence punctuation and repeated spaces removed), equal for literal copies;
- ``perceptual_hashes``: a 64-bit DCT hash of each image (``imagehash.phash``), which survives
  re-encoding, noise, brightness, a one-pixel shift and a small crop; compared by Hamming distance;
- ``input_vectors``: unit vectors compared by cosine, as a FiftyOne-style near-duplicate search does:
  per-image centred pixels (so the cosine is a correlation, blind to brightness and contrast),
  standardised feature columns for tabular data, a bag of words for text (every word, one letter ones
  included: "sine of x" and "sine of z" are different sentences);
- ``text_words`` (text): the normalised word sequence, compared by the number of words inserted or
  deleted to turn one into the other (``rapidfuzz``'s Indel distance). A copy with a word dropped or
  doubled is 1 edit away; a natural neighbour with one word *replaced* ("StreamReader" /
  "StreamWriter") is 2, so the count separates the two where a ratio or a cosine cannot. It is
  measured on each query's nearest candidates by cosine.

Not used for text: a word-sequence similarity *ratio* (difflib). On the validation suite it flagged
the dropped/doubled-word copies, but as often natural one-word neighbours in the corpus, which its
null of training pairs under-predicted (flag precision 0.67 on one project).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

from engine.core.data import row_blocks
from engine.core.project import Project
from engine.storage.arrays import scratch_array

BLOCK = 512
SIM_BLOCK_BYTES = 64 << 20
SHIFT_CANDIDATES = 64


def exact_keys(project: Project, split: str) -> list[str]:
    """One hash per example of its decoded input (text: normalised text)."""
    if project.data_format == "text":
        df = project.train_df if split == "train" else project.test_df
        return [hashlib.sha1(_normal_text(t).encode()).hexdigest() for t in df[project.text_column].astype(str)]
    x = (project.train_dataset if split == "train" else project.test_dataset).x
    return [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest()
            for _, _, block in row_blocks(x) for r in block.flatten(1).numpy()]


def _normal_text(t: str) -> str:
    # sentence punctuation goes (a copy may lose its period or commas); symbols that carry content
    # ("***", "+++", "@@", "y/x") stay, else "(those with *** or ---)" and "(those with ---, +++, or @@)" agree
    return " ".join(re.sub(r"[.,;:!?\"'`()\[\]{}]", " ", t.lower()).split())


def perceptual_hashes(project: Project, split: str) -> np.ndarray | None:
    """[n] uint64 pHash of each image (None for projects without images)."""
    if project.data_format != "images":
        return None
    import imagehash

    n = len(project.train_dataset if split == "train" else project.test_dataset)
    out = np.empty(n, np.uint64)
    for i in range(n):
        img = project.raw_image(split, i)
        bits = imagehash.phash(img.convert("L"), hash_size=8).hash.ravel()
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def input_vectors(project: Project, split: str):
    """Unit vectors for the cosine view: dense [n, d] float32, or sparse rows for text."""
    if project.data_format == "text":
        from sklearn.feature_extraction.text import HashingVectorizer

        df = project.train_df if split == "train" else project.test_df
        return HashingVectorizer(n_features=2**18, alternate_sign=False, norm="l2",
                                 token_pattern=r"(?u)\b\w+\b").transform(
            df[project.text_column].astype(str).map(_normal_text).tolist())
    ds = project.train_dataset if split == "train" else project.test_dataset
    # on disk, not the heap: [n, d] grows with the split
    out = scratch_array((len(ds), int(np.prod(ds.x.shape[1:]))), np.float32, project.scratch_folder, "input vectors")
    if project.data_format != "images":
        mean, std = _column_moments(project.train_dataset.x)
    for lo, hi, block in row_blocks(ds.x):  # float64 per block only: the whole split stays float32
        x = block.flatten(1).double().numpy()
        if project.data_format == "images":
            x = x - x.mean(1, keepdims=True)  # a correlation: blind to brightness and contrast
        else:
            x = (x - mean) / np.maximum(std, 1e-12)
        out[lo:hi] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def _column_moments(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation, two passes block by block."""
    n = max(len(x), 1)
    mean = sum(block.flatten(1).double().sum(0) for _, _, block in row_blocks(x)) / n
    var = sum(((block.flatten(1).double() - mean) ** 2).sum(0) for _, _, block in row_blocks(x)) / n
    return mean.numpy(), var.sqrt().numpy()


def text_words(project: Project, split: str) -> list[list[str]]:
    """The normalised word sequence of each text (None-free; empty list for an empty text)."""
    df = project.train_df if split == "train" else project.test_df
    return [_normal_text(t).split() for t in df[project.text_column].astype(str)]


def _image_variants(x: torch.Tensor) -> list[torch.Tensor]:
    """Small geometric edits of query images [q, C, H, W]: one-pixel moves in each direction (edges
    repeated, and wrapped around), and a one-pixel zoom in and out."""
    out = []
    h, w = x.shape[-2:]
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            out.append(p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
            out.append(torch.roll(x, (dy, dx), dims=(-2, -1)))
    if h > 4 and w > 4:
        resize = lambda t: torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                                                           antialias=True)
        out.append(resize(x[..., 1:-1, 1:-1]))  # zoom in: one pixel off every side
        out.append(resize(p))  # zoom out: one pixel added on every side
    return out


def similarity_rows(n_train: int) -> int:
    """Queries per block of :func:`best_matches`: a block's [queries, n_train] float64 similarities
    stay within ``SIM_BLOCK_BYTES`` (512 queries up to 16,384 training rows; 8 at a million)."""
    return max(1, min(BLOCK, SIM_BLOCK_BYTES // (8 * max(1, n_train))))


def best_matches(project: Project, query_split: str, query_index: np.ndarray | None = None,
                 exclude_self: bool = False) -> dict[str, np.ndarray]:
    """For each query: {"exact": training index with the same exact key or -1, "exact_all": every such
    index, "cos_index",
    "cosine" (best, shift-tolerant for images), "hash_index", "hash_distance" (bits; images only),
    "edit_index", "word_edits" (words inserted or deleted; text only)}.
    ``exclude_self``: queries are training rows and may match neither themselves nor their identical
    twins (the null of the similarity views)."""
    n_q_all = len(project.train_dataset if query_split == "train" else project.test_dataset)
    qi = np.arange(n_q_all) if query_index is None else np.asarray(query_index, np.int64)
    keys_train = exact_keys(project, "train")
    by_key: dict[str, list[int]] = {}
    for i, k in enumerate(keys_train):
        by_key.setdefault(k, []).append(i)
    keys_q = keys_train if query_split == "train" else exact_keys(project, query_split)
    exact = np.full(len(qi), -1, np.int64)
    twins: list[list[int]] = []  # every training row with the query's exact key (the null excludes them all)
    for j, q in enumerate(qi):
        hits = [t for t in by_key.get(keys_q[q], []) if not (exclude_self and t == q)]
        twins.append(hits)
        if hits:
            exact[j] = hits[0]
    tr = input_vectors(project, "train")
    qv_all = tr if query_split == "train" else input_vectors(project, query_split)
    cos_idx = np.empty(len(qi), np.int64)
    cos_val = np.empty(len(qi))
    sparse = hasattr(tr, "multiply")
    images = project.data_format == "images"
    words = project.data_format == "text"
    if words:
        from rapidfuzz.distance import Indel

        w_train = text_words(project, "train")
        w_q = w_train if query_split == "train" else text_words(project, query_split)
        ed_idx = np.empty(len(qi), np.int64)
        ed_val = np.empty(len(qi), np.int64)
    if images:
        xq_all = (project.train_dataset if query_split == "train" else project.test_dataset).x
    step = similarity_rows(tr.shape[0])
    for lo in range(0, len(qi), step):
        rows = qi[lo:lo + step]
        q = qv_all[rows]
        sim = np.asarray((q @ tr.T).todense()) if sparse else q @ tr.T
        sim = np.asarray(sim, np.float64)
        if exclude_self:
            # the null asks how close the nearest *different* training input is: a row and its
            # identical twins are exact evidence, so they must not set the similarity thresholds
            sim[np.arange(len(rows)), rows] = -np.inf
            for j in range(len(rows)):
                if twins[lo + j]:
                    sim[j, twins[lo + j]] = -np.inf
        if images:
            m = min(SHIFT_CANDIDATES, sim.shape[1])
            cand = np.argpartition(-sim, m - 1, axis=1)[:, :m]
            best = np.take_along_axis(sim, cand, 1)
            xq = xq_all[torch.as_tensor(rows)]
            for moved in _image_variants(xq.float()):
                v = moved.flatten(1).double().numpy()
                v = v - v.mean(1, keepdims=True)
                v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
                best = np.maximum(best, np.einsum("qd,qmd->qm", v, tr[cand].astype(np.float64)))
            j = best.argmax(1)
            cos_idx[lo:lo + len(rows)] = cand[np.arange(len(rows)), j]
            cos_val[lo:lo + len(rows)] = best[np.arange(len(rows)), j]
        else:
            j = sim.argmax(1)
            cos_idx[lo:lo + len(rows)] = j
            cos_val[lo:lo + len(rows)] = sim[np.arange(len(rows)), j]
        if words:
            # word edits on the nearest candidates by cosine (excluded rows are -inf there, never candidates)
            m = min(SHIFT_CANDIDATES, sim.shape[1])
            cand = np.argpartition(-sim, m - 1, axis=1)[:, :m]
            for j, r in enumerate(rows):
                c = cand[j][np.isfinite(sim[j, cand[j]])]
                if len(c) == 0:
                    ed_idx[lo + j], ed_val[lo + j] = -1, np.iinfo(np.int64).max
                    continue
                d = np.array([Indel.distance(w_q[r], w_train[t]) for t in c])
                # among equally few edits, the input-closest one
                k = np.lexsort((-sim[j, c], d))[0]
                ed_idx[lo + j], ed_val[lo + j] = c[k], d[k]
    out = {"exact": exact, "exact_all": twins, "cos_index": cos_idx, "cosine": cos_val}
    if words:
        out["edit_index"], out["word_edits"] = ed_idx, ed_val
    h_train = perceptual_hashes(project, "train")
    if h_train is not None:
        h_q = h_train if query_split == "train" else perceptual_hashes(project, query_split)
        h_idx = np.empty(len(qi), np.int64)
        h_dist = np.empty(len(qi), np.int64)
        for lo in range(0, len(qi), BLOCK):
            rows = qi[lo:lo + BLOCK]
            d = np.bitwise_count(h_q[rows][:, None] ^ h_train[None, :]).astype(np.int64)
            if exclude_self:
                d[np.arange(len(rows)), rows] = 65
                for j in range(len(rows)):
                    if twins[lo + j]:
                        d[j, twins[lo + j]] = 65
            # among equally distant hashes, the input-closest one
            j = d.argmin(1)
            h_idx[lo:lo + len(rows)] = j
            h_dist[lo:lo + len(rows)] = d[np.arange(len(rows)), j]
        out["hash_index"], out["hash_distance"] = h_idx, h_dist
    return out
