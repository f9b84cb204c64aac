"""Project: open a sample, a server folder or an uploaded zip; summary of data, model and runs."""

import pandas as pd
import streamlit as st

from app import services as svc
from app import ui

st.title("Project")

# toggles, not expanders, around forms: an expander's content is built and sent on every rerun
# even when closed, and each of these forms cost a page switch its widgets
if st.toggle("Open a project", value=ui.project_root() is None, key="t_open"):
    st.warning("Opening a project runs its model.py (the model factory) in this server process, with your "
               "permissions. Open only projects whose model.py you trust.", icon="⚠️")
    src = st.radio("Source", ["Sample project", "Folder on the server", "Upload a zip"], horizontal=True, key="src")
    if src == "Sample project":
        st.caption("The digits sample: sklearn 8×8 digits, an MLP, ~8% flipped labels and a few test images leaked "
                   "into training (recorded in truth.json, which no method reads).")
        if st.button("Open the digits sample", key="open_sample"):
            with st.spinner("Preparing the sample (first time only)…"):
                try:
                    ui.set_project(str(svc.open_sample("digits")))
                    st.rerun()
                except svc.ProponentError as e:
                    st.error(str(e))
    elif src == "Folder on the server":
        path = st.text_input("Project folder (holding project.toml)", key="folder")
        if st.button("Open folder", key="open_folder"):
            try:
                p = svc.open_project(path)
                ui.set_project(str(p.root))
                st.rerun()
            except svc.ProponentError as e:
                st.error(f"Validation failed — {e}")
    else:
        up = st.file_uploader("Project archive (.zip, at most 200 MiB unpacked)", type=["zip"], key="upload")
        if up is not None and st.button("Unpack and open", key="open_zip"):
            try:
                folder = svc.extract_upload(up.getvalue())  # the app's private upload folder (0700)
                p = svc.open_project(folder)
                ui.set_project(str(p.root))
                st.rerun()
            except svc.ProponentError as e:
                st.error(f"Upload rejected — {e}")

if st.toggle("New project from a folder", key="t_new"):
    st.caption("A data folder on the server: an ImageFolder tree (train/ and test/, one sub-folder per class), or "
               "train and test tables (CSV, Parquet, JSONL) of image paths, text or features. Proponent writes "
               "project.toml and a model.py template there, as `proponent init` does; edit model.py to build your "
               "model, then upload its weights below.")
    new_path = st.text_input("Data folder", key="new_folder")
    if st.button("Inspect", key="inspect_folder"):
        try:
            st.session_state["new_found"] = (new_path, svc.inspect_new_folder(new_path))
        except svc.ProponentError as e:
            st.error(str(e))
    found = st.session_state.get("new_found")
    if found and found[0] == new_path:
        for note in found[1]["notes"]:
            st.markdown(f"- {note}")
        st.markdown("Guessed `[data]`: " + ", ".join(f"`{k} = {v!r}`" for k, v in found[1]["data"].items()
                                                    if not k.startswith("_")))
        st.markdown("Weights found: " + (", ".join(f"`{w}`" for w in found[1]["weights"]) or "none"))
        force = st.checkbox("Overwrite an existing project.toml and model.py", key="new_force")
        if st.button("Write project.toml and model.py", key="create_project"):
            try:
                res = svc.create_project(new_path, force=force)
                st.code("\n".join(res["report"]), language=None)
                try:
                    svc.open_project(res["root"])
                    ui.set_project(res["root"])
                    st.rerun()
                except svc.ProponentError as e:
                    st.warning(f"Written, but the project does not load yet — {e}")
            except svc.ProponentError as e:
                st.error(str(e))

project = ui.get_project(required=False)
if project is None:
    if st.session_state.get("_untrusted_project"):
        st.warning(f"The link names the project `{st.session_state['_untrusted_project']}`, which was never opened in "
                   "this app. Opening a project runs its model.py, so open it above if you trust it.")
    st.info("No project is open yet: open the sample, a folder on the server or an uploaded archive above.")
    st.stop()


@st.cache_data(show_spinner="Summarising…", max_entries=4)
def _summary(root: str, ck: str, nruns: int) -> dict:
    return svc.project_summary(ui.project_at(root))


runs_now = svc.list_runs(project)
s = _summary(str(project.root), project.checkpoint_hash(), len(runs_now))
st.subheader(s["name"])
st.caption(f"`{s['root']}`")
c = st.columns(4)
c[0].metric("Data format", s["format"])
c[1].metric("Classes", s["num_classes"])
c[2].metric("Training examples", f"{s['n_train']:,}")
c[3].metric("Test examples", f"{s['n_test']:,}")
c = st.columns(4)
c[0].metric("Parameters", f"{s['parameters']:,}")
c[1].metric("Test accuracy", "—" if s["test_accuracy"] is None else f"{s['test_accuracy']:.1%}",
            help="Mean over the final checkpoint of each trained model.")
c[2].metric("Checkpoints", s["checkpoints"])
c[3].metric("Trained models", s["models"])
for w in s.get("warnings", []):
    st.warning(w)

left, right = st.columns([3, 2])
with left:
    st.markdown("**Examples from each class** (training set)")
    if project.data_format == "images":
        y = project.train_dataset.y.numpy()
        per_class = [[int(i) for i in (y == ci).nonzero()[0][:3]] for ci in range(project.num_classes)]
        per_row = min(10, project.num_classes)
        items = []  # a column per class (for up to 10 classes), three examples down
        for lo in range(0, project.num_classes, per_row):
            block = range(lo, min(lo + per_row, project.num_classes))
            for r in range(3):
                items += [(per_class[ci][r], [f"{project.class_name(ci)} · #{per_class[ci][r]}"])
                          for ci in block if r < len(per_class[ci])]
        ui.example_cards(project, "train", items, size=56, per_row=per_row)
    else:
        st.dataframe(project.table_head("train", 10), hide_index=False)
with right:
    counts = pd.DataFrame({"class": list(s["train_counts"]), "train": list(s["train_counts"].values()),
                           "test": [s["test_counts"].get(k, 0) for k in s["train_counts"]]})
    cls = [str(k) for k in counts["class"]]
    ui.svg_chart(svc.bar_chart(cls, [svc.Series(split, [int(v) for v in counts[split]],
                                           tooltips=[f"class {c}, {split}: {int(v)} examples" for c, v in
                                                     zip(cls, counts[split])]) for split in ("train", "test")],
                          title="Examples per class", x_title="class", y_title="examples (count)", width=520, height=300))

st.markdown("**Recorded trajectory**")
traj = pd.DataFrame(s["trajectory"])
if len(traj):
    series = []
    for m, g in traj.groupby("model", sort=True):
        g = g[g["lr"].notna() & g["step"].notna()].sort_values("step")
        series.append(svc.Series(f"model {m}", [float(v) for v in g["lr"]], x=[float(v) for v in g["step"]],
                                 lines=True, tooltips=[f"model {m} · checkpoint {r.checkpoint} · epoch {r.epoch} · "
                                                       f"step {r.step} · lr {float(r.lr):.3g}"
                                                       + (f" · stage {r.stage}" if isinstance(r.stage, str) else "")
                                                       for r in g.itertuples()]))
    ui.svg_chart(svc.xy_chart(series, title="Checkpoints along training", x_title="optimizer step",
                         y_title="learning rate", width=960, height=260, y_from_zero=True))
    if st.toggle(f"Table of the {len(traj)} checkpoints", key="t_ckpts"):
        st.dataframe(traj, hide_index=True)
elif project.checkpoints:
    st.caption(f"No recorded trajectory: the weights are your own ([model] weights, {s['models']} model(s)). Every "
               "final-weights method runs; Source, TracIn and DDM need a trajectory (`proponent import`).")
else:
    st.warning("No checkpoints recorded. Run `proponent train PROJECT` first.")

if st.toggle("Upload weights", key="t_weights"):
    st.caption("A .safetensors file (or a .pt state dict of tensors only; nothing is unpickled) of the model "
               "model.py builds. It is checked against model.py, saved under weights/ and added to [model] weights.")
    wup = st.file_uploader("Weights file", type=["safetensors", "pt", "pth", "bin"], key="weights_upload")
    if wup is not None and st.button("Add these weights", key="add_weights"):
        try:
            rel = svc.add_weights_file(project.root, wup.name, wup.getvalue())
            st.success(f"Added {rel} to [model] weights.")
            st.rerun()
        except svc.ProponentError as e:
            st.error(f"Weights rejected — {e}")

st.markdown("**Cached attribution runs**")
cache = svc.cache_summary(project)
st.caption(f"Cache: {cache['mb']:.1f} MiB in {cache['entries']} entries ({cache['runs']} runs) under .proponent/ — "
           f"everything there but the flags can be recomputed; `proponent cache {project.root} --prune --older-than 30` "
           f"removes runs unused for 30 days.")
if runs_now:
    def _num(v):
        return "" if v is None else f"{float(v):.1f}"

    # one HTML block, not a data grid: a grid costs every switch to the page its drawing (Explore's query
    # grid about 0.08 s in scratch paired A/B runs in Chromium, stop 29); a list of runs needs no sorting
    st.html(svc.table_html(["method", "status", "fit (s)", "score (s)", "peak MB", "device", "settings", "run"],
                           [[r["method"], f"stale: {r['stale']}" if r.get("stale") else r["status"], _num(r["fit_s"]), _num(r["score_s"]), _num(r["peak_mb"]),
                             r["device"], str(r["settings"]), r["key"]] for r in runs_now]))
    if any(r.get("stale") for r in runs_now):
        st.caption("Stale runs were computed on other data or checkpoints (or their files are damaged); the pages "
                   "do not offer them. Run the method again on the Attribute page.")
else:
    st.caption("None yet — run a method on the Attribute page.")
