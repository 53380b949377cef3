"""Dedicated trainer jobs (tether.jobs.store.TrainerJobRow).

Revision ID: 0005_trainer_jobs
Revises: 0004_deployments
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_trainer_jobs"
down_revision = "0004_deployments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trainer_jobs",
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("launcher", sa.String(), nullable=False),
        sa.Column("restart_count", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(), nullable=True),
        sa.Column("model_load_s", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("launched_at", sa.DateTime(), nullable=True),
        sa.Column("last_activity_at", sa.DateTime(), nullable=True),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("owner", "job_id"),
    )
    op.create_index("ix_trainer_jobs_state", "trainer_jobs", ["state"])


def downgrade() -> None:
    op.drop_index("ix_trainer_jobs_state", table_name="trainer_jobs")
    op.drop_table("trainer_jobs")
