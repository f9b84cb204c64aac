"""Proponent's Streamlit app. Run with ``proponent app [PROJECT]`` (binds to 127.0.0.1)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.jobs.launcher import warm_launcher  # noqa: E402  (standard library only)

if os.environ.get("PROPONENT_SYNC_JOBS") != "1":
    # first thing: the job launcher's imports (4-6 s) run while this process does its own
    warm_launcher()

import streamlit as st  # noqa: E402

from app import services as svc  # noqa: E402
from app import ui  # noqa: E402

st.set_page_config(page_title="Proponent", page_icon="🔎", layout="wide")

# Page files live in app/views/, not app/pages/: Streamlit (1.67) treats a pages/ folder beside the
# entry script as legacy multipage mode, which skips this st.navigation whenever a page URL is
# opened directly (no wide layout, no icons, a stray "main" page).
PAGES = Path(__file__).parent / "views"
pages = [
    st.Page(str(PAGES / "project.py"), title="Project", icon=":material/folder_open:", url_path="project", default=True),
    st.Page(str(PAGES / "attribute.py"), title="Attribute", icon=":material/play_circle:", url_path="attribute"),
    st.Page(str(PAGES / "explore.py"), title="Explore", icon=":material/search:", url_path="explore"),
    st.Page(str(PAGES / "triage.py"), title="Triage", icon=":material/flag:", url_path="triage"),
    st.Page(str(PAGES / "synset.py"), title="Synset", icon=":material/auto_awesome:", url_path="synset"),
    st.Page(str(PAGES / "leakage.py"), title="Leakage", icon=":material/water_drop:", url_path="leakage"),
    st.Page(str(PAGES / "embeddings.py"), title="Embeddings", icon=":material/scatter_plot:", url_path="embeddings"),
    st.Page(str(PAGES / "report.py"), title="Report", icon=":material/description:", url_path="report"),
]
nav = st.navigation(pages)
with st.sidebar:
    root = ui.project_root()
    st.caption(f"Project: `{Path(root).name}`" if root else "No project open")
    st.caption("Scores: positive = proponent (removing it lowers the query's correct-class margin).")


def run_page() -> None:
    """The chosen page. A ProponentError that reaches here (a damaged or locked state.db, deleted
    checkpoints, a run whose files are damaged) is a problem the user can fix: one line, not a
    traceback, and the page stops there."""
    ui.show_save_error()  # a click in a widget callback that could not be saved
    try:
        nav.run()
    except svc.ProponentError as e:
        st.error(ui.one_line(e), icon=":material/error:")
        st.stop()


_timing = os.environ.get("PROPONENT_PAGE_TIMING")  # a file: the latency benchmark splits server from browser time
if _timing:
    import time

    _t0 = time.perf_counter()
    try:
        run_page()
    finally:
        with open(_timing, "a") as _f:
            _f.write(f"{nav.title}\t{time.perf_counter() - _t0:.4f}\t{time.time():.3f}\n")
else:
    run_page()
