"""The stakeholder report: one self-contained HTML file."""
from app.report.build import bench_tables, build_report, write_report  # noqa: F401
