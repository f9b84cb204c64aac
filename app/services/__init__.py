"""The app's service layer: plain functions over the engine, one module per concern (no Streamlit here).

Pages stay thin and call these; tests call them directly, including the selection and
table-editing logic that AppTest cannot click. ``from app import services as svc`` gives them all.
"""
from app.services.projects import REPO, SIGN_HELP, open_project, project_from_env, sample_root, open_sample, class_counts, project_summary, predictions, query_table, truth  # noqa: F401
from app.services.uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, extract_upload  # noqa: F401
from app.services.runs import list_runs, done_runs, run_label, load_run, methods_info, coerce_ui_settings, run_key_for, topk, compare_rows, optional_module, verify_available, whatif_available, leaks_available, verify_kwargs, verify_frame  # noqa: F401
from app.services.images import example_array, image_png, array_png, data_uri, example_row  # noqa: F401
from app.services.images import example_text, example_texts  # noqa: F401
from app.services.projects import inspect_new_folder, create_project, add_weights_file, cache_summary  # noqa: F401
from app.services.flags import db_for, flag_state, toggle_flag, bulk_update, selection_indices, EDITABLE, apply_table_edits, cell_value  # noqa: F401
from app.services.triage import triage_table, truth_found  # noqa: F401
from app.services.exports import flags_records, export_flags_json, export_flags_csv, export_cleaned, label_value, zip_folder  # noqa: F401
from app.services.leakage import leak_pairs, QUICK_LEAK_TOP, QUICK_LEAK_COSINE  # noqa: F401
from app.services.embeddings import EMBED_MAX_POINTS, embedding_path, cached_embedding, compute_embedding, reduce_2d, embedding_frame  # noqa: F401
from app.services.cost import calibrate_gradients, gradient_passes, estimate_cost  # noqa: F401
from app.services.queries import query_from_upload, save_query, query_scores_path, score_uploaded_query, uploaded_prediction  # noqa: F401
# engine names the pages use through the service layer
from engine.core.errors import ProponentError  # noqa: F401
from engine.storage.arrays import load_npy, stable_hash  # noqa: F401
from engine.storage.statedb import FLAG_VALUES  # noqa: F401
