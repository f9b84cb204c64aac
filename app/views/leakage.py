"""Leakage: suspected train/test duplicates side by side; flag or dismiss each pair."""
import pandas as pd
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

    series = []
    for flagged, name, colour in ((False, "not flagged", "#9ecae1"), (True, "flagged", "#d62728")):
        g = df[df["flagged"] == flagged]
        if len(g):
            series.append(svc.Series(name, [float(v) for v in g["score"]], x=[float(v) for v in g["cosine"]],
                                     colour=colour,
                                     tooltips=[f"test #{t} ↔ train #{i} · cosine {c:.3f} · score {sc:+.4g} "
                                               "(positive = proponent)" for t, i, c, sc in
                                               zip(g["test_index"], g["train_index"], g["cosine"], g["score"])]))
    ui.svg_chart(svc.xy_chart(series, title="Attribution score vs input similarity",
                         x_title="input-space cosine similarity", y_title="score (+ = proponent)", width=960,
                         height=280))

show_all = st.checkbox("Show pairs the detector did not flag too", value=False, key="leak_all")
n_show = st.number_input("Pairs shown", 1, max(1, len(pairs)), min(12, max(1, len(pairs))), key="leak_n")
shown = [p for p in pairs if show_all or p["flagged"]][: int(n_show)]
if not shown:
    st.info("No pair crosses the detector's threshold. Tick the box above to inspect the closest pairs anyway.")
STATE = {None: "not run", True: "flagged", False: "not flagged"}


def _decide(item: str, train_index: int, key: str) -> None:
    """A pair's decision, saved at once (a locked database: one line saying it was not saved)."""
    ok, _ = ui.save(f"the decision on pair test #{item.split(':')[0]} ↔ train #{train_index}", _write_decision, item,
                    train_index, key)
    if not ok:  # the control shows what is stored, not the click that was lost
        st.session_state[key] = (pf.get(item) or {}).get("flag") if (pf.get(item) or {}).get("flag") in (
            "leak", "dismissed") else None


def _write_decision(item: str, train_index: int, key: str) -> None:
    """A leak also flags the training row; taking a leak back (clear or dismiss) clears the row's leak
    flag unless another pair still marks it."""
    want = st.session_state.get(key)
    was = (pf.get(item) or {}).get("flag")
    db.set_flag("pair", item, flag=want if want in ("leak", "dismissed") else None, source="app-leakage")
    if want == "leak":
        db.set_flag("train", train_index, flag="leak", source="app-leakage")
    elif was == "leak":
        others = [k for k, r in pf.items() if k != item and r.get("flag") == "leak"
                  and k.split(":")[1] == str(train_index)]
        if not others and (db.flags("train").get(str(train_index)) or {}).get("flag") == "leak":
            db.set_flag("train", train_index, flag=None, source="app-leakage")


for p in shown:
    t, i = p["test_index"], p["train_index"]
    item = f"{t}:{i}"
    cur = (pf.get(item) or {}).get("flag")
    # one HTML block per pair (both images and why) and one decision control: each pair used to be
    # about ten Streamlit elements, which a page switch paid for
    note = [f"score {p['score']:+.4g} · cosine {p['cosine']:.4f}",
            f"copy detector: {STATE[p.get('copy')]} · quick check: {STATE[p['quick']]} · "
            f"calibrated: {STATE[p.get('calibrated')]}",
            f"Why: {p['why']}."] + ([f"Attribution: {p['attribution']}."] if p.get("attribution") else [])
    ui.example_cards(project, "test",
                     [(t, [f"test #{t} (label {project.class_name(int(project.test_dataset.y[t]))})"]),
                      (i, [f"train #{i} (label {project.class_name(int(project.train_dataset.y[i]))})"], cur, "train")],
                     size=84, per_row=5 if project.data_format == "images" else 3, note=note)
    stored = cur if cur in ("leak", "dismissed") else None
    key = ui.state_key(f"pair_{item}", stored)
    st.segmented_control(f"Pair test #{t} ↔ train #{i}", ["leak", "dismissed"], key=key, default=stored,
                         format_func={"leak": "Leak", "dismissed": "Dismiss"}.get, on_change=_decide,
                         args=(item, int(i), key), label_visibility="collapsed",
                         help="Leak: record the pair as a leak and flag the training row. Dismiss: not a leak. "
                              "Click the chosen one again to clear it. Saved at once.")
