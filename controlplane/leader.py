"""One leader among control-plane replicas, elected through the database.

Some work must run in exactly one replica at a time: the rollout engine (two
engines would double-advance a stage) and the director's re-signing job.
Every replica serves the API and ingests; the one holding the lease row
``leases.name`` also runs those jobs.

The lease is one row per name: ``holder``, ``expires_at`` and an ``epoch``
that grows by one each time the lease changes hands. Taking or renewing it
is one conditional ``UPDATE`` (held by me, or free, or expired), atomic on
SQLite and PostgreSQL alike, so two replicas can never both succeed for the
same epoch. The leader renews every ``ttl/4``; if it dies, another replica
takes over once ``expires_at`` has passed, so failover takes at most one
lease period plus one renewal interval. A leader that cannot renew in time
(database gone, process paused) stops acting as leader ``margin`` seconds
before its lease runs out, so the old and the new leader never overlap as
long as the replicas' clocks agree to within ``margin`` (run NTP).

The ``epoch`` is a fencing token: work done as leader can record it, and a
write made under a stale epoch can be told apart after the fact.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine, case, or_, update
from sqlalchemy.exc import SQLAlchemyError

from controlplane.db.models import Lease
from controlplane.db.writes import insert_ignoring_conflicts

log = logging.getLogger(__name__)

#: the lease the rollout engine and the director's re-signer run under
CONTROL_PLANE_LEASE = "controlplane-leader"


def default_holder_id() -> str:
    """``host:pid:random``: unique per process, readable in the table."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class LeaderLease:
    """Take, renew and give up one named lease for this replica."""

    def __init__(self, engine: Engine, name: str = CONTROL_PLANE_LEASE,
                 holder: str | None = None, ttl_s: float = 15.0,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.engine, self.name, self.ttl_s, self._clock = engine, name, ttl_s, clock
        self.holder = holder or default_holder_id()
        #: stop acting as leader this long before the lease runs out
        self.margin_s = ttl_s / 3
        self._valid_until = 0.0
        self.epoch = 0

    @property
    def is_leader(self) -> bool:
        """True while this replica holds the lease with ``margin_s`` to spare."""
        return self._clock() < self._valid_until

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if it is ours; True if held.

        A database error counts as not holding it (logged), and the lease
        simply runs out: a leader cut off from the database steps down.
        """
        now = self._clock()
        table = Lease.__table__
        try:
            with self.engine.begin() as conn:
                conn.execute(insert_ignoring_conflicts(conn.dialect.name, table, ["name"]),
                             {"name": self.name, "holder": None, "expires_at": 0.0, "epoch": 0})
                taken = conn.execute(
                    update(table)
                    .where(table.c.name == self.name,
                           or_(table.c.holder == self.holder, table.c.holder.is_(None),
                               table.c.expires_at < now))
                    .values(holder=self.holder, expires_at=now + self.ttl_s,
                            epoch=case((table.c.holder == self.holder, table.c.epoch),
                                       else_=table.c.epoch + 1))
                    .returning(table.c.epoch)
                ).scalar()
        except SQLAlchemyError as exc:
            log.warning("lease %s: cannot reach the database (%s); not leading", self.name, exc)
            return self.is_leader
        if taken is None:
            self._valid_until = 0.0
            return False
        if taken != self.epoch:
            log.info("lease %s: %s leads (epoch %d)", self.name, self.holder, taken)
        self.epoch = taken
        self._valid_until = now + self.ttl_s - self.margin_s
        return True

    def release(self) -> None:
        """Give the lease up now (clean shutdown), so another replica need not wait."""
        self._valid_until = 0.0
        table = Lease.__table__
        try:
            with self.engine.begin() as conn:
                conn.execute(update(table).where(table.c.name == self.name,
                                                 table.c.holder == self.holder)
                             .values(holder=None, expires_at=0.0))
        except SQLAlchemyError as exc:
            log.warning("lease %s: could not release (%s); it expires by itself", self.name, exc)


class LeaderElector:
    """Keeps trying for the lease on a thread; calls back when leadership changes."""

    def __init__(self, lease: LeaderLease, on_change: Callable[[bool], None] | None = None) -> None:
        self.lease = lease
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading = False

    @property
    def is_leader(self) -> bool:
        """See :attr:`LeaderLease.is_leader`."""
        return self.lease.is_leader

    def start(self) -> LeaderElector:
        """Try once now (so a lone replica leads at once), then keep trying on a thread."""
        self._tick()
        self._thread = threading.Thread(target=self._run, name="leader-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        """Stop trying; with ``release``, give the lease up for the next replica."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if release:
            self.lease.release()
        self._changed(False)

    def _run(self) -> None:
        # Every ttl/4: a leader that could not renew notices it has lost the
        # lease (margin = ttl/3 before expiry) before the lease runs out.
        while not self._stop.wait(self.lease.ttl_s / 4):
            self._tick()

    def _tick(self) -> None:
        self.lease.try_acquire()
        self._changed(self.lease.is_leader)

    def _changed(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if self._on_change is not None:
            try:
                self._on_change(leading)
            except Exception:
                log.exception("leadership change callback failed")
