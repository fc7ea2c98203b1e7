"""Telemetry retention: hourly rollups kept long, raw heartbeats and events pruned.

:class:`RetentionJob` runs on the control plane's scheduler (see
:mod:`controlplane.retention.job` for what one run does and in what order).
"""

from .job import RETENTION_JOB_ID, RetentionJob, RetentionReport, add_retention_job

__all__ = ["RETENTION_JOB_ID", "RetentionJob", "RetentionReport", "add_retention_job"]
