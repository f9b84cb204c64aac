"""Streamlit helpers shared by the pages: the open project, caches keyed by run key, image cards."""
from __future__ import annotations

import hashlib
import html
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import streamlit as st

from app import jobs
from app import services as svc
from app.services import clusters, state
from engine.core.progress import unit_of

SIGN = svc.SIGN_HELP
FLAG_ICONS = {None: "", "mislabeled": ":red[:material/flag: mislabeled]", "ok": ":green[:material/check: ok]",
              "ambiguous": ":orange[:material/help: ambiguous]", "leak": ":blue[:material/water_drop: leak]",
              "dismissed": ":gray[dismissed]"}


def sync_jobs() -> bool:
    """Tests (AppTest) run jobs in-process so a click finishes before the script ends."""
    return os.environ.get("PROPONENT_SYNC_JOBS") == "1"


def project_root() -> str | None:
    """The open project: this session's, else the URL's (if the user opened it before in the UI,
    see app.services.state), else the one `proponent app PROJECT` was started with. It is written
    back to the URL so a reload, a deep link or a second tab shows the same project."""
    if not st.session_state.get("project_root"):
        want = st.query_params.get("project")
        if want and state.trusted_project(want):
            st.session_state["project_root"] = str(Path(want).resolve())
        else:
            if want:
                st.session_state["_untrusted_project"] = want
            st.session_state["project_root"] = svc.project_from_env()
    root = st.session_state.get("project_root")
    if root and st.query_params.get("project") != root:
        st.query_params["project"] = root
    return root


def set_project(root: str) -> None:
    """Open ``root`` in this session, in the URL, and in the list of projects a URL may reopen."""
    root = str(Path(root).resolve())
    state.remember_project(root)
    st.session_state["project_root"] = root
    st.query_params.clear()  # another project's run and query do not apply
    st.query_params["project"] = root
    # nor do its review undo stack (Undo would revert project A's decision on project B's flags), its
    # cleaned copy and its picks
    for k in ("_keep_run", "_keep_q", "run", "q", *PROJECT_SESSION_KEYS):
        st.session_state.pop(k, None)


# session keys that belong to the open project (see app/views/triage.py)
PROJECT_SESSION_KEYS = ("rv_undo", "rv_id", "rv_pos", "cleaned", "bulk_sel", "_save_error")


def md(text) -> str:
    """``text`` for st.markdown / st.caption: Markdown's special characters escaped, so a class name such
    as ``**x**`` or ``[a](b)`` shows as written."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~:$])", r"\\\1", str(text))


def save(what: str, write: Callable, *args, **kwargs) -> tuple[bool, object]:
    """Run a click's write to the state database: (True, its result), or, where it fails (locked by
    another process, damaged), (False, None) and one line saying that ``what`` was not saved, instead
    of a traceback or a silent loss. In a widget callback the line is kept in the session and shown by
    :func:`show_save_error` (app/main.py calls it before every page); in a page it shows at once."""
    try:
        return True, write(*args, **kwargs)
    except svc.ProponentError as e:
        st.session_state["_save_error"] = f"Not saved: {what}. {one_line(e)}"
        return False, None


def show_save_error() -> None:
    msg = st.session_state.pop("_save_error", None)
    if msg:
        st.error(msg, icon=":material/error:")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _stamp(root: str) -> tuple:
    r = Path(root)
    out = []
    for f in (r / "project.toml", r / "checkpoints" / "trajectory.json"):
        out.append(f.stat().st_mtime_ns if f.exists() else 0)
    return tuple(out)


@st.cache_resource(show_spinner="Loading project…", max_entries=4)
def _load_project(root: str, stamp: tuple):
    return svc.open_project(root)


def project_at(root: str):
    """The project at ``root``, loaded once per change of its project.toml or trajectory."""
    return _load_project(root, _stamp(root))


def get_project(required: bool = True):
    root = project_root()
    if not root:
        if required:
            if st.session_state.get("_untrusted_project"):
                st.warning(f"The link names the project `{st.session_state['_untrusted_project']}`, which was never "
                           "opened in this app. Opening a project runs its model.py, so open it yourself first.")
            st.page_link("views/project.py", label="Open a project", icon=":material/folder_open:")
            st.stop()
        return None
    try:
        return _load_project(root, _stamp(root))
    except svc.ProponentError as e:
        if required:
            st.error(f"The project cannot be opened: {e}")
            st.stop()
        return None


@st.cache_data(show_spinner=False, max_entries=8)
def predictions(root: str, ck_hash: str, split: str = "test") -> dict:
    return svc.predictions(_load_project(root, _stamp(root)), split)


def project_predictions(project, split: str = "test") -> dict:
    return predictions(str(project.root), project.checkpoint_hash(), split)


# cache_resource, not cache_data: cache_data would pickle the memory-mapped score matrix into RAM
@st.cache_resource(show_spinner="Loading scores…", max_entries=8)
def run_arrays(root: str, key: str) -> dict:
    return svc.load_run(_load_project(root, _stamp(root)), key)


@st.cache_data(show_spinner=False, max_entries=20000)
def png(root: str, split: str, index: int, size: int = 112) -> bytes | None:
    return svc.image_png(_load_project(root, _stamp(root)), split, index, size)


@st.cache_data(show_spinner=False, max_entries=8)
def thumbs(root: str, split: str, indices: tuple, size: int = 32) -> list:
    p = _load_project(root, _stamp(root))
    return [svc.data_uri(svc.image_png(p, split, i, size)) for i in indices]


@st.cache_resource(show_spinner=False)
def _figure_store() -> tuple:
    return OrderedDict(), threading.Lock()


FIGURES_KEPT = 128


def chart(name: str, data, build: Callable[[], object], **kwargs):
    """``st.plotly_chart`` of ``build()``, built once per (name, data) and kept for the server's life;
    returns the chart's selection event. plotly express spends 0.15-0.35 s building and validating a
    figure; a rerun should not pay it again. ``name``: the chart and everything else its figure shows
    (title, colouring, layout); ``data``: its data (a DataFrame or anything hashable)."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        digest = hashlib.sha1(pd.util.hash_pandas_object(data, index=True).values.tobytes()
                              + repr(list(data.columns)).encode()).hexdigest()
    else:
        digest = hashlib.sha1(repr(data).encode()).hexdigest()
    store, lock = _figure_store()
    key = (name, digest)
    with lock:
        fig = store.get(key)
        if fig is not None:
            store.move_to_end(key)
    if fig is None:
        fig = build()
        with lock:
            store[key] = fig
            while len(store) > FIGURES_KEPT:
                store.popitem(last=False)
    return st.plotly_chart(fig, width="stretch", **kwargs)


def svg_chart(svg: str) -> None:
    """An inline SVG chart (app.services.svg_charts). st.html drops SVG (its sanitiser); markdown with
    HTML keeps it, and the SVG is built with every user label escaped."""
    st.markdown(svg, unsafe_allow_html=True)


def db(project):
    return svc.db_for(project)


def _kept_choice(key: str, valid, fallback) -> str:
    """Hand the choice widget ``key`` its value for this run; returns the plain session key that keeps it.

    A widget's state does not carry over to the same key on another page, so the choice lives in a
    plain session key too. A value set under the widget's own key by code (not by the widget) wins,
    then the kept one, then the URL's, then ``fallback``."""
    keep = f"_keep_{key}"
    set_directly = st.session_state.get(key) if st.session_state.get(key) != st.session_state.get(keep) else None
    for cand in (set_directly, st.session_state.get(keep), st.query_params.get(key), fallback):
        if cand in valid:
            st.session_state[key] = st.session_state[keep] = cand
            break
    return keep


def pick_run(project, key: str = "run", label: str = "Attribution run", exclude: str | None = None):
    """A selectbox of finished runs; None with a hint when there are none.

    The choice survives page switches (session), reloads and deep links (``?run=`` in the URL).
    Without a choice the newest per-example run is taken (a cluster-level run such as DDM is never
    the silent default); a newer run than the chosen one is offered, never imposed."""
    runs = [r for r in svc.done_runs(project) if r["key"] != exclude]
    if not runs:
        if exclude is None:
            st.warning("No finished attribution run yet. Run a method on the **Attribute** page.")
        return None
    keys = [r["key"] for r in runs]
    by = {r["key"]: r for r in runs}
    per_example = [k for k in keys if not clusters.is_cluster_run(by[k])]
    newest = (per_example or keys)[0]
    keep = _kept_choice(key, keys, newest)
    choice = st.selectbox(label, keys, key=key, format_func=lambda k: svc.run_label(by[k]),
                          on_change=lambda: st.session_state.__setitem__(keep, st.session_state[key]),
                          help="Finished, cached runs of this project. " + SIGN)
    if exclude is None:
        st.query_params[key] = choice
        if choice != newest and choice in per_example and keys.index(newest) < keys.index(choice):
            c1, c2 = st.columns([4, 1])
            c1.caption(f"A newer run is available: {svc.run_label(by[newest])}.")
            if c2.button("Use it", key=f"{key}_newest"):
                st.session_state[keep] = newest
                st.rerun()
    return by[choice]


def view_choice(label: str, options: dict, key: str, default: str, help: str | None = None) -> str:
    """A horizontal radio of ``options`` (value -> label) whose choice survives page switches (a plain
    session key, as in pick_run), reloads and deep links (``?{key}=`` in the URL)."""
    keep = _kept_choice(key, options, default)
    choice = st.radio(label, list(options), key=key, format_func=options.get, horizontal=True, help=help,
                      on_change=lambda: st.session_state.__setitem__(keep, st.session_state[key]))
    st.query_params[key] = choice
    return choice


def kept_toggle(label: str, key: str, help: str | None = None) -> bool:
    """A toggle that stays as the user left it across page switches (Streamlit drops a widget's state
    when a run does not draw it, so the value lives in a plain session key too)."""
    keep = f"_keep_{key}"
    if key not in st.session_state:
        st.session_state[key] = bool(st.session_state.get(keep, False))
    return st.toggle(label, key=key, help=help,
                     on_change=lambda: st.session_state.__setitem__(keep, st.session_state[key]))


def text_card(text: str, caption: str | None = None):
    """A text example as a readable card."""
    # line breaks as <br>: a blank line inside markdown's HTML block would end it, and the rest of the
    # text would be read as Markdown
    body = "<br>".join(html.escape(line) for line in str(text).splitlines())
    st.markdown(f"<div style='border:1px solid #ddd;border-radius:6px;padding:6px 8px;font-size:0.9em;"
                f"line-height:1.35'>{body}</div>", unsafe_allow_html=True)
    if caption:
        st.caption(caption)


def show_example(project, split: str, index: int, size: int = 112, caption: str | None = None):
    if project.data_format == "text":
        return text_card(svc.example_text(project, split, index) or "", caption)
    data = png(str(project.root), split, int(index), size)
    if data is not None:
        st.image(data, caption=caption, width=size)
    else:
        row = svc.example_row(project, split, index)
        st.dataframe({k: [v] for k, v in row.items()}, hide_index=True)
        if caption:
            st.caption(caption)


def example_cards(project, split: str, items, size: int = 84, per_row: int = 8, note: list | None = None) -> None:
    """Examples as one HTML grid of cards (see app.services.cards for why not one element each).
    ``items``: (index, caption lines[, flag[, split]]) tuples, in display order; ``note``: lines after them."""
    root = str(project.root)
    cards = []
    for item in items:
        index, lines, flag, item_split = (tuple(item) + (None, None))[:4]
        item_split = item_split or split
        card = svc.Card(index=int(index), lines=[str(x) for x in lines], flag=flag)
        if project.data_format == "images":
            card.image = svc.data_uri(png(root, item_split, int(index), size))
        elif project.data_format == "text":
            card.text = svc.example_text(project, item_split, int(index)) or ""
        else:
            card.row = svc.example_row(project, item_split, int(index))
        cards.append(card)
    if cards:
        st.html(svc.cards_html(cards, per_row=per_row, size=size, note=note))


def state_key(key: str, stored) -> str:
    """A widget key for a control that shows stored state (SQLite flags): a new key, so a new widget
    with the stored value as its default, whenever that state changes. Setting the value through
    st.session_state instead did not reach the browser on a session's first run (Streamlit 1.67)."""
    return f"{key}@{hashlib.sha1(repr(stored).encode()).hexdigest()[:10]}"


def flag_pills(project, split: str, indices, key: str, flags: dict, label: str = "Flag as mislabeled") -> None:
    """One control for a grid of cards: a pill per example, selected = flagged mislabeled. A click
    sets or clears that example's flag at once (SQLite, with an audit entry); the pills always show
    the stored flags, so a flag set elsewhere (another page or tab) shows here too."""
    indices = [int(i) for i in indices]
    flagged = [i for i in indices if (flags.get(i) or {}).get("flag") == "mislabeled"]
    wkey = state_key(key, (indices, flagged))

    def _apply():
        now = set(st.session_state.get(wkey) or [])
        added = [i for i in indices if i in now and i not in flagged]
        removed = [i for i in flagged if i not in now]
        ok = True
        if added:
            ok, _ = save(f"the flag on {split} " + ", ".join(f"#{i}" for i in added), svc.bulk_update, db(project),
                         split, added, flag="mislabeled", source="app")
        if removed and ok:
            ok, _ = save(f"clearing the flag on {split} " + ", ".join(f"#{i}" for i in removed), svc.bulk_update,
                         db(project), split, removed, flag=None, source="app")
        if not ok:  # the pills show what is stored, not the click that was lost
            st.session_state[wkey] = flagged
            return
        for i in added + removed:
            st.toast(f"{split} #{i}: {'flagged mislabeled' if i in added else 'flag cleared'}")

    st.pills(label, indices, selection_mode="multi", default=flagged, format_func=lambda i: f"#{i}", key=wkey,
             on_change=_apply, help="Click an example's number to flag it as mislabeled (click again to clear). Saved "
                                    "at once to the project's SQLite state with an audit entry.")


JOB_POLL_S = 0.5  # the panel's poll: a finished job shows within this (the fragment reads one SQLite row per job)


def job_panel(project, kinds: tuple = ("attribute",), title: str = "Jobs"):
    """Live progress of this project's background jobs (polled every JOB_POLL_S)."""

    polling = any(j["kind"] in kinds for j in jobs.active_jobs(project))

    @st.fragment(run_every=JOB_POLL_S if polling else None)
    def _panel():
        act = [j for j in jobs.active_jobs(project) if j["kind"] in kinds]
        seen = st.session_state.setdefault("_seen_jobs", set())
        finished = [j for j in jobs.list_jobs(project, 10) if j["id"] in seen and j["status"] not in jobs.ACTIVE]
        for j in act:
            seen.add(j["id"])
            p = j.get("params") or {}
            what = p.get("method") or p.get("kind") or j["kind"]
            total, done = j.get("total") or 0, j.get("done") or 0
            frac = min(1.0, done / total) if total else 0.0
            rate = j.get("rate")
            eta = j.get("eta")
            text = (f"{j['kind']} · {what} · {j.get('stage') or j['status']}: {done}/{total}"
                    + (f" · {rate:.3g} {unit_of(j.get('stage'))}/s" if rate else "") + (f" · ETA {eta:.0f}s" if eta is not None else ""))
            c1, c2 = st.columns([5, 1])
            c1.progress(frac, text=text)
            if j["status"] == "cancelling":
                c2.caption("cancelling…")
            elif c2.button("Cancel", key=f"cancel_{j['id']}"):
                jobs.cancel_job(project, j["id"])
                st.rerun(scope="fragment")
        if finished:
            for j in finished:
                seen.discard(j["id"])
            st.rerun(scope="app")

    _panel()


def last_job(project, kind: str, match: dict | None = None) -> dict | None:
    for j in jobs.list_jobs(project, 50):
        if j["kind"] != kind:
            continue
        p = j.get("params") or {}
        if match and any(p.get(k) != v for k, v in match.items()):
            continue
        return j
    return None


def start(project, kind: str, params: dict) -> str:
    jid = jobs.start_job(project, kind, params, background=not sync_jobs())
    st.session_state.setdefault("_seen_jobs", set()).add(jid)
    return jid


def fmt_seconds(s: float) -> str:
    """12 s, 3.5 min, 1.2 h."""
    s = float(s)
    if s < 90:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_flag(flag) -> str:
    if flag is None or (isinstance(flag, float) and flag != flag):  # a table cell without a flag is NaN
        return "—"
    return FLAG_ICONS.get(flag, str(flag)) or "—"


def cluster_run_section(project, run, title: str, help_text: str):
    """Header, method description and the loaded cluster results of a DDM run (None if unloadable)."""
    st.subheader(title, help=help_text)
    st.info(clusters.method_description(run["method"]))
    try:
        return clusters.load_cluster_run(project, run)
    except svc.ProponentError as e:
        st.error(f"The cluster results cannot be loaded: {e}")
        return None
