"""Attribute: pick a method and its settings, run it as a background job, list cached runs."""
import pandas as pd
import streamlit as st

from app import jobs, ui
from app import services as svc

st.title("Attribute")
project = ui.get_project()
methods = svc.methods_info(project)
names = [m["name"] for m in methods]
by = {m["name"]: m for m in methods}
if "method" not in st.session_state:
    st.session_state["method"] = "trak" if "trak" in names else names[0]
name = st.selectbox("Method", names, key="method",
                    format_func=lambda n: f"{by[n]['label']}" + (" (our extension)" if by[n]["extension"] else "")
                    + (" — unavailable" if by[n]["unsupported"] else ""))
m = by[name]
st.caption(m["description"])
if m["unsupported"]:
    st.warning(f"{m['label']} cannot run on this project: {m['unsupported']}")
for line in m["advisories"]:
    st.info(line)

values = {}
with st.expander("Settings", expanded=False):
    for s in m["settings"]:
        k = f"set_{name}_{s['name']}"
        d = s["default"]
        if s["choices"]:
            values[s["name"]] = st.selectbox(s["name"], list(s["choices"]), index=list(s["choices"]).index(d),
                                             help=s["help"], key=k)
        elif isinstance(d, bool):
            values[s["name"]] = st.checkbox(s["name"], value=d, help=s["help"], key=k)
        elif isinstance(d, int):
            values[s["name"]] = int(st.number_input(s["name"], value=d, step=1, help=s["help"], key=k))
        elif isinstance(d, float):
            values[s["name"]] = float(st.number_input(s["name"], value=d, format="%g", help=s["help"], key=k))
        else:
            values[s["name"]] = st.text_input(s["name"], value=str(d), help=s["help"], key=k)

import torch  # noqa: E402

devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
device = st.selectbox("Device", devices, key="device", help="auto: CUDA when available, else the CPU.")

try:
    settings = svc.coerce_ui_settings(name, values)
    key = svc.run_key_for(project, name, settings)
except svc.ProponentError as e:
    st.error(str(e))
    st.stop()

@st.cache_data(show_spinner="Calibrating…", max_entries=4)
def _calibration(root: str, ck: str) -> float:
    return svc.calibrate_gradients(ui.project_at(root))


per_ex = _calibration(str(project.root), project.checkpoint_hash())
runs = {r["key"]: r for r in svc.list_runs(project)}
est = svc.estimate_cost(project, name, settings, per_ex, history=list(runs.values()),
                        startup=svc.job_startup_seconds(jobs.list_jobs(project, 50)))
n_all = len(project.train_dataset) + len(project.test_dataset)
prior = runs.get(key)
if prior and prior["status"] == "done":
    st.success(f"Cached: this run ({key}) finished in {(prior['fit_s'] or 0) + (prior['score_s'] or 0):.1f}s; "
               "running it again reuses the cache.")
elif est["low"] is not None:
    st.caption(f"Estimate: about {ui.fmt_seconds(est['low'])}–{ui.fmt_seconds(est['high'])}, from {est['basis']} "
               f"({est['passes']} gradient pass(es) over {n_all:,} examples at {est['per_example_ms']:.2f} ms each, "
               "timed on 64 examples).")
else:
    st.caption(f"Estimate: at least {ui.fmt_seconds(est['seconds'])} for the per-example gradients alone "
               f"({est['passes']} pass(es) over {n_all:,} examples at {est['per_example_ms']:.2f} ms each); no "
               f"measured run of {name} to scale from.")

if st.button("Run", type="primary", key="run_button", disabled=bool(m["unsupported"])):
    jid = ui.start(project, "attribute", {"method": name, "settings": settings, "device": device})
    j = jobs.get_job(project, jid)
    if j and j["status"] == "done":
        st.success(f"{name} finished: run {j['result']['key']}. Open **Explore** to see proponents.")
    elif j and j["status"] == "failed":
        st.error(f"{name} failed: {j.get('message')}")
    else:
        st.info(f"Started {name} in the background (job {jid}). This page stays usable; reloading finds the job.")

st.subheader("Jobs")
ui.job_panel(project, kinds=("attribute",))
recent = [j for j in jobs.list_jobs(project, 10) if j["kind"] == "attribute" and j["status"] not in jobs.ACTIVE][:5]
for j in recent:
    p = j.get("params") or {}
    icon = {"done": ":green[:material/check_circle:]", "failed": ":red[:material/error:]",
            "cancelled": ":gray[:material/stop_circle:]"}.get(j["status"], "•")
    st.caption(f"{icon} {p.get('method')} — {j['status']}" + (f": {j['message']}" if j.get("message") else ""))

st.subheader("Cached runs")
done = svc.done_runs(project)
if done:
    st.dataframe(pd.DataFrame([{"method": r["method"], "fit (s)": r["fit_s"], "score (s)": r["score_s"],
                                "peak MB": r["peak_mb"], "device": r["device"], "settings": str(r["settings"]),
                                "run": r["key"]} for r in done]), hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.1f") for c in ("fit (s)", "score (s)", "peak MB")})
    if len(done) >= 2:
        st.caption("Several methods have run: Explore can show two side by side with their agreement.")
else:
    st.caption("No finished runs yet.")
