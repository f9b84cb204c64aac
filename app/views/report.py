"""Report: one self-contained HTML file for people who will not run the app."""
import streamlit as st
import streamlit.components.v1 as components

from app import report, ui

st.title("Report")
project = ui.get_project()
run = ui.pick_run(project)
if run is None:
    st.stop()
st.caption("One HTML file with the findings, interactive charts (plotly embedded, works offline), example images, "
           "flag counts and the benchmark table. Open it in any browser.")
queries = st.number_input("Queries to illustrate", 1, 12, 4, key="r_queries")
if st.button("Build the report", key="r_build", type="primary"):
    with st.spinner("Building…"):
        st.session_state["report_html"] = report.build_report(project, run["key"], method=run["method"],
                                                              n_queries=int(queries))
html = st.session_state.get("report_html")
if html:
    st.download_button("Download report (HTML)", html, file_name=f"{project.name}-proponent-report.html",
                       mime="text/html", key="r_download")
    st.caption(f"{len(html) / 1e6:.1f} MB, self-contained. Preview:")

    components.html(html, height=900, scrolling=True)
