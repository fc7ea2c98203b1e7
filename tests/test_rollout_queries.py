"""The rollout engine's per-stage queries read what they need, not the fleet.

Which members are online is asked for a whole stage at once, in chunks of
ids. With the flag in the WHERE clause SQLite picked the liveness index
(online, last_seen) and walked every online device for each chunk, the
fleet times the chunks; by primary key each chunk reads its own rows.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event, insert

from controlplane.db import make_engine
from controlplane.db.migrate import upgrade_to_head
from controlplane.db.models import Device
from controlplane.rollouts import queries


def test_online_ids_reads_the_chunk_by_primary_key(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    upgrade_to_head(engine)
    ids = [f"dev-{i:04d}" for i in range(1200)]  # three chunks
    with engine.begin() as conn:
        conn.execute(insert(Device), [
            {"id": d, "online": i % 3 != 0, "first_seen": 1.0, "last_seen": 2.0,
             "state_changed_at": 1.0} for i, d in enumerate(ids)])
    statements: list[tuple[str, tuple]] = []

    def seen(_conn, _cursor, statement, parameters, _context, _many) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    with engine.connect() as conn:
        online = queries.online_ids(conn, [*ids, "no-such-device"])
    event.remove(engine, "before_cursor_execute", seen)
    assert online == {d for i, d in enumerate(ids) if i % 3 != 0}
    assert len(statements) == 3
    with engine.connect() as conn:
        for statement, parameters in statements:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, parameters).all())
            assert "ix_devices_online_last_seen" not in plan, plan
            assert "sqlite_autoindex_devices_1" in plan or "PRIMARY KEY" in plan, plan
