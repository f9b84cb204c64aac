"""Storage: arrays on disk (atomic, chunked) and project state in SQLite."""
