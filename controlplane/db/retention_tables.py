"""Tables and indexes of telemetry retention: hourly rollups, progress marks, liveness.

Raw heartbeats (``telemetry``) are kept for ``telemetry_raw_days``; before
they go, each is folded into one row per device, hour and model version in
``telemetry_hourly``, kept for ``telemetry_rollup_days``
(:mod:`controlplane.retention`). A rollup row holds sums, so folding in more
heartbeats later is an addition: counters are summed, maxima kept, and
percentiles and tokens/s kept as request-weighted sums (``*_wsum`` over
``*_weight``), which is how :mod:`controlplane.db.telemetry_aggregates`
merges heartbeats, so a figure read from rollups equals the one read from
the raw rows it came from.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from .models import SHORT_LEN, AssignmentRecord, Base, Device, DeviceEvent, _DeviceRows

#: the per-version figures merged by request-weighted mean
WEIGHTED = ("ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "latency_p95_ms", "tokens_per_s")
#: the per-version counters summed
SUMMED = ("requests", "errors", "tokens", "crashes", "ooms")


class TelemetryHourly(_DeviceRows, Base):
    """One device's heartbeats of one hour, for one model version.

    The row with ``model`` and ``version`` empty holds the device's resource
    figures (CPU, RAM, temperature) for the hour; a row per model version
    holds its inference figures.
    """

    __tablename__ = "telemetry_hourly"

    #: start of the hour, Unix seconds, from the heartbeats' own ``ts``
    hour: Mapped[float]
    model: Mapped[str] = mapped_column(String(SHORT_LEN))
    version: Mapped[str] = mapped_column(String(SHORT_LEN))
    heartbeats: Mapped[int] = mapped_column(BigInteger)
    cpu_percent_sum: Mapped[float]
    cpu_percent_max: Mapped[float]
    ram_used_bytes_max: Mapped[int] = mapped_column(BigInteger)
    temp_c_max: Mapped[float | None]
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)
    crashes: Mapped[int] = mapped_column(BigInteger)
    ooms: Mapped[int] = mapped_column(BigInteger)
    ttft_p50_ms_wsum: Mapped[float]
    ttft_p50_ms_weight: Mapped[float]
    ttft_p95_ms_wsum: Mapped[float]
    ttft_p95_ms_weight: Mapped[float]
    latency_p50_ms_wsum: Mapped[float]
    latency_p50_ms_weight: Mapped[float]
    latency_p95_ms_wsum: Mapped[float]
    latency_p95_ms_weight: Mapped[float]
    tokens_per_s_wsum: Mapped[float]
    tokens_per_s_weight: Mapped[float]

    __table_args__ = (
        Index("uq_telemetry_hourly_device_id_hour_model_version",
              "device_id", "hour", "model", "version", unique=True),
        Index("ix_telemetry_hourly_hour", "hour"),
    )


class RetentionMark(Base):
    """How far a retention task has come (``telemetry_rollup``: the last heartbeat id folded in)."""

    __tablename__ = "retention_marks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float]


#: Offline detection reads the online devices silent since a cutoff from
#: this index, instead of walking every device row (controlplane.liveness).
LIVENESS_INDEX = Index("ix_devices_online_last_seen", Device.online, Device.last_seen)

#: ``/metrics`` keys its evaluation scores by the newest ``evaluated`` event,
#: read from this index (controlplane.metrics)
EVALUATED_INDEX = Index("ix_device_events_type_id", DeviceEvent.type, DeviceEvent.id)

#: history retention finds the entries that ended before a cutoff here
#: (controlplane.retention.history)
ENDED_INDEX = Index("ix_assignments_ended_at", AssignmentRecord.ended_at)
