"""Proponent's Streamlit app (pages) and its service layer."""
