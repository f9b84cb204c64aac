"""Synset: the distilled synthetic examples of a cluster method (DDM), one per cluster."""
import streamlit as st

from app import services as svc
from app import ui
from app.services import clusters

st.title("Synset: distilled synthetic examples")
project = ui.get_project()
runs = clusters.cluster_runs(svc.done_runs(project))
if not runs:
    st.info("No finished cluster-level run yet. Run **DDM (distilled datamodel)** on the **Attribute** page; its "
            "synthetic examples appear here.")
    st.stop()
by = {r["key"]: r for r in runs}
keys = list(by)
want = st.query_params.get("run")
if st.session_state.get("syn_run") not in keys:
    st.session_state["syn_run"] = want if want in keys else keys[0]
choice = st.selectbox("Cluster run", keys, key="syn_run", format_func=lambda k: svc.run_label(by[k]))
run = by[choice]
st.info(clusters.method_description(run["method"]))
try:
    cr = clusters.load_cluster_run(project, run)
except svc.ProponentError as e:
    st.error(f"The cluster results cannot be loaded: {e}")
    st.stop()

gallery = clusters.synset_gallery(project, cr, size=96)
res = [g["residual"] for g in gallery]
m1, m2, m3 = st.columns(3)
m1.metric("Clusters (synthetic examples)", len(gallery))
m2.metric("Mean matching residual", f"{sum(res) / len(res):.3f}", help=clusters.RESIDUAL_HELP)
m3.metric("Mean residual at the medoid start", f"{sum(g['residual_init'] for g in gallery) / len(gallery):.3f}",
          help="The same residual before distillation (the medoid itself). " + clusters.RESIDUAL_HELP)
st.caption("Each synthetic example stands in for one k-means cluster of its class; it was distilled from the "
           "cluster's medoid (the real member nearest the centre) by matching its loss gradient to the cluster's mean "
           "real gradient. Residual: the method's own quality signal (lower is better).")

present = {g["class"] for g in gallery}
classes = [str(c) for c in project.classes if str(c) in present] + sorted(present - {str(c) for c in project.classes})
pick = st.multiselect("Class", classes, key="syn_classes")
order = st.selectbox("Order", ["cluster", "residual (worst first)", "size (largest first)"], key="syn_order")
shown = [g for g in gallery if not pick or g["class"] in pick]
if order.startswith("residual"):
    shown.sort(key=lambda g: -g["residual"])
elif order.startswith("size"):
    shown.sort(key=lambda g: -g["size"])

st.dataframe([{"cluster": g["cluster"], "class": g["class"], "size": g["size"], "residual": g["residual"],
               "residual at medoid": g["residual_init"], "medoid (train #)": g["medoid"]} for g in shown],
             hide_index=True, key="synset_table",
             column_config={"residual": st.column_config.NumberColumn(format="%.3f", help=clusters.RESIDUAL_HELP),
                            "residual at medoid": st.column_config.NumberColumn(format="%.3f")})

if project.data_format == "images":
    per_row = 4
    for lo in range(0, len(shown), per_row):
        cols = st.columns(per_row)
        for c, g in zip(cols, shown[lo:lo + per_row]):
            with c:
                st.image([g["synthetic_image"], g["init_image"]],
                         caption=["synthetic", f"medoid #{g['medoid']}"], width=72)
                st.caption(f"cluster {g['cluster']} · class {g['class']} · {g['size']} members  \n"
                           f"residual {g['residual']:.3f} (medoid {g['residual_init']:.3f})",
                           help=clusters.RESIDUAL_HELP)
else:
    for g in shown:
        with st.expander(f"cluster {g['cluster']} · class {g['class']} · {g['size']} members · "
                         f"residual {g['residual']:.3f}"):
            st.dataframe({"synthetic": g["synthetic"].ravel(), "medoid": g["init"].ravel()})
