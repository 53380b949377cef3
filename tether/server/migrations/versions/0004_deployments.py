"""Deployments managed by the control plane (tether.server.deployments.DeploymentRow).

Revision ID: 0004_deployments
Revises: 0003_run_metrics
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_deployments"
down_revision = "0003_run_metrics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("deployment_id", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("base_model", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("transition", sa.String(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("deployment_id"),
    )
    op.create_index("ix_deployments_owner", "deployments", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_deployments_owner", table_name="deployments")
    op.drop_table("deployments")
