"""Turn a batch of decoded device messages into a few bulk statements.

One call writes one batch in one transaction with a handful of executemany
statements, whatever the batch size. Events are inserted idempotently on
``(device_id, seq)`` and telemetry on ``(device_id, ts, seq)``, so a QoS 1
redelivery, an agent re-sending its spool, or one message reaching two
control-plane replicas is stored once.

The statements on the hot path (telemetry, events, device liveness) are
SQLAlchemy Core statements compiled once per dialect and executed with the
driver's own ``executemany`` (:class:`FastStatement`): SQLAlchemy's per-row
parameter processing costs more than SQLite's insert itself at thousands of
messages a second. Their JSON values are serialised here instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

from pydantic import TypeAdapter
from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Insert,
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from protocol import (
    DeviceState,
    Event,
    Hello,
    InferenceStats,
    State,
    Telemetry,
    TopicKind,
    canonical_json,
)

from .models import CapabilitySnapshot, Device, DeviceEvent, DeviceLabel, TelemetryRow

devices: Table = Device.__table__  # type: ignore[assignment]
labels: Table = DeviceLabel.__table__  # type: ignore[assignment]
snapshots: Table = CapabilitySnapshot.__table__  # type: ignore[assignment]
telemetry: Table = TelemetryRow.__table__  # type: ignore[assignment]
events: Table = DeviceEvent.__table__  # type: ignore[assignment]

_inference_json = TypeAdapter(list[InferenceStats])


class IngestItem(NamedTuple):
    """A validated message waiting to be written."""

    kind: TopicKind
    message: Hello | State | Telemetry | Event
    received_at: float
    #: delivered from the broker's retained store on subscribe: old news, so
    #: it updates the registry but is no evidence the device is alive now
    retained: bool


def insert_ignoring_conflicts(dialect: str, table: Table, columns: list[str]) -> Insert:
    """``INSERT ... ON CONFLICT (columns) DO NOTHING`` for SQLite and PostgreSQL."""
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=columns)
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=columns)
    raise NotImplementedError(f"idempotent insert is not implemented for {dialect!r}")


class FastStatement:
    """A statement compiled once per dialect, run through the driver's executemany.

    Rows are dicts keyed by bind name holding driver-ready values (JSON
    already serialised); nothing else is converted.
    """

    def __init__(self, build: Any, column_keys: Sequence[str] | None = None) -> None:
        #: ``build(dialect_name) -> Executable``; called once per dialect
        self._build = build
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._compiled: dict[str, tuple[str, Any]] = {}

    def _compile(self, conn: Connection) -> tuple[str, Any]:
        dialect = conn.dialect
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            stmt: Executable = self._build(dialect.name)
            sql = stmt.compile(dialect=dialect, column_keys=self._column_keys)
            order = sql.positiontup if dialect.positional else None
            getter = itemgetter(*order) if order and len(order) > 1 else None
            if order and len(order) == 1:
                key = order[0]
                getter = lambda row: (row[key],)  # noqa: E731 - itemgetter of one is no tuple
            compiled = self._compiled[dialect.name] = (sql.string, getter)
        return compiled

    def execute(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Run the statement once per row in ``rows`` (one executemany)."""
        sql, getter = self._compile(conn)
        params = [getter(row) for row in rows] if getter else rows
        conn.exec_driver_sql(sql, params)


_TELEMETRY_KEYS = [
    "device_id",
    "ts",
    "received_at",
    "seq",
    "uptime_s",
    "cpu_percent",
    "ram_used_bytes",
    "temp_c",
    "active_model",
    "inference",
]
_EVENT_KEYS = [
    "device_id",
    "seq",
    "ts",
    "received_at",
    "type",
    "assignment_id",
    "code",
    "reason",
    "progress_pct",
    "eval",
    "downloaded_bytes",
]
_DEVICE_KEYS = [
    "id",
    "labels",
    "simulated",
    "online",
    "first_seen",
    "state_changed_at",
]

_INSERT_TELEMETRY = FastStatement(
    lambda d: insert_ignoring_conflicts(d, telemetry, ["device_id", "ts", "seq"]), _TELEMETRY_KEYS
)
_INSERT_EVENTS = FastStatement(
    lambda d: insert_ignoring_conflicts(d, events, ["device_id", "seq"]), _EVENT_KEYS
)
_ENSURE_DEVICES = FastStatement(
    lambda d: insert_ignoring_conflicts(d, devices, ["id"]), _DEVICE_KEYS
)
# The common case, a device heard live: one statement marks it online (moving
# state_changed_at only on a real transition) and advances last_seen.
# SET expressions see the row as it was, on SQLite and PostgreSQL alike.
_MARK_LIVE = FastStatement(
    lambda _d: update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .values(
        state_changed_at=case(
            (devices.c.online, devices.c.state_changed_at), else_=bindparam("b_at")
        ),
        online=true(),
        last_seen=case(
            (devices.c.last_seen.is_(None), bindparam("b_seen")),
            (devices.c.last_seen < bindparam("b_seen"), bindparam("b_seen")),
            else_=devices.c.last_seen,
        ),
    )
)
_SET_STATE = FastStatement(
    lambda _d: update(devices)
    .where(devices.c.id == bindparam("b_id"), devices.c.online != bindparam("b_online"))
    .values(online=bindparam("b_online"), state_changed_at=bindparam("b_at"))
)
_SET_SEEN = FastStatement(
    lambda _d: update(devices)
    .where(
        devices.c.id == bindparam("b_id"),
        devices.c.last_seen.is_(None) | (devices.c.last_seen < bindparam("b_seen")),
    )
    .values(last_seen=bindparam("b_seen"))
)


def capability_report(hello: Hello) -> dict[str, Any]:
    """What a capability snapshot records, as JSON-ready values."""
    return {
        "capabilities": hello.capabilities.model_dump(mode="json"),
        "runtimes": [r.model_dump(mode="json") for r in hello.runtimes],
        "profile": hello.profile,
        "tier": hello.tier.value,
    }


def report_digest(report: dict[str, Any]) -> str:
    """sha256 of a :func:`capability_report`, to skip storing identical reports."""
    return hashlib.sha256(canonical_json(report)).hexdigest()


@dataclass
class _Plan:
    """A batch regrouped by statement; built without touching the database."""

    first_seen: dict[str, float] = field(default_factory=dict)
    hellos: dict[str, IngestItem] = field(default_factory=dict)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    events: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    #: device -> (online, since when) at the end of the batch, in arrival order
    state: dict[str, tuple[bool, float]] = field(default_factory=dict)
    #: device -> newest time it was heard live
    seen: dict[str, float] = field(default_factory=dict)


def _plan(items: Iterable[IngestItem]) -> _Plan:
    plan = _Plan()
    state = plan.state
    for item in items:
        msg, at = item.message, item.received_at
        dev = msg.device_id
        if dev not in plan.first_seen:
            plan.first_seen[dev] = at
        if isinstance(msg, Telemetry):
            plan.telemetry.append(
                {
                    "device_id": dev,
                    "ts": msg.ts,
                    "received_at": at,
                    "seq": msg.seq,
                    "uptime_s": msg.uptime_s,
                    "cpu_percent": msg.cpu_percent,
                    "ram_used_bytes": msg.ram_used_bytes,
                    "temp_c": msg.temp_c,
                    "active_model": next(iter(msg.active_refs()), None),
                    "inference": _inference_json.dump_json(
                        msg.inference, exclude_none=True
                    ).decode(),
                }
            )
        elif isinstance(msg, Event):
            plan.events.setdefault(
                (dev, msg.seq),
                {
                    "device_id": dev,
                    "seq": msg.seq,
                    "ts": msg.ts,
                    "received_at": at,
                    "type": msg.type.value,
                    "assignment_id": msg.assignment_id,
                    # the value, not the member: the driver gets no type processing
                    "code": msg.code.value if msg.code else None,
                    "reason": msg.reason,
                    "progress_pct": msg.progress_pct,
                    "eval": msg.eval.model_dump_json() if msg.eval else None,
                    "downloaded_bytes": msg.downloaded_bytes,
                },
            )
        elif isinstance(msg, Hello):
            plan.hellos[dev] = item

        if isinstance(msg, State):
            online = msg.state is DeviceState.ONLINE
            # The broker publishes the offline Last Will, not the device.
            live = online and not item.retained
        else:
            online = True
            live = not item.retained
        if isinstance(msg, State) or live:
            previous = state.get(dev)
            if previous is None or previous[0] != online:
                state[dev] = (online, at)
        if live and plan.seen.get(dev, 0.0) < at:
            plan.seen[dev] = at
    return plan


_HELLO_UPDATE = (
    update(devices)
    .where(devices.c.id == bindparam("b_id"))
    .values(
        tier=bindparam("b_tier"),
        profile=bindparam("b_profile"),
        agent_version=bindparam("b_agent_version"),
        labels=bindparam("b_labels", type_=devices.c.labels.type),
        simulated=bindparam("b_simulated"),
        active_model=bindparam("b_active_model", type_=devices.c.active_model.type),
        latest_capabilities=bindparam("b_caps", type_=devices.c.latest_capabilities.type),
        latest_runtimes=bindparam("b_runtimes", type_=devices.c.latest_runtimes.type),
        update_status=bindparam("b_update", type_=devices.c.update_status.type),
        assignment_form=bindparam("b_form"),
        models=bindparam("b_models", type_=devices.c.models.type),
        model_updates=bindparam("b_model_updates", type_=devices.c.model_updates.type),
    )
)


def hello_models(hello: Hello) -> dict[str, Any]:
    """The hello's device-model fields: the form its agent reads, every active model
    by name, each model's latest update by name, and the one active model (set only
    when there is exactly one, as the old form has it)."""
    active = {m.name: m.model_dump(mode="json", exclude_none=True) for m in hello.active_models()}
    updates = {}
    for status in hello.model_updates():
        # hello/1's one update names no model; its ref ("name@version") does.
        name = status.model or (status.ref.partition("@")[0] if status.ref else None)
        if name:
            updates[name] = status.model_dump(mode="json", exclude_none=True)
    return {
        "b_form": "set" if hello.speaks_sets else "single",
        "b_models": active,
        "b_model_updates": updates,
        "b_active_model": next(iter(active.values())) if len(active) == 1 else None,
    }


def _write_hellos(conn: Connection, hellos: dict[str, IngestItem]) -> None:
    # Hellos are rare (one per connect), so they take the ordinary path.
    params = []
    reports: dict[str, tuple[dict[str, Any], float]] = {}
    for dev, item in sorted(hellos.items()):  # device-id order: see _write_liveness
        hello = item.message
        assert isinstance(hello, Hello)
        report = capability_report(hello)
        reports[dev] = (report, item.received_at)
        params.append(
            {
                "b_id": dev,
                "b_tier": report["tier"],
                "b_profile": report["profile"],
                "b_agent_version": hello.agent_version,
                "b_labels": dict(hello.labels),
                "b_simulated": hello.simulated,
                "b_caps": report["capabilities"],
                "b_runtimes": report["runtimes"],
                "b_update": hello.update.model_dump(mode="json") if hello.update else None,
                **hello_models(hello),
            }
        )
    conn.execute(_HELLO_UPDATE, params)
    conn.execute(
        delete(labels).where(labels.c.device_id == bindparam("b_id")),
        [{"b_id": dev} for dev in hellos],
    )
    label_rows = [
        {"device_id": p["b_id"], "key": key, "value": value}
        for p in params
        for key, value in p["b_labels"].items()
    ]
    if label_rows:
        conn.execute(insert(labels), label_rows)

    # Agents re-send hello on every reconnect; keep a snapshot only on change.
    latest_ids = (
        select(func.max(snapshots.c.id))
        .where(snapshots.c.device_id.in_(reports))
        .group_by(snapshots.c.device_id)
    )
    previous = dict(
        conn.execute(
            select(snapshots.c.device_id, snapshots.c.digest).where(snapshots.c.id.in_(latest_ids))
        ).all()
    )
    rows = []
    for dev, (report, received_at) in reports.items():
        digest = report_digest(report)
        if previous.get(dev) != digest:
            rows.append({"device_id": dev, "received_at": received_at, "digest": digest, **report})
    if rows:
        conn.execute(insert(snapshots), rows)


def _write_liveness(conn: Connection, plan: _Plan) -> None:
    live, states, seen_only = [], [], []
    # In device-id order, as every statement here locks device rows: two
    # replicas writing overlapping batches then wait for each other instead
    # of deadlocking (PostgreSQL aborts one of a deadlocked pair, after a
    # second's wait, and the batch has to be written again).
    for dev, (online, since) in sorted(plan.state.items()):
        seen = plan.seen.get(dev)
        if online and seen is not None:
            live.append({"b_id": dev, "b_at": since, "b_seen": seen})
        else:
            states.append({"b_id": dev, "b_online": online, "b_at": since})
    for dev, seen in sorted(plan.seen.items()):
        if not plan.state.get(dev, (False, 0.0))[0]:
            # heard live earlier in the batch, then its Last Will arrived
            seen_only.append({"b_id": dev, "b_seen": seen})
    if live:
        _MARK_LIVE.execute(conn, live)
    if states:
        _SET_STATE.execute(conn, states)
    if seen_only:
        _SET_SEEN.execute(conn, seen_only)


class BatchStore:
    """Writes batches to the database; remembers which device rows exist.

    The remembered set only saves an insert per device per batch; it is
    dropped whenever a write fails (a device row may have been deleted).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._known: set[str] = set()

    def forget(self) -> None:
        """Drop the cache of existing device rows (call after a failed write)."""
        self._known.clear()

    def write(self, items: Sequence[IngestItem]) -> None:
        """Write ``items`` in one transaction; raise on any database error."""
        plan = _plan(items)
        new = [dev for dev in plan.first_seen if dev not in self._known]
        with self._engine.begin() as conn:
            if new:
                # A device heard before its first hello still gets its row, so
                # its telemetry and events have a parent.
                _ENSURE_DEVICES.execute(
                    conn,
                    [
                        {
                            "id": dev,
                            "labels": "{}",
                            "simulated": False,
                            "online": False,
                            "first_seen": plan.first_seen[dev],
                            "state_changed_at": plan.first_seen[dev],
                        }
                        for dev in sorted(new)  # device-id order: see _write_liveness
                    ],
                )
            if plan.hellos:
                _write_hellos(conn, plan.hellos)
            if plan.telemetry:
                _INSERT_TELEMETRY.execute(conn, plan.telemetry)
            if plan.events:
                _INSERT_EVENTS.execute(conn, list(plan.events.values()))
            _write_liveness(conn, plan)
        self._known.update(new)
