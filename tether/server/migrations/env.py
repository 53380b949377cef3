"""Alembic environment: migrations run on the connection the catalogue hands over.

`Catalogue` passes an open connection, already inside a write transaction, as
`config.attributes["connection"]`; there is no offline (SQL script) mode and no logging set-up.
"""

from __future__ import annotations

from alembic import context

from tether.server.catalogue import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("tether's migrations run through tether.server.catalogue.Catalogue, on its connection")
# SQLite DDL is transactional, and the catalogue's BEGIN IMMEDIATE covers the whole upgrade
context.configure(
    connection=connection, target_metadata=Base.metadata, render_as_batch=True, transactional_ddl=True
)
with context.begin_transaction():
    context.run_migrations()
