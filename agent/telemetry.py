"""Heartbeat telemetry: resource use plus inference counters."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil

from protocol import InferenceStats, Telemetry


def _temperature_c() -> float | None:
    """Hottest CPU-ish sensor, or None where the kernel exposes none."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    return max(readings) if readings else None


class TelemetrySampler:
    """Builds one ``Telemetry`` message per heartbeat."""

    def __init__(
        self,
        device_id: str,
        active_model: Callable[[], str | None] = lambda: None,
        inference: Callable[[], list[InferenceStats]] = list,
    ) -> None:
        self._device_id = device_id
        self._active_model = active_model
        self._inference = inference
        self._started = time.monotonic()
        self._seq = 0
        psutil.cpu_percent(interval=None)  # prime: the first call has no baseline

    def sample(self) -> Telemetry:
        """Measure now; CPU is the system-wide average since the last sample."""
        self._seq += 1
        temp = _temperature_c()
        return Telemetry(
            device_id=self._device_id,
            ts=time.time(),
            seq=self._seq,
            uptime_s=round(time.monotonic() - self._started, 3),
            cpu_percent=psutil.cpu_percent(interval=None),
            ram_used_bytes=psutil.virtual_memory().used,
            temp_c=max(-100.0, min(200.0, temp)) if temp is not None else None,
            active_model=self._active_model(),
            inference=self._inference(),
        )
