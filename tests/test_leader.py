"""Leader election through the database: one leader at a time, failover within one
lease period, clean hand-over on release; on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.db import make_engine, upgrade_to_head
from controlplane.leader import LeaderElector, LeaderLease


class Clock:
    """A hand-driven clock shared by the replicas of one test."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path: Path) -> Iterator[object]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cp.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


def test_one_leader_then_failover_after_expiry(engine) -> None:
    clock = Clock()
    a = LeaderLease(engine, holder="a", ttl_s=9, clock=clock)
    b = LeaderLease(engine, holder="b", ttl_s=9, clock=clock)
    assert a.try_acquire() and a.is_leader and a.epoch == 1
    assert not b.try_acquire() and not b.is_leader

    clock.now += 3
    assert a.try_acquire() and a.epoch == 1, "renewal keeps the epoch"
    assert not b.try_acquire()

    # a dies (stops renewing). It stops acting as leader margin before expiry...
    clock.now += 9 - a.margin_s
    assert not a.is_leader
    assert not b.try_acquire(), "b must wait for the lease to run out"
    # ...and b takes over once it has run out: failover within one lease period.
    clock.now += a.margin_s + 0.01
    assert b.try_acquire() and b.is_leader and b.epoch == 2
    assert not a.try_acquire() and not a.is_leader, "the old leader cannot come back"


def test_release_hands_over_at_once(engine) -> None:
    clock = Clock()
    a = LeaderLease(engine, holder="a", ttl_s=30, clock=clock)
    b = LeaderLease(engine, holder="b", ttl_s=30, clock=clock)
    assert a.try_acquire()
    a.release()
    assert not a.is_leader
    assert b.try_acquire() and b.epoch == 2


def test_racing_replicas_never_both_lead(engine) -> None:
    """Many replicas try at once, repeatedly: each epoch has exactly one holder."""
    leases = [LeaderLease(engine, holder=f"r{i}", ttl_s=0.3) for i in range(4)]
    winners: dict[int, set[str]] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 2.0

    def run(lease: LeaderLease) -> None:
        while time.monotonic() < deadline:
            if lease.try_acquire():
                with lock:
                    winners.setdefault(lease.epoch, set()).add(lease.holder)
            time.sleep(0.01)

    threads = [threading.Thread(target=run, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert winners, "nobody ever led"
    assert all(len(holders) == 1 for holders in winners.values()), winners


def test_elector_calls_back_and_a_second_one_takes_over(engine) -> None:
    changes: list[tuple[str, bool]] = []
    first = LeaderElector(LeaderLease(engine, holder="first", ttl_s=0.6),
                          lambda leading: changes.append(("first", leading))).start()
    second = LeaderElector(LeaderLease(engine, holder="second", ttl_s=0.6),
                           lambda leading: changes.append(("second", leading))).start()
    try:
        assert first.is_leader and not second.is_leader
        first.stop(release=False)  # as if killed: the lease must run out first
        deadline = time.monotonic() + 3
        while not second.is_leader and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.is_leader
        assert changes == [("first", True), ("first", False), ("second", True)]
    finally:
        second.stop()
