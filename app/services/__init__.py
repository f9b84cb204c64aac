"""The app's service layer: plain functions over the engine, one module per concern (no Streamlit here).

Pages stay thin and call these; tests call them directly, including the selection and
table-editing logic that AppTest cannot click. ``from app import services as svc`` gives them all.
"""
from app.services.cards import FLAG_COLOURS, Card, cards_html, table_html  # noqa: F401
from app.services.svg_charts import Series, bar_chart, xy_chart  # noqa: F401
from app.services.cost import calibrate_gradients, estimate_cost, gradient_passes, job_startup_seconds  # noqa: F401
from app.services.embeddings import (  # noqa: F401
    DEFAULT_REDUCER,
    EMBED_MAX_POINTS,
    REDUCERS,
    cached_embedding,
    compute_embedding,
    embedding_frame,
    embedding_path,
    inside_polygon,
    reduce_2d,
    selected_rows,
)
from app.services.exports import (  # noqa: F401
    export_cleaned,
    export_flags_csv,
    export_flags_json,
    flags_records,
    label_value,
    selection_csv,
    zip_folder,
)
from app.services.flags import (  # noqa: F401
    EDITABLE,
    apply_table_edits,
    bulk_update,
    cell_value,
    db_for,
    flag_state,
    missing_flags,
    selection_indices,
    toggle_flag,
)
from app.services.images import (  # noqa: F401
    array_png,
    data_uri,
    example_array,
    example_row,
    example_text,
    example_texts,
    image_png,
)
from app.services.leakage import QUICK_LEAK_COSINE, QUICK_LEAK_TOP, leak_pairs, leak_search_note  # noqa: F401
from app.services.projects import (  # noqa: F401
    REPO,
    SIGN_HELP,
    add_weights_file,
    cache_summary,
    class_counts,
    create_project,
    inspect_new_folder,
    open_project,
    open_sample,
    predictions,
    project_from_env,
    project_summary,
    query_table,
    sample_root,
    truth,
)
from app.services.queries import (  # noqa: F401
    query_from_upload,
    query_scores_path,
    save_query,
    score_train_query,
    score_uploaded_query,
    train_query_scores_path,
    uploaded_prediction,
)
from app.services.runs import (  # noqa: F401
    RETRAIN_BUDGET,
    coerce_ui_settings,
    compare_rows,
    done_runs,
    list_runs,
    load_run,
    methods_info,
    retrain_refusal,
    run_key_for,
    run_label,
    topk,
    verify_available,
    verify_frame,
    verify_kwargs,
    verify_retrains,
)
from app.services.triage import (  # noqa: F401
    EVIDENCE_COLUMNS,
    REVIEW_ACTIONS,
    hurt_queries,
    recommended_table,
    review_decision,
    triage_table,
    truth_found,
    typical_examples,
    undo_decision,
)
from app.services.uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, extract_upload  # noqa: F401

# engine names the pages use through the service layer
from engine.core.errors import ProponentError  # noqa: F401
from engine.storage.arrays import load_npy, stable_hash  # noqa: F401
from engine.storage.statedb import FLAG_VALUES  # noqa: F401
