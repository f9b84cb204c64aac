"""Triage: ranked suspects, bulk flags/relabels/notes, what-if, exports."""
import numpy as np
import streamlit as st

from app import jobs, ui
from app import services as svc
from app.services import clusters

st.title("Triage: mislabeled data")
project = ui.get_project()
root = str(project.root)
run = ui.pick_run(project)
if run is None:
    st.stop()
db = ui.db(project)


@st.cache_data(show_spinner="Ranking suspects…", max_entries=8)
def _base(root: str, key: str, method: str, ranking_job: str | None = None):
    if ranking_job:
        result = (jobs.get_job(root, ranking_job) or {}).get("result")
        return svc.recommended_table(ui.project_at(root), key, method, result, flags={})
    return svc.triage_table(ui.project_at(root), key, method, flags={})


RANKINGS = ("recommended", "run")
rank_by = st.radio("Ranking", RANKINGS, horizontal=True, key="t_ranking",
                   format_func=lambda r: {"recommended": "Recommended (combined evidence)",
                                          "run": f"This run's suspicion ({run['method']})"}[r],
                   help="Recommended: TRAK self-influence, opposition to its own class, the out-of-sample probability "
                        "of its label and its neighbours' labels, combined with weights fitted on generated validation "
                        "projects (it beat cleanlab there; docs/benchmarks.md). The run's suspicion uses one method.")
# a ranking belongs to the weights and data it was computed on: after a retrain it is offered again
rank_key = {"checkpoints": project.checkpoint_hash(), "data": project.train_data_hash}
rank_job = ui.last_job(project, "triage", rank_key) if rank_by == "recommended" else None
ranking_done = rank_job["id"] if rank_job and rank_job["status"] == "done" else None
if rank_by == "recommended" and not ranking_done:
    st.caption("The recommended ranking is not computed yet (it fits TRAK and kNN and cross-validates the recipe "
               "5 times when affordable); the table shows this run's suspicion until it is.")
    if st.button("Compute the recommended ranking", key="t_rank_start", type="primary"):
        ui.start(project, "triage", {"device": "auto", **rank_key})
        st.rerun()
    if rank_job and rank_job["status"] == "failed":
        st.error(f"The recommended ranking failed: {rank_job.get('message')}")
    ui.job_panel(project, kinds=("triage",))
table = _base(root, run["key"], run["method"], ranking_done).copy()
run_scores = ui.run_arrays(root, run["key"])["scores"]
flags = svc.flag_state(db, "train")
for col in ("flag", "relabel", "note"):
    table[col] = [(flags.get(int(i)) or {}).get(col) for i in table["index"]]

found = svc.truth_found(project, db)
if found:
    t1, t2, t3 = st.columns(3)
    t1.metric("Planted mislabels found by your flags", f"{found['mislabeled_found']} / {found['mislabeled_planted']}",
              help="From the sample's truth.json (methods never read it).")
    t2.metric("Flags that are not planted mislabels", found["mislabeled_false"])
    t3.metric("Planted leaks found", f"{found['leaks_found']} / {found['leaks_planted']}")

f1, f2, f3 = st.columns([2, 2, 1])
cls = f1.multiselect("Class (given label)", [str(c) for c in project.classes], key="t_classes")
state = f2.selectbox("Flag state", ["all", "unflagged", "flagged", "mislabeled", "ok", "ambiguous", "leak"],
                     key="t_state")
PAGE_MAX = 500  # rows per page: a data editor stays responsive at this size whatever n_train is
top_n = int(f3.number_input("Rows per page", 1, max(1, min(PAGE_MAX, len(table))), max(1, min(50, len(table))),
                            step=10, key="t_top", help=f"At most {PAGE_MAX}; page through the rest below."))
view = table
if cls:
    view = view[view["label"].isin(cls)]
if state == "unflagged":
    view = view[view["flag"].isna()]
elif state == "flagged":
    view = view[view["flag"].notna()]
elif state != "all":
    view = view[view["flag"] == state]
n_pages = max(1, -(-len(view) // top_n))
page_no = 1
if n_pages > 1:
    if int(st.session_state.get("t_page", 1)) > n_pages:  # the filters shrank the list: back to its last page
        st.session_state["t_page"] = n_pages
    page_no = int(st.number_input(f"Page (of {n_pages:,}; {len(view):,} suspects match)", min_value=1,
                                  max_value=n_pages, key="t_page"))
view = view.iloc[(page_no - 1) * top_n: page_no * top_n].reset_index(drop=True)
# one way of looking at a time: every interactive element costs each page switch its drawing in the
# browser (the table's data grid alone about 0.08-0.15 s in scratch paired A/B runs in Chromium, stop 29),
# so the page draws the chosen view only; the choice stays across pages and reloads, and is in the URL
VIEWS = {"review": "One by one", "table": "Table", "grid": "Grid"}
shown_as = ui.view_choice("View", VIEWS, key="view", default="review",
                          help="One by one: the suspect large, beside typical examples, with keys to decide. "
                               "Table: every evidence column, with flag, relabel and note cells to edit. Grid: "
                               "the suspects as cards, to pick some for the bulk actions.")

same_as_self = bool(len(table)) and np.allclose(table["suspicion"], table["self_influence"], equal_nan=True)
if ranking_done:
    why_susp = ("the recommended ranking, each evidence in its own column (ev_…): "
                + "; ".join(f"{k}: {v}" for k, v in svc.EVIDENCE_COLUMNS.items()))
elif clusters.is_cluster_run(run):
    why_susp = "members of clusters whose simulated removal lowers validation loss, per member; cluster-derived"
elif same_as_self:
    why_susp = "the example's self-influence S[i, i], so only that column is shown"
else:
    why_susp = "the method's own mislabel score, shown beside its self-influence"
st.caption(f"Most suspicious first ({'recommended' if ranking_done else run['method'] + ' suspicion'}: {why_susp}). "
           "Evidence: self-influence, how many test queries it is a top-10 opponent of, and the ensemble's "
           "probability of the given label." + (" Edit flag / relabel / note cells directly; they save at once."
                                                if shown_as == "table" else ""))
if shown_as == "table":
    shown = view.drop(columns=["self_influence"]) if same_as_self else view.copy()
    if project.data_format == "images" and len(shown):
        shown.insert(2, "image", ui.thumbs(root, "train", tuple(int(i) for i in shown["index"])))
    elif project.data_format == "text" and len(shown):
        shown.insert(2, "text", svc.example_texts(project, "train", shown["index"]))
    # the editor's key changes after every write and with the filters, so an edit is applied exactly once
    # and a stale edit can never land on another row or undo a later bulk action
    ver = st.session_state.setdefault("editor_v", 0)
    ekey = f"editor_{run['key']}_{ver}_" + svc.stable_hash([cls, state, top_n, page_no], 8)
    edited = st.data_editor(
        shown, hide_index=True, key=ekey, height=360,
        disabled=[c for c in shown.columns if c not in svc.EDITABLE],
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "text": st.column_config.TextColumn("text", width="large"),
            "suspicion": st.column_config.NumberColumn(format="%.4g", help="Higher: more likely mislabeled. " + svc.SIGN_HELP),
            "self_influence": st.column_config.NumberColumn(format="%.4g", help="S[i, i]: the example's score on itself."),
            "p_label": st.column_config.NumberColumn("p(label)", format="%.3f", help="Ensemble probability of the given label."),
            "opponent_of": st.column_config.NumberColumn("opponent of", help="Test queries for which it is a top-10 opponent."),
            "flag": st.column_config.SelectboxColumn("flag", options=list(svc.FLAG_VALUES)),
            "relabel": st.column_config.SelectboxColumn("relabel", options=[str(c) for c in project.classes]),
            "note": st.column_config.TextColumn("note"),
            **{f"ev_{k}": st.column_config.NumberColumn(k.replace("_", " "), format="%.3g", help=v)
               for k, v in svc.EVIDENCE_COLUMNS.items()},
        })
    ok, n_changed = ui.save("the table edit", svc.apply_table_edits, db, shown, edited)
    if not ok:  # a new editor shows what is stored, not the edit that was lost
        st.session_state["editor_v"] = ver + 1
        ui.show_save_error()
    elif n_changed:
        st.session_state["editor_v"] = ver + 1
        st.toast(f"saved {n_changed} change(s)")
        st.rerun()

# ---------------------------------------------------------------- grid
grid_sel: list[int] = []
if shown_as == "grid":
    st.caption("The first 48 suspects of the list (its filters and page): pick their numbers to select them for the "
               "bulk actions below.")
    grid_ids = [int(i) for i in view["index"]][:48]
    by_row = view.set_index("index")
    ui.example_cards(project, "train", [(gi, [f"#{gi} · {by_row.loc[gi, 'label']}→{by_row.loc[gi, 'suggested']}",
                                              f"suspicion {by_row.loc[gi, 'suspicion']:.3g}"],
                                         by_row.loc[gi, "flag"] if isinstance(by_row.loc[gi, "flag"], str) else None)
                                        for gi in grid_ids],
                     size=96, per_row=4 if project.data_format == "text" else 6)
    st.pills("Select for the bulk actions below", grid_ids, selection_mode="multi", format_func=lambda i: f"#{i}",
             key="grid_sel")
    grid_sel = [gi for gi in grid_ids if gi in (st.session_state.get("grid_sel") or [])]
    if grid_sel:
        st.caption(f"{len(grid_sel)} selected in the grid: they are the bulk actions' targets below.")

def _own_influences(i: int, row) -> None:
    """The suspect as a query: which training examples hold its given label up (proponents) and which
    pull against it (opponents)."""
    path = svc.train_query_scores_path(project, i, run["key"])
    if not path.is_file():
        job = ui.last_job(project, "suspect", {"index": i, "run": run["key"]})
        if job and job["status"] in jobs.ACTIVE:
            ui.job_panel(project, kinds=("suspect",))
        elif st.button("Its own proponents and opponents", key="rv_own", shortcut="P",
                       help="Scores the suspect as a query (the margin of its given label) with this run's method, "
                            "in the background. Key: P."):
            ui.start(project, "suspect", {"index": i, "method": run["method"], "run": run["key"],
                                          "settings": run.get("settings") or {}})
            st.rerun()
        if job and job["status"] == "failed":
            st.error(f"Failed: {job.get('message')}")
        return
    own = np.array(svc.load_npy(path, mmap=False), dtype=np.float64)
    own[i] = np.nan  # sorts last both ways: a training example is always its own top proponent
    top = svc.topk(own, 6)
    labels = table.set_index("index")["label"]
    for what, ids, scores in (("proponents: they hold its given label up", top["proponents"], top["proponent_scores"]),
                              ("opponents: they pull against its given label", top["opponents"], top["opponent_scores"])):
        st.caption(f"Its own top {what} (itself left out)")
        ui.example_cards(project, "train", [(int(j), [f"#{int(j)} {labels.get(int(j), '')} · {sc:+.2g}"])
                                            for j, sc in zip(ids, scores)], size=72, per_row=6)


# ---------------------------------------------------------------- one-by-one review
if shown_as == "review":
    st.subheader("Review one by one", help="The suspects of the list, in its order and filters, one at a time: "
                 "large, beside typical examples of the given and the suggested class, with the test predictions it "
                 "opposes most. A decision saves at once and moves to the next suspect; Undo puts the last one back.")
    order = [int(i) for i in view["index"]]
    if order:
        # the suspect shown is remembered by its index, so a decision that filters it out of the view
        # (e.g. "unflagged") moves to the next suspect rather than skipping one
        cur = st.session_state.get("rv_id")
        pos = order.index(cur) if cur in order else min(int(st.session_state.get("rv_pos", 0)), len(order) - 1)
        i = order[pos]
        st.session_state["rv_id"], st.session_state["rv_pos"] = i, pos
        row = table.set_index("index").loc[i]
        nav1, nav2, nav3 = st.columns([1, 1, 4])
        if nav1.button("◀ Previous", key="rv_prev", disabled=pos == 0, shortcut="Left"):
            st.session_state["rv_id"] = order[pos - 1]
            st.rerun()
        if nav2.button("Next ▶", key="rv_next", disabled=pos >= len(order) - 1, shortcut="Right"):
            st.session_state["rv_id"] = order[pos + 1]
            st.rerun()
        nav3.caption(f"Suspect {pos + 1} of {len(order)} · train #{i} · given **{ui.md(row['label'])}** · suggested "
                     f"**{ui.md(row['suggested'])}** · suspicion {row['suspicion']:.4g} · p(given label) "
                     f"{row['p_label']:.3f} · flag now: {ui.fmt_flag(row['flag'])}"
                     + (f" → relabel {ui.md(row['relabel'])}" if row['relabel'] else ""))
        big, typ = st.columns([1, 3])
        with big:
            ui.show_example(project, "train", i, size=224, caption=f"train #{i} (given {row['label']})")
        with typ:
            for cls_name, what in ((row["label"], "given"), (row["suggested"], "suggested")):
                ids = svc.typical_examples(table, cls_name, 6, exclude=i)
                st.caption(f"Typical {cls_name} ({what} class): the examples the model is surest about")
                ui.example_cards(project, "train", [(int(j), [f"#{j}"]) for j in ids], size=72, per_row=6)
            hurt = svc.hurt_queries(run_scores, i, 6)
            if hurt:
                st.caption("Test predictions it opposes most (removing it is predicted to raise their margin)")
                ui.example_cards(project, "test", [(int(q), [f"test #{q} · {sc:+.2g}"]) for q, sc in hurt], size=72,
                                 per_row=6)
            if not clusters.is_cluster_run(run):
                _own_influences(i, row)
        d = st.columns(6)
        decision = None
        # keys: M mislabeled, L relabel to the suggested label, O ok, A ambiguous, K leak, U undo, ←/→ move
        # (Streamlit reserves C and R)
        for c, (label, act, key_) in zip(d, (("Mislabeled", "mislabeled", "M"),
                                             (f"Relabel → {row['suggested']}", "relabel", "L"),
                                             ("OK", "ok", "O"), ("Ambiguous", "ambiguous", "A"), ("Leak", "leak", "K"))):
            if c.button(label, key=f"rv_{act}", shortcut=key_):
                decision = act
        # each entry names its project: a decision made in another project (this session had it open
        # before) is never undone here, on this project's flags
        undo_stack = st.session_state.setdefault("rv_undo", [])
        undo_stack[:] = [u for u in undo_stack if u.get("project") == root]
        if d[5].button("Undo", key="rv_undo_btn", disabled=not undo_stack, shortcut="U"):
            prior = undo_stack[-1]
            ok, _ = ui.save(f"undoing the decision on train #{prior['index']}", svc.undo_decision, db, prior)
            if not ok:  # kept on the stack: Undo can be clicked again
                ui.show_save_error()
            else:
                undo_stack.pop()
                st.session_state["rv_id"] = prior["index"]
                st.session_state["editor_v"] = st.session_state.get("editor_v", 0) + 1
                st.rerun()
        if decision:
            ok, prior = ui.save(f"the decision '{decision}' on train #{i}", svc.review_decision, db, i, decision,
                                str(row["suggested"]))
            if not ok:  # this suspect stays shown, so the decision can be made again
                ui.show_save_error()
            else:
                undo_stack.append({**prior, "project": root})
                st.session_state["rv_id"] = order[pos + 1] if pos + 1 < len(order) else i
                st.session_state["editor_v"] = st.session_state.get("editor_v", 0) + 1
                st.toast(f"train #{i}: {decision}")
                st.rerun()
    else:
        st.caption("No suspect matches the filters.")

# ---------------------------------------------------------------- cluster data-quality assessment (DDM)
if clusters.is_cluster_run(run):
    cr = ui.cluster_run_section(project, run, "Cluster data-quality assessment", clusters.QUALITY_HELP)
    if cr is not None:
        hz = clusters.harmful_clusters(cr, flags)
        st.caption(f"**Cluster-derived.** {len(hz)} of {cr.n_clusters} clusters lower the validation loss (held-out "
                   "training rows, never test data) when their removal is simulated; most harmful first. Residual: "
                   "the method's own quality signal (lower is better); treat clusters with a high residual with "
                   "caution.", help=clusters.QUALITY_HELP)
        if len(hz):
            hshown = hz.copy()
            if project.data_format == "images":
                hshown.insert(2, "medoid image", ui.thumbs(root, "train", tuple(int(i) for i in hshown["medoid"])))
            st.dataframe(hshown, hide_index=True, key="harmful_clusters",
                         column_config={
                             "medoid image": st.column_config.ImageColumn("medoid", width="small"),
                             "validation loss change": st.column_config.NumberColumn(format="%+.4g",
                                                                                     help=clusters.QUALITY_HELP),
                             "residual": st.column_config.NumberColumn(format="%.3f", help=clusters.RESIDUAL_HELP),
                             "medoid": st.column_config.NumberColumn("medoid (train #)")})
            c1, c2 = st.columns([3, 2])
            cids = [int(c) for c in hz["cluster"]]
            sizes = dict(zip(cids, (int(v) for v in hz["size"])))
            csel = c1.multiselect("Clusters", cids, key="cluster_sel",
                                  format_func=lambda c: f"cluster {c} ({sizes[c]} members)")
            cflag = c2.selectbox("Flag members as", list(svc.FLAG_VALUES), key="cluster_flag")
            n_mem = len(clusters.cluster_members(cr, csel)) if csel else 0
            if st.button(f"Flag the {n_mem} member(s) of {len(csel)} cluster(s)", key="cluster_flag_apply",
                         disabled=not csel, help="Flags every training example in the selected clusters (each "
                                                 "change goes to the audit trail)."):
                ok, n = ui.save(f"the {cflag} flag on the clusters' members", clusters.flag_cluster_members, db, cr,
                                csel, cflag)
                if not ok:
                    ui.show_save_error()
                else:
                    st.session_state["editor_v"] = st.session_state.get("editor_v", 0) + 1
                    st.toast(f"flagged {n} example(s) {cflag}")
                    st.rerun()
        else:
            st.success("No cluster's simulated removal lowers the validation loss.")

# ---------------------------------------------------------------- bulk actions
# in the grid view, whose picks are their targets, always; elsewhere behind a toggle that stays as left
if shown_as == "grid":
    st.subheader("Bulk actions")
    bulk_on = True
else:
    bulk_on = ui.kept_toggle("Bulk actions", key="t_bulk",
                             help="Flag, relabel or note many suspects at once, and export a selection as CSV.")
if bulk_on:
    b1, b2 = st.columns([3, 2])
    choices = [int(i) for i in view["index"]]
    label_of = dict(zip((int(i) for i in table["index"]), table["label"]))
    sel = b1.multiselect("Training examples", choices, key="bulk_sel", format_func=lambda i: f"#{i} (label {label_of[i]})")
    top_k_sel = b2.number_input("…or the top N shown", 0, len(choices), 0, key="bulk_topn")
    targets = sel or grid_sel or choices[: int(top_k_sel)]
    action = st.selectbox("Action", ["flag mislabeled", "flag ok", "flag ambiguous", "flag leak", "clear flag",
                                     "relabel to suggested", "add note"], key="bulk_action")
    note = st.text_input("Note", key="bulk_note") if action == "add note" else None
    def _bulk() -> int:
        if action.startswith("flag "):
            return svc.bulk_update(db, "train", targets, flag=action.split(" ", 1)[1])
        if action == "clear flag":
            return svc.bulk_update(db, "train", targets, flag=None)
        if action == "relabel to suggested":
            sug = table.set_index("index")["suggested"]
            for i in targets:
                db.set_flag("train", i, relabel=sug[i], source="app-bulk")
            return len(targets)
        return svc.bulk_update(db, "train", targets, note=note or None)

    if st.button(f"Apply to {len(targets)} example(s)", key="bulk_apply", disabled=not targets):
        ok, n = ui.save(f"{action} on {len(targets)} example(s)", _bulk)
        st.session_state["editor_v"] = st.session_state.get("editor_v", 0) + 1
        if not ok:
            ui.show_save_error()
        else:
            st.toast(f"{action}: {n} example(s) updated")
            st.rerun()
    st.download_button(f"Export the {len(targets)} selected (CSV)",
                       lambda sel=tuple(targets): svc.selection_csv(project, db, sel, table),
                       file_name=f"{project.name}-selection.csv", mime="text/csv", key="dl_selection",
                       disabled=not targets, help="index, file, given and suggested label, score, flag, note, time")

n_unflagged = int(table["flag"].isna().sum())
counts = table["flag"].dropna().value_counts().rename_axis("flag").reset_index(name="examples")
flag_title = f"Flags set so far ({len(table) - n_unflagged} flagged, {n_unflagged:,} not reviewed)"


fl = [str(f) for f in counts["flag"]]
ui.svg_chart(svc.bar_chart(fl, [svc.Series("examples", [int(v) for v in counts["examples"]],
                                      colours=[svc.FLAG_COLOURS.get(f, "#7f7f7f") for f in fl],
                                      tooltips=[f"{f}: {int(v)} training examples" for f, v in zip(fl, counts["examples"])])],
                      title=flag_title, x_title="flag state", y_title="training examples (count)", height=260))

# ---------------------------------------------------------------- what-if
# a toggle, not always built: each widget costs a page switch (see project.py); on while a what-if runs
w_active = any(j["kind"] == "whatif" for j in jobs.active_jobs(project))
if st.toggle("What-if: predict the effect of the flags on the test set", key="t_whatif", value=w_active):
    flags = svc.flag_state(db, "train")
    to_remove = sorted(i for i, r in flags.items() if r.get("flag") in ("mislabeled", "leak") and not r.get("relabel"))
    to_relabel = {i: r["relabel"] for i, r in flags.items() if r.get("relabel")}
    w1, w2 = st.columns(2)
    w_action = w1.radio("Edit", ["remove", "relabel"], horizontal=True, key="w_action",
                        help="remove: the examples flagged mislabeled or leak; relabel: the examples with a new label")
    no_retrain = svc.retrain_refusal(project, 1)
    w_retrain = w2.checkbox("Check with a real retrain", value=False, key="w_retrain", disabled=no_retrain is not None,
                            help=f"Off: {no_retrain}." if no_retrain else "Retrain with the recipe on the edited data")
    idx = to_remove if w_action == "remove" else sorted(to_relabel)
    st.caption(f"{len(idx)} example(s) in the edit set.")
    if st.button("Predict the effect", key="whatif", disabled=not idx):
        params = {"indices": idx, "action": w_action, "retrain": bool(w_retrain)}
        if w_action == "relabel":
            params["new_labels"] = [svc.label_value(to_relabel[i], project.train_df[project.label_column].dtype)
                                    for i in idx]
        ui.start(project, "whatif", params)
    ui.job_panel(project, kinds=("whatif",))
    j = ui.last_job(project, "whatif")
    if j and j["status"] == "done":
        r = j["result"]
        pred = r["predicted"]
        c = st.columns(3)
        c[0].metric("Test accuracy now", f"{pred['before']['accuracy']:.1%}")
        c[1].metric("Predicted after the edit (GIF)", f"{pred['after']['accuracy']:.1%}",
                    delta=f"{pred['accuracy_change']:+.1%}")
        if "retrained" in r:
            c[2].metric("Real retrain", f"{r['retrained']['after']['accuracy']:.1%}",
                        delta=f"{r['retrained']['accuracy_change']:+.1%}")
        if pred.get("warning"):
            st.warning(pred["warning"])
        st.caption(f"{len(pred['flips'])} test predictions change (predicted); edit of {pred['n_edited']} rows, "
                   f"{pred['action']}; GIF took {pred.get('seconds', float('nan')):.1f}s"
                   + (f", the real retrain {r['retrained']['seconds']:.1f}s ({len(r['retrained']['flips'])} predictions "
                      f"changed; {r['comparison']['flips_found']} of them predicted)." if "comparison" in r else "."))
    elif j and j["status"] == "failed":
        st.error(f"What-if failed: {j.get('message')}")

# ---------------------------------------------------------------- exports
if st.toggle("Export: the flags (CSV, JSON) and a cleaned copy of the dataset", key="t_export",
             value=bool(st.session_state.get("cleaned"))):
    e1, e2, e3 = st.columns(3)
    suspects = _base(root, run["key"], run["method"], ranking_done)
    # callables: the files are built when a button is clicked, not on every rerun
    e1.download_button("Flags (CSV)", lambda: svc.export_flags_csv(project, db, suspects), file_name=f"{project.name}-flags.csv",
                       mime="text/csv", key="dl_csv")
    e2.download_button("Flags (JSON)", lambda: svc.export_flags_json(project, db, suspects), file_name=f"{project.name}-flags.json",
                       mime="application/json", key="dl_json")
    if e3.button("Make a cleaned copy of the dataset", key="clean",
                 help="Drops rows flagged mislabeled or leak, applies relabels; written under .proponent/exports"):
        out = svc.export_cleaned(project, db)
        st.session_state["cleaned"] = out
    if st.session_state.get("cleaned"):
        out = st.session_state["cleaned"]
        st.success(f"Cleaned copy: {out['n_train']} training rows ({out['removed']} removed, {out['relabelled']} relabelled) "
                   f"at `{out['folder']}`")
        if out.get("skipped"):
            st.warning(f"Left out of the copy ({len(out['skipped'])}): " + "; ".join(ui.md(x) for x in out["skipped"][:10])
                       + ("…" if len(out["skipped"]) > 10 else ""))
        st.download_button("Download the cleaned copy (zip)", lambda: svc.zip_folder(out["folder"]),
                           file_name=f"{project.name}-cleaned.zip", mime="application/zip", key="dl_clean")
