"""The scheduler's durable job store survives a database that refuses writes for a
while: the scheduler thread lives on and the job keeps running afterwards."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import create_engine

from controlplane.scheduler import DURABLE_JOBSTORE, create_scheduler
from tests.support.controlplane import wait_until


def tick(path: str) -> None:
    """The job: one line per run (a module function, so the store can pickle it)."""
    with open(path, "a") as f:
        f.write("x\n")


def _runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_locked_database_does_not_end_the_scheduler(tmp_path: Path) -> None:
    db, runs = tmp_path / "jobs.db", tmp_path / "runs"
    # A short busy timeout (and no WAL): a held write lock refuses the store's
    # updates at once, while its reads still succeed.
    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 0.05})
    scheduler = create_scheduler(engine=engine)
    scheduler.add_job(tick, "interval", seconds=0.2, args=[str(runs)], id="tick",
                      jobstore=DURABLE_JOBSTORE)
    scheduler.start()
    try:
        wait_until(lambda: _runs(runs) >= 2, 10, "the job to run")
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        time.sleep(3)  # several runs whose next-run-time update is refused
        lock.execute("ROLLBACK")
        lock.close()
        before = _runs(runs)
        wait_until(lambda: _runs(runs) >= before + 3, 10, "the job to run again")
        assert scheduler.running
        # A job added now runs only if the scheduler's own thread still wakes
        # up for it: the loop lives on, not just the jobs already queued.
        once = tmp_path / "once"
        scheduler.add_job(tick, "date", args=[str(once)], id="once")
        wait_until(lambda: _runs(once) == 1, 10, "a job added after the lock to run")
    finally:
        scheduler.shutdown(wait=False)
        engine.dispose()
