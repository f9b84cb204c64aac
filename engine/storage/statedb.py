"""Project state in SQLite (WAL mode): runs, flags, notes, the audit trail and jobs."""
from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from engine.core.errors import ProponentError
from engine.storage.arrays import json_default

# ---------------------------------------------------------------------------- SQLite state
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    settings TEXT NOT NULL,
    checkpoint_hash TEXT NOT NULL,
    status TEXT NOT NULL,              -- running | done | failed | cancelled
    created REAL NOT NULL,
    finished REAL,
    fit_seconds REAL,
    score_seconds REAL,
    peak_mb REAL,
    device TEXT,
    message TEXT,
    meta TEXT
);
CREATE TABLE IF NOT EXISTS flags (
    split TEXT NOT NULL,               -- train | test | pair
    item TEXT NOT NULL,                -- row index, or "test:train" for a pair
    flag TEXT,                         -- mislabeled | ok | ambiguous | leak | dismissed | NULL
    relabel TEXT,                      -- new label (as text) or NULL
    note TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (split, item)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    split TEXT NOT NULL,
    item TEXT NOT NULL,
    field TEXT NOT NULL,
    old TEXT,
    new TEXT,
    source TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,              -- queued | running | done | failed | cancelled
    stage TEXT,
    done INTEGER DEFAULT 0,
    total INTEGER DEFAULT 0,
    rate REAL,
    eta REAL,
    message TEXT,
    result TEXT,
    pid INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""

# the per-project folder of results and state: <project>/.proponent/
STATE_DIRNAME = ".proponent"

FLAG_VALUES = ("mislabeled", "ok", "ambiguous", "leak", "dismissed")

# Schema versions (PRAGMA user_version). Version 1 is SCHEMA above; each later entry upgrades the
# one before it, inside one transaction, so an existing project's state.db is never broken by a
# schema change. A database from a newer Proponent is refused rather than altered.
MIGRATIONS: list[tuple[int, str]] = [
    (2, "CREATE INDEX IF NOT EXISTS audit_item ON audit (split, item, id);"),
    # which data a flag's item index refers to, and the flagged example's content fingerprint (for a
    # pair, "test:train"), so flags follow their examples when the data changes (engine.workflows.flag_rows)
    (3, "ALTER TABLE flags ADD COLUMN data_hash TEXT;"),
    (4, "ALTER TABLE flags ADD COLUMN fingerprint TEXT;"),
]
# flags whose example is no longer in the data live in split "<split>-gone" until it returns
GONE_SUFFIX = "-gone"
SCHEMA_VERSION = MIGRATIONS[-1][0] if MIGRATIONS else 1


# errors of a statement (Proponent's bug: the traceback is what helps), not of the database file
_STATEMENT_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.NotSupportedError)


def is_database_fault(e: BaseException) -> bool:
    """An SQLite error of the database file (damaged, foreign, locked, read-only, full disk), which the user
    fixes; not an error of the statement."""
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, _STATEMENT_ERRORS)


def database_error(e: BaseException, path: str | Path) -> ProponentError | None:
    """The one line (naming ``path``) for a state database that cannot be opened, read or written: a corrupt
    or foreign file, a folder in its place, a read-only file or folder, a lock held too long. None for any
    other error. Proponent never deletes the file: its flags, notes and audit trail are the user's."""
    path = Path(path)
    if isinstance(e, OSError):  # the .proponent folder itself cannot be made (a file in its place, no permission)
        return ProponentError(f"cannot make the folder of {path.name}: {e.strerror or e}",
                              file=str(e.filename or path.parent))
    if not is_database_fault(e):
        return None
    msg = str(e)
    low = msg.lower()
    if path.is_dir():
        problem = ("is a folder, not Proponent's SQLite database; move it away (Proponent then starts a new "
                   "state.db there)")
    elif "readonly" in low or "read-only" in low:
        problem = (f"is read-only ({msg}); Proponent records runs, flags and jobs there: make state.db and its "
                   f"folder writable by this user")
    elif "locked" in low or "busy" in low:
        problem = f"is locked by another process ({msg}); wait for it to finish and try again"
    elif "unable to open" in low:
        problem = (f"cannot be opened ({msg}); check that the file and its folder {path.parent.name} can be read "
                   f"and written by this user")
    elif "disk is full" in low or "disk i/o" in low:
        problem = f"cannot be written ({msg}); free some space or check the disk"
    elif not isinstance(e, sqlite3.OperationalError) or "malformed" in low or "not a database" in low:
        problem = (f"is not a readable SQLite database ({msg}); it may be damaged or another program's file: move "
                   f"it away (for example rename it to state.db.broken) and rerun to start a new one, "
                   f"whose flags and notes start empty (Proponent does not delete it)")
    else:
        problem = f"SQLite error: {msg}"
    return ProponentError(problem, file=str(path))


def _one_line(method):
    """A database error inside ``method`` becomes the one-line :func:`database_error` naming state.db."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.DatabaseError, OSError) as e:
            err = database_error(e, self.path)
            if err is None:
                raise
            raise err from None
    return wrapped


class StateDB:
    """The project's SQLite database (WAL mode) for runs, flags, notes, audit trail and jobs.

    Every write commits at once, so a reload, another tab or a restarted server sees it.
    """

    def __init__(self, path: str | Path, identity=None, busy_timeout: float = 30.0):
        self.path = Path(path)
        # how long a statement waits for another process's write lock: a batch job can wait, a click
        # in the app should say "not saved" within seconds
        self.busy_timeout = float(busy_timeout)
        self._local = threading.local()
        # identity(split, item) -> (data hash, fingerprint) of the example a flag is set on; None: not
        # known here (the flag is stamped by the next engine.workflows.flag_rows.follow_data)
        self.identity = identity
        self._open()

    @_one_line
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    def _migrate(self) -> None:
        con = self._conn()
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ProponentError(f"state.db has schema version {version}, newer than this Proponent knows "
                                 f"({SCHEMA_VERSION}); upgrade Proponent to open it", file=str(self.path))
        if version == SCHEMA_VERSION:
            return
        with self._tx() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            if version < 1:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                version = 1
            for target, sql in MIGRATIONS:
                if target > version:
                    con.execute(sql)
                    version = target
            con.execute(f"PRAGMA user_version = {int(version)}")

    @classmethod
    def for_project(cls, project) -> "StateDB":
        return cls(project.state_dir / "state.db")

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            for attempt in range(50):
                try:  # switching a new database to WAL takes a lock the busy timeout does not always wait for
                    con.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 49:
                        raise
                    time.sleep(0.1)
            con.execute("PRAGMA synchronous=NORMAL")
            con.row_factory = sqlite3.Row
            self._local.con = con
        return con

    @contextlib.contextmanager
    def _tx(self):
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended the transaction already
                con.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ runs
    @_one_line
    def upsert_run(self, key: str, **fields) -> None:
        fields = {k: (json.dumps(v, default=json_default) if k in ("settings", "meta") and not isinstance(v, str) else v)
                  for k, v in fields.items()}
        with self._tx() as con:
            row = con.execute("SELECT key FROM runs WHERE key=?", (key,)).fetchone()
            if row is None:
                fields.setdefault("created", time.time())
                fields.setdefault("status", "running")
                cols = ["key", *fields]
                con.execute(f"INSERT INTO runs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                            (key, *fields.values()))
            elif fields:
                con.execute(f"UPDATE runs SET {','.join(f'{k}=?' for k in fields)} WHERE key=?", (*fields.values(), key))

    @_one_line
    def get_run(self, key: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM runs WHERE key=?", (key,)).fetchone()
        return _run_row(row) if row else None

    @_one_line
    def delete_run(self, key: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM runs WHERE key=?", (key,))

    @_one_line
    def list_runs(self) -> list[dict]:
        return [_run_row(r) for r in self._conn().execute("SELECT * FROM runs ORDER BY created DESC")]

    # ------------------------------------------------------------ flags
    @_one_line
    def set_flag(self, split: str, item: int | str, *, flag: str | None = ..., relabel: Any = ...,
                 note: str | None = ..., source: str = "user") -> dict:
        """Set any of flag / relabel / note for one item, recording each change in the audit trail.

        Fields left as ``...`` are unchanged; ``None`` clears them.
        """
        with self._tx() as con:
            return self._set_in(con, split, item, {k: v for k, v in (("flag", flag), ("relabel", relabel), ("note", note))
                                                   if v is not ...}, source, self.identity)

    @staticmethod
    def _set_in(con, split: str, item, changes: dict, source: str, identity=None) -> dict:
        """Apply ``changes`` (flag/relabel/note → value or None) to one item inside the caller's
        transaction, writing each changed field to the audit trail (``identity``: see ``__init__``)."""
        if split not in ("train", "test", "pair"):
            raise ValueError(f"split must be train, test or pair, not {split!r}")
        if changes.get("flag") is not None and changes["flag"] not in FLAG_VALUES:
            raise ValueError(f"flag must be one of {', '.join(FLAG_VALUES)}, not {changes['flag']!r}")
        item = str(item)
        now = time.time()
        row = con.execute("SELECT flag, relabel, note FROM flags WHERE split=? AND item=?", (split, item)).fetchone()
        old = dict(row) if row else {"flag": None, "relabel": None, "note": None}
        new = dict(old)
        for name, val in changes.items():
            new[name] = None if val is None else str(val)
        for name in ("flag", "relabel", "note"):
            if new[name] != old[name]:
                con.execute("INSERT INTO audit (ts, split, item, field, old, new, source) VALUES (?,?,?,?,?,?,?)",
                            (now, split, item, name, old[name], new[name], source))
        data_hash, fingerprint = identity(split, item) if identity is not None else (None, None)
        con.execute("INSERT INTO flags (split, item, flag, relabel, note, updated, data_hash, fingerprint) "
                    "VALUES (?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(split, item) DO UPDATE SET flag=excluded.flag, relabel=excluded.relabel, "
                    "note=excluded.note, updated=excluded.updated, "
                    "data_hash=COALESCE(excluded.data_hash, flags.data_hash), "
                    "fingerprint=COALESCE(excluded.fingerprint, flags.fingerprint)",
                    (split, item, new["flag"], new["relabel"], new["note"], now, data_hash, fingerprint))
        return new

    @_one_line
    def toggle_flag(self, split: str, item: int | str, flag: str = "mislabeled", source: str = "user") -> str | None:
        """One-click flag: set ``flag`` if the item does not carry it, clear it if it does. The read
        and the write are one transaction, so concurrent clicks are never lost."""
        if flag not in FLAG_VALUES:
            raise ValueError(f"flag must be one of {', '.join(FLAG_VALUES)}, not {flag!r}")
        with self._tx() as con:
            row = con.execute("SELECT flag FROM flags WHERE split=? AND item=?", (split, str(item))).fetchone()
            new = None if (row is not None and row["flag"] == flag) else flag
            self._set_in(con, split, item, {"flag": new}, source, self.identity)
        return new

    @_one_line
    def set_flags(self, split: str, items, **kw) -> None:
        """The same change for many items, in one transaction."""
        source = kw.pop("source", "user")
        changes = {k: v for k, v in kw.items() if v is not ...}
        with self._tx() as con:
            for it in items:
                self._set_in(con, split, it, changes, source, self.identity)

    @_one_line
    def flags(self, split: str | None = None) -> dict[str, dict]:
        q = "SELECT * FROM flags" + (" WHERE split=?" if split else "")
        rows = self._conn().execute(q, (split,) if split else ()).fetchall()
        return {(r["item"] if split else f"{r['split']}:{r['item']}"): dict(r) for r in rows}

    @_one_line
    def flags_off_data(self, data_hash: str) -> list[dict]:
        """Flag rows (every split, gone ones too) not known to refer to the data of ``data_hash``."""
        return [dict(r) for r in self._conn().execute(
            "SELECT * FROM flags WHERE data_hash IS NULL OR data_hash != ?", (data_hash,))]

    @_one_line
    def move_flags(self, moves: list[dict], data_hash: str, source: str = "data changed") -> None:
        """Re-key flag rows in one transaction: each move is {"split", "item"} (where the row is now) and
        {"to_split", "to_item", "fingerprint"} (where it goes); every row is stamped with ``data_hash``.
        A changed key goes to the audit trail. A target already holding a flag of the current data keeps
        it, and the moving row goes to the gone split instead: nothing is overwritten."""
        with self._tx() as con:
            rows = []
            for m in moves:
                r = con.execute("SELECT * FROM flags WHERE split=? AND item=?", (m["split"], m["item"])).fetchone()
                if r is not None:
                    rows.append((m, dict(r)))
                    con.execute("DELETE FROM flags WHERE split=? AND item=?", (m["split"], m["item"]))
            now = time.time()
            for m, r in rows:
                to_split, to_item = m["to_split"], str(m["to_item"])
                if con.execute("SELECT 1 FROM flags WHERE split=? AND item=?", (to_split, to_item)).fetchone():
                    to_split, to_item = m["split"].removesuffix(GONE_SUFFIX) + GONE_SUFFIX, f"{m['item']}@{r['data_hash']}"
                if (to_split, to_item) != (m["split"], m["item"]):
                    con.execute("INSERT INTO audit (ts, split, item, field, old, new, source) VALUES (?,?,?,?,?,?,?)",
                                (now, to_split, to_item, "item", f"{m['split']}:{m['item']}", f"{to_split}:{to_item}",
                                 source))
                con.execute("INSERT OR REPLACE INTO flags (split, item, flag, relabel, note, updated, data_hash, "
                            "fingerprint) VALUES (?,?,?,?,?,?,?,?)",
                            (to_split, to_item, r["flag"], r["relabel"], r["note"], r["updated"], data_hash,
                             m.get("fingerprint", r["fingerprint"])))

    @_one_line
    def audit(self, limit: int = 1000) -> list[dict]:
        return [dict(r) for r in self._conn().execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))]

    # ------------------------------------------------------------ jobs
    @_one_line
    def upsert_job(self, job_id: str, **fields) -> None:
        fields = {k: (json.dumps(v, default=json_default) if k in ("params", "result") and not isinstance(v, str) else v)
                  for k, v in fields.items()}
        fields["updated"] = time.time()
        with self._tx() as con:
            row = con.execute("SELECT id FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                fields.setdefault("created", fields["updated"])
                fields.setdefault("status", "queued")
                fields.setdefault("params", "{}")
                fields.setdefault("kind", "attribute")
                cols = ["id", *fields]
                con.execute(f"INSERT INTO jobs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                            (job_id, *fields.values()))
            else:
                con.execute(f"UPDATE jobs SET {','.join(f'{k}=?' for k in fields)} WHERE id=?", (*fields.values(), job_id))

    @_one_line
    def get_job(self, job_id: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job_row(row) if row else None

    @_one_line
    def list_jobs(self, limit: int = 50) -> list[dict]:
        return [_job_row(r) for r in self._conn().execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))]


def _run_row(row) -> dict:
    d = dict(row)
    for k in ("settings", "meta"):
        if d.get(k):
            d[k] = json.loads(d[k])
    return d


def _job_row(row) -> dict:
    d = dict(row)
    for k in ("params", "result"):
        if d.get(k):
            d[k] = json.loads(d[k])
    return d
