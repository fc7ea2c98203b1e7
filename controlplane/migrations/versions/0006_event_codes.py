"""Event codes: each device event keeps its machine-readable ``code``.

Events stored before this revision get the code their reason names (the
``"code: detail"`` prefix agents have always written), as
:func:`protocol.code_from_reason` recovers it for an event arriving in the
old form, so a rollout in progress when the control plane is upgraded
judges its devices' earlier events as it judges new ones.

Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from controlplane.migrations.columns import string
from protocol import code_from_reason

revision: str = "0006"
down_revision: str | None = "0005"

#: events read per round trip while filling in codes (keyset pages on id)
_PAGE = 10_000


def upgrade() -> None:
    op.add_column("device_events", string("code", 32, nullable=True))
    _fill_codes()


def _fill_codes() -> None:
    conn = op.get_bind()
    events = sa.table("device_events", sa.column("id", sa.BigInteger),
                      sa.column("reason", sa.String), sa.column("code", sa.String))
    after = 0
    while True:
        rows = conn.execute(
            sa.select(events.c.id, events.c.reason)
            .where(events.c.id > after, events.c.reason.is_not(None))
            .order_by(events.c.id).limit(_PAGE)
        ).all()
        if not rows:
            return
        after = rows[-1].id
        coded = [{"b_id": row.id, "b_code": code.value} for row in rows
                 if (code := code_from_reason(row.reason)) is not None]
        if coded:
            conn.execute(
                sa.update(events).where(events.c.id == sa.bindparam("b_id"))
                .values(code=sa.bindparam("b_code")),
                coded,
            )


def downgrade() -> None:
    with op.batch_alter_table("device_events") as batch:
        batch.drop_column("code")
