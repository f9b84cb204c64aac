"""Explore: a query, its prediction, and its top-k proponents and opponents."""
import bisect

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import services as svc
from app import ui
from app.services import clusters

st.title("Explore: proponents and opponents")
project = ui.get_project()
root = str(project.root)
run = ui.pick_run(project)
if run is None:
    st.stop()
arr = ui.run_arrays(root, run["key"])
S = arr["scores"]
preds = ui.project_predictions(project, "test")
flags = svc.flag_state(ui.db(project), "train")
self_inf = arr["self_scores"] if arr["self_scores"] is not None else np.zeros(S.shape[1])
train_preds = ui.project_predictions(project, "train")

# ---------------------------------------------------------------- query choice and the query
QUERY_PAGE = 50  # rows of the query table per page
left, mid, right = st.columns([5, 2, 3])
with left:
    st.markdown("**Choose a query**")
    f1, f2 = st.columns([3, 2])
    classes = f1.multiselect("True class", [str(c) for c in project.classes], key="f_classes")
    correctness = f2.selectbox("Prediction", ["all", "correct", "wrong"], key="f_correct")
    conf = st.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.01, key="f_conf",
                     help="The model's top class probability for the query.")
    table = svc.query_table(project, preds, classes=classes, correctness=correctness, conf_range=conf)
    n_match = len(table)
    matches = [int(i) for i in table["test_index"]]  # in test-index order
    # the table is drawn on request only: its data grid costs every switch to this page about 0.08 s of
    # drawing in the browser (scratch paired A/B runs in Chromium, stop 29); stepping needs no table
    if ui.kept_toggle("Browse the matches in a table", key="t_qtable",
                      help="A table of the matching queries with thumbnails, 50 rows a page; click a row to "
                           "choose it. Stays on across pages until turned off."):
        # a page of the table at a time: thumbnails are made and sent for the rows shown only (360
        # thumbnails re-sent on every rerun made each switch slower; at 100k test rows it would not load)
        n_pages = max(1, -(-n_match // QUERY_PAGE))
        if n_pages > 1:
            if int(st.session_state.get("q_page", 1)) > n_pages:  # the filters shrank the list
                st.session_state["q_page"] = n_pages
            q_page = int(st.number_input(f"Table page (of {n_pages:,}, {QUERY_PAGE} rows each)", min_value=1,
                                         max_value=n_pages, key="q_page"))
            table = table.iloc[(q_page - 1) * QUERY_PAGE: q_page * QUERY_PAGE].reset_index(drop=True)
        if project.data_format == "images" and len(table):
            table.insert(1, "image", ui.thumbs(root, "test", tuple(int(i) for i in table["test_index"])))
        elif project.data_format == "text" and len(table):
            table.insert(1, "text", svc.example_texts(project, "test", table["test_index"]))
        event = st.dataframe(table, hide_index=True, height=230, on_select="rerun", selection_mode="single-row",
                             key="qtable",
                             column_config={"test_index": st.column_config.NumberColumn("test #"),
                                            "image": st.column_config.ImageColumn("image", width="small"),
                                            "confidence": st.column_config.NumberColumn(format="%.3f"),
                                            "margin": st.column_config.NumberColumn(
                                                format="%.2f", help="Correct-class margin z_y − logsumexp of the others")})
        rows = event.selection.rows if event is not None and hasattr(event, "selection") else []
        if rows:
            picked = int(table.iloc[rows[0]]["test_index"])
            if st.session_state.get("_last_pick") != picked:
                st.session_state["_last_pick"] = picked
                st.session_state["q"] = st.session_state["_keep_q"] = picked
    # the query lives in a plain session key (widget state does not survive a page switch), then the URL
    set_directly = st.session_state.get("q") if st.session_state.get("q") != st.session_state.get("_keep_q") else None
    for cand in (set_directly, st.session_state.get("_keep_q"), st.query_params.get("q"), 0):
        if cand is not None and str(cand).isdigit() and int(cand) < S.shape[0]:
            st.session_state["q"] = st.session_state["_keep_q"] = int(cand)
            break

    def _go(target: int) -> None:  # a callback: it runs before the number input is drawn again
        st.session_state["q"] = st.session_state["_keep_q"] = target

    qi, qp, qn = st.columns([3, 1, 1], vertical_alignment="bottom")
    q = int(qi.number_input("Test query index", 0, S.shape[0] - 1, step=1, key="q",
                            on_change=lambda: st.session_state.__setitem__("_keep_q", st.session_state["q"])))
    st.query_params["q"] = str(q)
    cut = bisect.bisect_left(matches, q)
    prev_q = matches[cut - 1] if cut > 0 else None
    nxt = cut + (cut < len(matches) and matches[cut] == q)
    next_q = matches[nxt] if nxt < len(matches) else None
    qp.button("◀", key="q_prev", disabled=prev_q is None, on_click=_go, args=(prev_q,),
              shortcut="Left", help="The previous query that matches the filters. Key: ←.")
    qn.button("▶", key="q_next", disabled=next_q is None, on_click=_go, args=(next_q,),
              shortcut="Right", help="The next query that matches the filters. Key: →.")
    st.caption(f"{n_match:,} of {S.shape[0]:,} test queries match"
               + ("" if not matches else f"; test #{q} is {'one of them' if nxt > cut else 'not one of them'}")
               + ". Step through them with ◀ ▶, type an index, or browse them in the table.")

with mid:
    st.markdown(f"**Query: test #{q}**")
    ui.show_example(project, "test", q, size=144)
    lab, pr = int(preds["label"][q]), int(preds["pred"][q])
    st.markdown(f"True label **{ui.md(project.class_name(lab))}** · predicted **{ui.md(project.class_name(pr))}** "
                + (":green[(correct)]" if lab == pr else ":red[(wrong)]"))
    st.metric("Margin", f"{preds['margin'][q]:.2f}", help="Correct-class margin z_y − logsumexp_{j≠y} z_j; "
              "what the scores explain. " + svc.SIGN_HELP)
with right:
    probs = preds["probs"][q]
    names = [str(c) for c in project.classes]
    ui.svg_chart(svc.bar_chart(names, [svc.Series("probability", [float(v) for v in probs],
                                             colours=["#d62728" if i == pr else "#1f77b4" for i in range(len(probs))],
                                             tooltips=[f"class {c}: probability {v:.3f}" for c, v in zip(names, probs)])],
                          title="Class probabilities", x_title="class", y_title="probability", y_range=(0.0, 1.0),
                          width=420, height=300))

k = st.slider("k (proponents and opponents shown)", 3, 16, 8, key="k")
top = svc.topk(S[q], k)


# ---------------------------------------------------------------- cards
def cards(indices, scores, role: str, prefix: str = ""):
    """The examples as one grid of cards, and one flag control for them."""
    per_row = 4 if project.data_format == "text" else 8  # text cards need the width to be readable
    items = []
    for i, s in zip(indices, scores):
        i = int(i)
        items.append((i, [f"#{i} · score {s:+.3g}",
                          f"label {project.class_name(int(project.train_dataset.y[i]))} · "
                          f"pred {project.class_name(int(train_preds['pred'][i]))}",
                          f"self-inf {self_inf[i]:.3g}"], (flags.get(i) or {}).get("flag")))
    ui.example_cards(project, "train", items, size=84, per_row=per_row)
    ui.flag_pills(project, "train", [i for i, _, _ in items], key=f"{prefix}{role}_flags", flags=flags,
                  label=f"Flag {role}s as mislabeled")


# ---------------------------------------------------------------- cluster-level results (DDM)
if clusters.is_cluster_run(run):
    cr = ui.cluster_run_section(project, run, "These groups drive this prediction", clusters.CLUSTER_HELP)
    if cr is not None:
        nk = st.slider("Clusters shown per side", 1, max(2, min(8, cr.n_clusters)), min(3, cr.n_clusters),
                       key="k_clusters")
        qc = clusters.query_clusters(cr, q, nk)
        st.caption("**Cluster-derived.** Predicted effect = margin(all data) − margin(without the cluster), "
                   "simulated by the method. Positive: a proponent cluster (removing it is predicted to lower this "
                   "query's margin); negative: an opponent cluster. Residual: the method's own quality signal "
                   "(0 = perfect gradient match, 1 = none).", help=clusters.CLUSTER_HELP)
        st.dataframe(clusters.query_cluster_frame(qc), hide_index=True, key="query_clusters",
                     column_config={
                         "predicted effect": st.column_config.NumberColumn(format="%+.4g", help=clusters.CLUSTER_HELP),
                         "residual": st.column_config.NumberColumn(format="%.3f", help=clusters.RESIDUAL_HELP),
                         "medoid": st.column_config.NumberColumn("medoid (train #)")})
        for role, key in (("Proponent", "proponents"), ("Opponent", "opponents")):
            if not qc[key]:
                st.caption(f"No {role.lower()} cluster for this query (no cluster has a "
                           f"{'positive' if key == 'proponents' else 'negative'} predicted effect).")
            for r in qc[key]:
                st.markdown(f"**{role} cluster {r['cluster']}** · class {ui.md(r['class'])} · {r['size']} members · "
                            f"predicted effect {r['effect']:+.4g} · residual {r['residual']:.3f}",
                            help=clusters.CLUSTER_HELP)
                shown_m = [r["medoid"]] + [i for i in r["members"] if i != r["medoid"]][:15]
                if project.data_format == "images":
                    st.image([ui.png(root, "train", i, 56) for i in shown_m],
                             caption=[("medoid " if i == r["medoid"] else "") + f"#{i}" for i in shown_m], width=56)
                else:
                    st.caption("Members: " + ", ".join(f"#{i}" for i in shown_m)
                               + (" …" if r["size"] > len(shown_m) else ""))
    st.caption(f"Per-example scores below are cluster-derived too ({run['method']}: cluster effect / cluster size).")

st.subheader(f"Top-{k} proponents", help=svc.SIGN_HELP)
st.caption("Training examples whose removal is predicted to lower this query's margin the most (positive scores).")
cards(top["proponents"], top["proponent_scores"], "proponent")
st.subheader(f"Top-{k} opponents", help=svc.SIGN_HELP)
st.caption("Training examples whose removal is predicted to raise the margin (negative scores).")
cards(top["opponents"], top["opponent_scores"], "opponent")

ids = list(top["proponents"]) + list(top["opponents"])[::-1]
vals = [float(v) for v in list(top["proponent_scores"]) + list(top["opponent_scores"])[::-1]]
# ranked bars: one category per example in rank order, never a numeric axis of training indexes
ui.svg_chart(svc.bar_chart([f"#{i}" for i in ids],
                      [svc.Series("score", vals, colours=["#2ca02c" if v > 0 else "#d62728" for v in vals],
                                  tooltips=[f"train #{i}: score {v:+.4g} ({'proponent' if v > 0 else 'opponent'})"
                                            for i, v in zip(ids, vals)])],
                      title=f"Scores of the top-{k} proponents and opponents ({run['method']})",
                      x_title="training example (ranked)", y_title="score (+ = proponent)", width=960, height=300))

# ---------------------------------------------------------------- an uploaded input
if st.toggle("Upload a new input as the query", key="t_upload"):  # a toggle: nothing built until wanted
    kind = "an image" if project.data_format == "images" else "a one-row CSV with the feature columns"
    up = st.file_uploader(f"Upload {kind}", type=["png", "jpg", "jpeg", "bmp"] if project.data_format == "images"
                          else ["csv"], key="q_upload")
    if up is not None:
        try:
            xq = svc.query_from_upload(project, up.getvalue(), up.name)
        except svc.ProponentError as e:
            st.error(str(e))
            xq = None
        if xq is not None:
            qid = svc.save_query(project, xq)
            pq = svc.uploaded_prediction(project, xq)
            u1, u2 = st.columns([1, 3])
            with u1:
                if project.data_format == "images":
                    st.image(svc.array_png(xq[0], 144), caption="uploaded (as the model sees it)", width=144)
                st.markdown(f"Predicted **{ui.md(project.class_name(pq['pred']))}** ({pq['probs'].max():.1%})")
            with u2:
                names = [str(c) for c in project.classes]
                lab = st.selectbox("Explain the margin of class", list(range(len(names))), index=pq["pred"],
                                   format_func=lambda c: names[c], key="q_upload_label",
                                   help="Scores explain this class's margin (default: the predicted class).")
                path = svc.query_scores_path(project, qid, run["key"], lab)
                if not path.is_file():
                    if st.button("Attribute this input", key="q_upload_run",
                                 help="Runs in the background; reuses the cached features of this run."):
                        ui.start(project, "query", {"qid": qid, "method": run["method"], "run": run["key"],
                                                    "settings": run.get("settings") or {}, "label": int(lab)})
                        st.rerun()
                    ui.job_panel(project, kinds=("query",))
                    jq = ui.last_job(project, "query", {"qid": qid})
                    if jq and jq["status"] == "failed":
                        st.error(f"Failed: {jq.get('message')}")
            if path.is_file():
                row = svc.load_npy(path, mmap=False)
                tu = svc.topk(row, k)
                st.markdown(f"**Top-{k} proponents of the uploaded input** (margin of class {ui.md(names[lab])}: "
                            f"{pq['margins'][lab]:.2f})", help=svc.SIGN_HELP)
                cards(tu["proponents"], tu["proponent_scores"], "proponent", prefix="up_")
                st.markdown(f"**Top-{k} opponents of the uploaded input**", help=svc.SIGN_HELP)
                cards(tu["opponents"], tu["opponent_scores"], "opponent", prefix="up_")

# ---------------------------------------------------------------- compare
# toggles, not always built: each widget costs every page switch (see project.py)
if st.toggle("Compare with another run", key="t_compare"):
    other = ui.pick_run(project, key="run2", label="Compare with", exclude=run["key"])
    if other is None:
        st.caption("Run a second method (or the same with other settings) on the Attribute page to compare.")
    else:
        S2 = ui.run_arrays(root, other["key"])["scores"]
        cmp = svc.compare_rows(S[q], S2[q], k)
        m1, m2 = st.columns(2)
        m1.metric(f"Top-{k} proponent overlap", f"{cmp['overlap_count']}/{k}")
        m2.metric("Spearman rank correlation", f"{cmp['spearman']:.3f}", help="Over all training examples, this query.")
        top2 = svc.topk(S2[q], k)
        st.caption(f"{other['method']}: top-{k} proponents")
        cards(top2["proponents"], top2["proponent_scores"], "proponent", prefix="cmp_")

# ---------------------------------------------------------------- verify
# on by itself while this query has a Verify job, running or finished, so its result shows
v_job = ui.last_job(project, "verify", {"run": run["key"], "query": q})
if st.toggle("Verify by retraining without the top proponents", key="t_verify", value=v_job is not None):
    v1, v2 = st.columns([3, 1])
    ks = v1.multiselect("Remove the top-k proponents for k in", [5, 10, 20, 40, 80], default=[5, 10, 20], key="verify_ks")
    trials = v2.number_input("Random removals per k", 0, 10, 3, key="verify_trials")
    why = svc.verify_available(project, sorted(ks), random_trials=int(trials))
    if st.button("Verify", key="verify", disabled=why is not None or not ks,
                 help=why or "Retrain (2 seeds) without the top-k proponents and compare the query's margin with k random "
                             "removals. Runs in the background."):
        kw = svc.verify_kwargs(query=q, method=run["method"], settings=run.get("settings"),
                               scores_row=S[q], k_values=sorted(ks), random_trials=int(trials))
        ui.start(project, "verify", {"kwargs": kw, "run": run["key"], "query": q})
    if why:
        st.caption(f"Verify is off: {why}.")
    else:
        ui.job_panel(project, kinds=("verify",))
        j = ui.last_job(project, "verify", {"run": run["key"], "query": q})
        if j and j["status"] == "done":
            res = j["result"]
            vf = svc.verify_frame(res)
            fig = go.Figure()
            fig.add_trace(go.Scatter(x=vf["k"], y=vf["change (top-k removed)"], mode="lines+markers",
                                     name="top-k proponents removed"))
            fig.add_trace(go.Scatter(x=vf["k"], y=vf["change (k random, mean)"], mode="lines+markers", name="k random removed",
                                     error_y=dict(type="data", array=vf["random std"].fillna(0))))
            fig.add_hline(y=0, line_dash="dot")
            fig.update_layout(title=f"Margin change of test #{q} after retraining (base margin {res['base_margin']:.2f})",
                              xaxis_title="k (training examples removed)", yaxis_title="margin change (after − before)",
                              height=320, margin=dict(t=40, b=10))
            st.plotly_chart(fig, width="stretch")
            st.caption("Proponents are confirmed when removing them lowers the margin more than random removals. "
                       + (f"Removing the top-{res['flip_k']} flips the prediction." if res.get("flip_k") else ""))
            st.dataframe(vf, hide_index=True)
        elif j and j["status"] == "failed":
            st.error(f"Verify failed: {j.get('message')}")
