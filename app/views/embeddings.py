"""Embeddings: influence-feature map next to a penultimate-feature map; lasso/box selection → flags."""
import os

import plotly.express as px
import streamlit as st

from app import jobs
from app import services as svc
from app import ui

st.title("Embeddings")
project = ui.get_project()
root = str(project.root)
db = ui.db(project)

c1, c2 = st.columns(2)
if "e_reducer" not in st.session_state:
    ready = [r for r in svc.REDUCERS if all(svc.cached_embedding(project, k, r) is not None
                                            for k in ("influence", "penultimate"))]
    st.session_state["e_reducer"] = ready[0] if ready else svc.DEFAULT_REDUCER
LAYOUTS = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
reducer = c1.selectbox("Layout", list(svc.REDUCERS), key="e_reducer", format_func=LAYOUTS.get,
                       help="t-SNE (the default: mislabels as visible as with UMAP on validation digits projects, "
                            "and no 15-20 s compilation on first use; scripts/bench_embeddings.py), UMAP, or a quick "
                            "PCA. Maps are cached on disk.")
colour = c2.selectbox("Colour by", ["label", "prediction", "flag", "self_influence"], key="e_colour")
KINDS = {"influence": "Influence embedding",
         "penultimate": "Penultimate features"}
st.caption("Left: projected margin gradients of the model's predicted class at the final checkpoint (TRAK's "
           "features), cosine geometry; a mislabeled example sits among its true class, so coloured by label it "
           "shows as an odd colour. Right: the inputs of the model's last layer, for contrast. Hover a point for its "
           "index and label; draw a lasso or box to select.")
embs = {k: svc.cached_embedding(project, k, reducer) for k in KINDS}
missing = [k for k, v in embs.items() if v is None]
# the maps whose job for this layout is under way (each map is its own job)
computing = {(j.get("params") or {}).get("kind") for j in jobs.active_jobs(project)
             if j["kind"] == "embedding" and (j.get("params") or {}).get("reducer") == reducer} if missing else set()
if missing:
    st.info(f"Maps not computed yet for {reducer}: {', '.join(missing)}. They run as a background job and are cached.")
    if st.button("Compute maps", key="e_compute"):
        # the maps run at once, the cores shared between them (OpenMP threads beyond the cores spin)
        share = max(1, (os.cpu_count() or 1) // len(missing))
        for k in missing:
            ui.start(project, "embedding", {"kind": k, "reducer": reducer, "threads": share})
        st.rerun()
    ui.job_panel(project, kinds=("embedding",))

run = None
runs = svc.done_runs(project)
if colour == "self_influence":
    if runs:
        run = ui.run_arrays(root, runs[0]["key"])
        st.caption(f"Self-influence from {runs[0]['method']} ({runs[0]['key']}).")
    else:
        st.warning("No finished run for self-influence; colouring by label.")
        colour = "label"
preds = ui.project_predictions(project, "train")
flags = svc.flag_state(db, "train")

# flags stand out: grey for unflagged points, strong colours for decisions
FLAG_COLOURS = {"none": "#d0d0d0", "mislabeled": "#d62728", "leak": "#1f3fff", "ok": "#2ca02c",
                "ambiguous": "#ff7f0e", "dismissed": "#7f7f7f"}
gen = st.session_state.setdefault("e_sel_gen", 0)  # a new chart key clears the selection
selected: list[int] = []
cols = st.columns(2)
for col, (kind, title) in zip(cols, KINDS.items()):
    emb = embs[kind]
    with col:
        if emb is None:
            # an empty chart where the map will be: the browser loads and compiles plotly's script
            # while the map computes, not after (about a second of the wait on this 2-core machine),
            # and the page does not jump when the map arrives
            busy = kind in computing

            def placeholder(title=title, busy=busy):
                import plotly.graph_objects as go

                fig = go.Figure()
                fig.add_annotation(text="computing…" if busy else "not computed yet", showarrow=False,
                                   x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=16, color="#888"))
                fig.update_layout(title=f"{title} ({LAYOUTS[reducer]})", height=460, margin=dict(t=40, b=10),
                                  xaxis=dict(visible=False), yaxis=dict(visible=False))
                return fig

            ui.chart(f"map placeholder {kind} {reducer} {busy}", None, placeholder, key=f"map_wait_{kind}")
            continue
        df = svc.embedding_frame(project, emb, colour, flags=flags, run=run, preds=preds)
        n_total = int(emb["n_total"])
        sub = (f" ({len(df):,} of {n_total:,} drawn; a box or lasso selects all {n_total:,})"
               if len(df) < n_total and "xy_all" in emb else
               f" (subsample: {len(df):,} of {n_total:,})" if len(df) < n_total else f" ({len(df):,} examples)")
        order = {c: sorted(df[c].unique(), key=lambda v: (len(str(v)), str(v))) for c in ("label", "prediction", "flag")
                 if c in df}
        if colour == "flag":  # unflagged points first, so flagged ones are drawn on top
            df = df.assign(_o=(df["flag"] != "none").astype(int)).sort_values("_o", kind="stable")

        def map_figure(df=df, title=title + sub, order=order):
            fig = px.scatter(df, x="x", y="y", color=colour, custom_data=["index", "label"], category_orders=order,
                             color_continuous_scale="Viridis", title=title,
                             color_discrete_map=FLAG_COLOURS if colour == "flag" else None,
                             render_mode="webgl" if len(df) > 5000 else "auto")
            fig.update_traces(marker=dict(size=5),
                              hovertemplate="train #%{customdata[0]}<br>label %{customdata[1]}<extra></extra>")
            fig.update_layout(xaxis_title=f"{LAYOUTS[reducer]} 1 (arbitrary units)",
                              yaxis_title=f"{LAYOUTS[reducer]} 2 (arbitrary units)",
                              height=460, margin=dict(t=40, b=10), dragmode="lasso",
                              legend_title=colour if colour != "self_influence" else None)
            if colour == "self_influence":
                fig.update_layout(coloraxis_colorbar_title="self-influence")
            return fig

        # built once per (map, colouring, layout, data): a rerun (a selection, a flag) does not rebuild it
        event = ui.chart(f"map {kind} {colour} {reducer} {title + sub}", df, map_figure, on_select="rerun",
                         selection_mode=("lasso", "box"), key=f"map_{kind}_{gen}")
        picked = svc.selected_rows(event, emb)
        seen = set(selected)
        selected += [i for i in picked if i not in seen]

st.subheader("Selection")
if not selected:
    st.caption("Draw a lasso or a box on either map to select training examples.")
else:
    st.write(f"{len(selected)} training example(s) selected. Flagging applies to all of them; clear the "
             "selection to start again.")
    a1, a2, a3, a4, a5, a6 = st.columns(6)
    for col, flag in zip((a1, a2, a3, a4), ("mislabeled", "ok", "ambiguous", "leak")):
        if col.button(f"Flag {flag}", key=f"sel_{flag}"):
            ok, n = ui.save(f"the {flag} flag on {len(selected)} example(s)", svc.bulk_update, db, "train", selected,
                            flag=flag, source="app-embeddings")
            if ok:
                st.toast(f"{n} flagged {flag}")
            else:
                ui.show_save_error()
    if a5.button("Clear selection", key="sel_clear"):
        st.session_state["e_sel_gen"] = gen + 1
        st.rerun()
    # built when clicked (not on every rerun), so the file carries the flags as they are then
    a6.download_button("Export (CSV)", lambda sel=tuple(selected): svc.selection_csv(project, db, sel),
                       file_name="selection.csv",
                       mime="text/csv", key="sel_export",
                       help="The selected examples with their file, given label, flag, note and time (the flags "
                            "export's columns).")
    note = st.text_input("Note for the selection", key="sel_note", placeholder="e.g. blurry scans from one source",
                         help="Saved on every selected example (and kept in the audit trail).")
    if st.button("Save the note", key="sel_note_save", disabled=not note.strip()):
        ok, n = ui.save(f"the note on {len(selected)} example(s)", svc.bulk_update, db, "train", selected,
                        note=note.strip(), source="app-embeddings")
        if ok:
            st.toast(f"note saved on {n} example(s)")
        else:
            ui.show_save_error()
    show = selected[:24]
    ui.example_cards(project, "train", [(int(i), [f"#{i} label {project.class_name(int(project.train_dataset.y[i]))}"])
                                        for i in show], size=64, per_row=4 if project.data_format == "text" else 8)
    if len(selected) > len(show):
        st.caption(f"…and {len(selected) - len(show)} more.")
