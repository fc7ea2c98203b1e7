"""The control plane's one APScheduler.

Every periodic job (liveness, the director's re-signing, the rollout
engine) is added to the scheduler made here, so there is one place that
owns job threads, their start and their shutdown.
"""

from __future__ import annotations

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

#: job store for jobs rebuilt at every start (liveness)
MEMORY_JOBSTORE = "default"
#: job store in the control-plane database, for jobs that outlive the process
#: (the rollout engine); its table ``apscheduler_jobs`` is APScheduler's own
DURABLE_JOBSTORE = "durable"
DURABLE_TABLE = "apscheduler_jobs"


def create_scheduler(max_workers: int = 4, engine: Engine | None = None) -> BackgroundScheduler:
    """A stopped scheduler in UTC; jobs run at most once at a time and never pile up.

    With ``engine``, a durable SQLAlchemy job store on that database is added
    under :data:`DURABLE_JOBSTORE`.
    """
    jobstores: dict[str, object] = {MEMORY_JOBSTORE: MemoryJobStore()}
    if engine is not None:
        jobstores[DURABLE_JOBSTORE] = SQLAlchemyJobStore(engine=engine, tablename=DURABLE_TABLE)
    return BackgroundScheduler(
        jobstores=jobstores,
        executors={"default": ThreadPoolExecutor(max_workers)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        timezone="UTC",
    )
