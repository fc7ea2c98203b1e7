"""The control plane's one APScheduler.

Every periodic job (liveness now; the rollout engine and the director's
re-signing later) is added to the scheduler made here, so there is one
place that owns job threads, their start and their shutdown.
"""

from __future__ import annotations

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler

#: job store for jobs rebuilt at every start (liveness); durable jobs such as
#: rollouts get an SQLAlchemy job store under another alias
MEMORY_JOBSTORE = "default"


def create_scheduler(max_workers: int = 4) -> BackgroundScheduler:
    """A stopped scheduler in UTC; jobs run at most once at a time and never pile up."""
    return BackgroundScheduler(
        jobstores={MEMORY_JOBSTORE: MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(max_workers)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC",
    )
