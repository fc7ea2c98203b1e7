"""The control plane's one APScheduler.

Every periodic job (liveness, the director's re-signing, the rollout
engine) is added to the scheduler made here, so there is one place that
owns job threads, their start and their shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")
#: tries of a job-store statement the database refused (locked, connection lost)
STORE_ATTEMPTS = 3
STORE_RETRY_S = 0.5

#: job store for jobs rebuilt at every start (liveness)
MEMORY_JOBSTORE = "default"
#: job store in the control-plane database, for jobs that outlive the process
#: (the rollout engine); its table ``apscheduler_jobs`` is APScheduler's own
DURABLE_JOBSTORE = "durable"
DURABLE_TABLE = "apscheduler_jobs"


class ResilientJobStore(SQLAlchemyJobStore):
    """APScheduler's SQLAlchemy job store, made to survive a busy or absent database.

    The scheduler's own loop calls ``update_job`` and ``get_next_run_time``
    without catching anything, so one "database is locked" (SQLite under a
    heavy ingest) or a dropped PostgreSQL connection there ends the
    scheduler thread, and with it the rollout engine, until a restart. Here
    each is retried a few times; if the database still refuses, the update
    is skipped (the job runs again at its next check; jobs coalesce) and the
    scheduler is told to look again shortly.
    """

    def _retry(self, what: str, call: Callable[[], T], fallback: T) -> T:
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                return call()
            except OperationalError as exc:
                if attempt == STORE_ATTEMPTS:
                    log.warning("job store: %s failed %d times (%s); trying again later",
                                what, attempt, exc.orig or exc)
                    return fallback
                time.sleep(STORE_RETRY_S * attempt)
        return fallback

    def update_job(self, job: Any) -> None:
        """See :meth:`SQLAlchemyJobStore.update_job`; retried, then skipped."""
        self._retry("update_job", lambda: super(ResilientJobStore, self).update_job(job), None)

    def get_next_run_time(self) -> datetime | None:
        """See :meth:`SQLAlchemyJobStore.get_next_run_time`; on failure, soon."""
        soon = datetime.now(UTC) + timedelta(seconds=STORE_RETRY_S * STORE_ATTEMPTS)
        return self._retry("get_next_run_time",
                           lambda: super(ResilientJobStore, self).get_next_run_time(), soon)


def durable_jobstore(engine: Engine) -> ResilientJobStore:
    """The job store in the control-plane database (:data:`DURABLE_TABLE`)."""
    return ResilientJobStore(engine=engine, tablename=DURABLE_TABLE)


def create_scheduler(max_workers: int = 4, engine: Engine | None = None) -> BackgroundScheduler:
    """A stopped scheduler in UTC; jobs run at most once at a time and never pile up.

    With ``engine``, a durable SQLAlchemy job store on that database is added
    under :data:`DURABLE_JOBSTORE`.
    """
    jobstores: dict[str, object] = {MEMORY_JOBSTORE: MemoryJobStore()}
    if engine is not None:
        jobstores[DURABLE_JOBSTORE] = durable_jobstore(engine)
    return BackgroundScheduler(
        jobstores=jobstores,
        executors={"default": ThreadPoolExecutor(max_workers)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        # After a failed read of a job store, look again soon, not in 10 s.
        jobstore_retry_interval=2,
        timezone="UTC",
    )
