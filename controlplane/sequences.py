"""Per-device sequence counters: one row per device, bumped inside the writer's transaction.

``UPDATE ... SET last_sequence = last_sequence + 1 RETURNING`` as the first
write of the transaction that stores a device's document: PostgreSQL
serialises concurrent bumps on the row lock, SQLite on its single writer
lock, so numbers are strictly increasing per device across every model's
assignments, re-signs, removals and unassignments, whichever replica or
thread issues them.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Table, select, update

from .db.models import DeviceSequence
from .db.writes import insert_ignoring_conflicts

sequences: Table = DeviceSequence.__table__  # type: ignore[assignment]


def next_sequence(conn: Connection, device_id: str) -> int:
    """Allocate the device's next sequence number inside ``conn``'s transaction.

    Call it as the transaction's first write: it takes the lock that
    serialises every allocation for this device until commit.
    """
    return next_sequences(conn, [device_id])[device_id]


def next_sequences(conn: Connection, device_ids: Sequence[str]) -> dict[str, int]:
    """:func:`next_sequence` for many devices at once: one bump each, in ``conn``'s transaction.

    Call it as the transaction's first write. On PostgreSQL the counter rows
    are locked in device-id order first, so two batches sharing devices wait
    for each other instead of deadlocking.
    """
    ids = sorted(set(device_ids))
    conn.execute(
        insert_ignoring_conflicts(conn.dialect.name, sequences, ["device_id"]),
        [{"device_id": d, "last_sequence": 0, "published_sequence": 0} for d in ids],
    )
    if conn.dialect.name == "postgresql":
        conn.execute(
            select(sequences.c.device_id).where(sequences.c.device_id.in_(ids))
            .order_by(sequences.c.device_id).with_for_update()
        ).all()
    rows = conn.execute(
        update(sequences)
        .where(sequences.c.device_id.in_(ids))
        .values(last_sequence=sequences.c.last_sequence + 1)
        .returning(sequences.c.device_id, sequences.c.last_sequence)
    ).all()
    return {device_id: int(last) for device_id, last in rows}


def peek_next_sequences(conn: Connection, device_ids: Sequence[str]) -> dict[str, int]:
    """What :func:`next_sequences` would hand out if nobody allocated first; locks nothing.

    Lets a batch be signed before its write transaction opens. The guess is
    checked against the real allocation inside that transaction.
    """
    last = dict(conn.execute(
        select(sequences.c.device_id, sequences.c.last_sequence)
        .where(sequences.c.device_id.in_(device_ids))
    ).all())
    return {device_id: int(last.get(device_id, 0)) + 1 for device_id in device_ids}
