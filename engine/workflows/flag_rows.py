"""Flags that follow their examples when the data changes.

A flag is stored under the example's row index (``train``/``test``), or ``"test:train"`` for a pair,
with the hash of the data it was set on and the example's content fingerprint
(:meth:`engine.core.project.Project.row_fingerprints`). When the project's data hash changes (rows
added, removed, re-ordered or edited), :func:`follow_data` finds each flagged example again by its
fingerprint and moves the flag to its new index. A flag whose example is no longer in the data is
kept, in split ``"<split>-gone"``, and comes back if the example does: a flag is never applied to
another example, and never lost.
"""
from __future__ import annotations

import numpy as np

from engine.core.project import Project
from engine.storage.statedb import GONE_SUFFIX, StateDB

SPLITS = ("train", "test")


def _hex(v) -> str:
    return f"{int(v):016x}"


def identity_for(project: Project):
    """identity(split, item) -> (data hash, fingerprint) for :class:`StateDB`: stamps each flag as it is set."""
    def identity(split: str, item) -> tuple[str | None, str | None]:
        parts = _item_parts(split, str(item))
        if parts is None:
            return None, None
        fps = []
        for s, i in parts:
            rows = project.row_fingerprints(s)
            if not 0 <= i < len(rows):
                return None, None  # not an example of this data: left for follow_data to place
            fps.append(_hex(rows[i]))
        return project.data_hash(), ":".join(fps)
    return identity


def _item_parts(split: str, item: str) -> list[tuple[str, int]] | None:
    """[(split, row)] an item names: one row, or a test row and a training row for a pair."""
    base = split.removesuffix(GONE_SUFFIX)
    item = item.split("@", 1)[0]  # a gone flag's key is "<old item>@<old data hash>"
    try:
        if base == "pair":
            q, t = item.split(":")
            return [("test", int(q)), ("train", int(t))]
        if base in SPLITS:
            return [(base, int(item))]
    except ValueError:
        return None
    return None


def follow_data(db: StateDB, project: Project) -> dict:
    """Move every flag not stamped with the current data to where its example is now (see the module
    doc). Returns {"moved", "gone", "kept"}: flags re-keyed, flags whose example is absent, flags
    confirmed in place. Costs one query when the data has not changed."""
    current = project.data_hash()
    stale = db.flags_off_data(current)
    if not stale:
        return {"moved": 0, "gone": 0, "kept": 0}
    where: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def rows_with(split: str, fp: str) -> np.ndarray:
        """The rows of ``split`` whose fingerprint is ``fp``, ascending (two arrays of 8 bytes a row, sorted
        once; not a dictionary of Python objects per row)."""
        if split not in where:
            rows = project.row_fingerprints(split)
            order = np.argsort(rows, kind="stable")
            where[split] = (rows[order], order)
        ordered, order = where[split]
        v = np.uint64(int(fp, 16))
        return order[np.searchsorted(ordered, v, "left"):np.searchsorted(ordered, v, "right")]

    taken = {(r["split"], r["item"]) for r in db.flags().values() if r["data_hash"] == current}
    moves, counts = [], {"moved": 0, "gone": 0, "kept": 0}
    for r in sorted(stale, key=lambda r: r["updated"], reverse=True):  # the newest flag wins a contested row
        split, item = r["split"], r["item"]
        base = split.removesuffix(GONE_SUFFIX)
        parts = _item_parts(split, item)
        if parts is None:  # not an item Proponent writes: stamped and left as it is
            moves.append({"split": split, "item": item, "to_split": split, "to_item": item})
            continue
        if r["fingerprint"] is None and split.endswith(GONE_SUFFIX):
            found, fingerprint = None, None  # nothing to find it by: it stays where it is
        elif r["fingerprint"] is None:
            # set before flags carried fingerprints (or without a project at hand): it refers to the
            # rows as they are now, as it always did
            fps = []
            for s, i in parts:
                rows = project.row_fingerprints(s)
                fps.append(_hex(rows[i]) if 0 <= i < len(rows) else None)
            found = None if None in fps else [i for _, i in parts]
            fingerprint = None if None in fps else ":".join(fps)
        else:
            fps = r["fingerprint"].split(":")
            fingerprint = r["fingerprint"]
            found = []
            for (s, old), fp in zip(parts, fps):
                candidates = rows_with(s, fp)
                # identical rows share a fingerprint: keep the old index if it is one of them
                found.append(old if old in candidates else (int(candidates[0]) if len(candidates) else None))
            found = None if None in found or len(found) != len(parts) else found
        to_item = ":".join(map(str, found)) if found is not None else None
        if to_item is None or (base, to_item) in taken:
            to = (base + GONE_SUFFIX, item if split.endswith(GONE_SUFFIX) else f"{item}@{r['data_hash']}")
            counts["gone"] += 1
        else:
            to = (base, to_item)
            taken.add(to)
            counts["moved" if to != (split, item) else "kept"] += 1
        moves.append({"split": split, "item": item, "to_split": to[0], "to_item": to[1],
                      **({"fingerprint": fingerprint} if fingerprint else {})})
    db.move_flags(moves, current)
    return counts


def gone_flags(db: StateDB) -> dict[str, dict]:
    """Flags whose example is not in the current data, keyed "<split>:<key>"; each row's ``old_item`` is
    the index (or "test:train" pair) it had."""
    out = {}
    for base in ("train", "test", "pair"):
        for item, row in db.flags(base + GONE_SUFFIX).items():
            out[f"{base}:{item}"] = {**row, "old_item": item.split("@", 1)[0]}
    return out


__all__ = ["follow_data", "identity_for", "gone_flags"]
