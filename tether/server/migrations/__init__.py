"""Alembic migrations of the catalogue's SQLite schema (run by `Catalogue` on open; no alembic.ini).

Add a revision as `versions/NNNN_<what>.py` with `down_revision` set to the previous one; use
`op.batch_alter_table` for column changes (SQLite cannot ALTER most things in place).
"""
