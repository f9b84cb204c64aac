"""Leakage: suspected train/test duplicates side by side; flag or dismiss each pair."""
import pandas as pd
import plotly.express as px
import streamlit as st

from app import jobs, ui
from app import services as svc

st.title("Leakage: train/test duplicates")
project = ui.get_project()
root = str(project.root)
run = ui.pick_run(project)
if run is None:
    st.stop()
db = ui.db(project)


st.caption(f"This run's method ({run['method']}) for leak search: {svc.leak_search_note(run['method'])}. "
           "The copy detector's decision does not depend on it; the run only corroborates.")


@st.cache_data(show_spinner="Finding suspected duplicates…", max_entries=8)
def _pairs(root: str, key: str, job_id: str | None, copies_id: str | None):
    det = (jobs.get_job(root, job_id) or {}).get("result") if job_id else None
    cop = (jobs.get_job(root, copies_id) or {}).get("result") if copies_id else None
    return svc.leak_pairs(ui.project_at(root), key, det, copies=cop)


def _done(job):
    return job["id"] if job and job["status"] == "done" else None


params = {"run": run["key"], "method": run["method"], "settings": run.get("settings") or {}}
copy_job = ui.last_job(project, "copies", {"run": run["key"]})
det_job = ui.last_job(project, "leaks", {"run": run["key"]})
copies_done, done_job = _done(copy_job), _done(det_job)
if not copies_done:
    st.caption("Showing the quick check (input similarity among the run's top proponents). The copy detector "
               "(exact match, perceptual hash, shift-tolerant input cosine; thresholds from a null of training "
               "queries) is the recommended decision; it runs in the background.")
    if st.button("Run the copy detector (recommended)", key="copy_detect", type="primary"):
        ui.start(project, "copies", params)
        st.rerun()
    if copy_job and copy_job["status"] == "failed":
        st.error(f"The copy detector failed: {copy_job.get('message')}")
if not done_job:
    if st.button("Also run the attribution-calibrated detector", key="leak_detect",
                 help="Flags a query whose top proponent's self-match passes a threshold set on training queries."):
        ui.start(project, "leaks", params)
        st.rerun()
    if det_job and det_job["status"] == "failed":
        st.error(f"The detector failed: {det_job.get('message')}")
if not (copies_done and done_job):
    ui.job_panel(project, kinds=("copies", "leaks"))
res = _pairs(root, run["key"], done_job, copies_done)
pairs = res["pairs"]
st.caption(f"Source: {res['source']}. Decision: {res['rule']}.")
pf = svc.flag_state(db, "pair")
m0, m1, m2 = st.columns(3)
m0.metric("Copy detector flags", "not run" if res["copy_flagged"] is None else res["copy_flagged"],
          help="Exact match, perceptual hash or shift-tolerant input cosine past thresholds set on training queries. "
               "A pair is shown as flagged when any decision flags it.")
m1.metric("Quick check flags", res["quick_flagged"], help="Input-space cosine ≥ the threshold with a top proponent.")
m2.metric("Calibrated detector flags", "not run" if res["calibrated_flagged"] is None else res["calibrated_flagged"],
          help="The run's top-proponent self-match past a threshold from a null of training queries.")

if pairs:
    df = pd.DataFrame(pairs)[["cosine", "score", "flagged", "test_index", "train_index"]]

    def pairs_figure():
        fig = px.scatter(df, x="cosine", y="score", color=df["flagged"].map({True: "flagged", False: "not flagged"}),
                         hover_data=["test_index", "train_index"], title="Attribution score vs input similarity")
        fig.update_layout(xaxis_title="input-space cosine similarity",
                          yaxis_title="attribution score (positive = proponent)",
                          legend_title="detector", height=280, margin=dict(t=40, b=10))
        fig.update_traces(hovertemplate="test %{customdata[0]} ↔ train %{customdata[1]}<br>cosine %{x:.3f}<br>score "
                          "%{y:.4g}<br>" + svc.SIGN_HELP.replace(". ", ".<br>") + "<extra></extra>")
        return fig

    ui.chart("leak pairs", df, pairs_figure)

show_all = st.checkbox("Show pairs the detector did not flag too", value=False, key="leak_all")
n_show = st.number_input("Pairs shown", 1, max(1, len(pairs)), min(12, max(1, len(pairs))), key="leak_n")
shown = [p for p in pairs if show_all or p["flagged"]][: int(n_show)]
if not shown:
    st.info("No pair crosses the detector's threshold. Tick the box above to inspect the closest pairs anyway.")
for p in shown:
    t, i = p["test_index"], p["train_index"]
    item = f"{t}:{i}"
    cur = (pf.get(item) or {}).get("flag")
    c = st.columns([1, 1, 3])
    with c[0]:
        ui.show_example(project, "test", t, size=84, caption=f"test #{t} (label {project.class_name(int(project.test_dataset.y[t]))})")
    with c[1]:
        ui.show_example(project, "train", i, size=84, caption=f"train #{i} (label {project.class_name(int(project.train_dataset.y[i]))})")
    with c[2]:
        state = {None: "not run", True: "flagged", False: "not flagged"}
        st.caption(f"score {p['score']:+.4g} · cosine {p['cosine']:.4f} · copy detector: {state[p.get('copy')]} · "
                   f"quick check: {state[p['quick']]} · calibrated: {state[p.get('calibrated')]} · "
                   f"yours: {ui.fmt_flag(cur)}", help=svc.SIGN_HELP)
        st.caption(f"Why: {p['why']}.")
        if p.get("attribution"):
            st.caption(f"Attribution: {p['attribution']}.")
        b1, b2 = st.columns(2)
        if b1.button("Leak", key=f"leak_{item}", help="Record this pair as a leak (and flag the training row)"):
            db.set_flag("pair", item, flag="leak", source="app-leakage")
            db.set_flag("train", i, flag="leak", source="app-leakage")
            st.rerun()
        if b2.button("Dismiss", key=f"dismiss_{item}", help="Not a leak"):
            db.set_flag("pair", item, flag="dismissed", source="app-leakage")
            st.rerun()
