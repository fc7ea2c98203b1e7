"""Heartbeat telemetry: resource use plus inference counters.

On Linux the three system figures come straight from ``/proc/stat``,
``/proc/meminfo`` and ``/sys`` (hwmon, thermal zones), computed the way
psutil computes them; psutil is imported only where those files are not
there (another OS) or lack what is needed (a kernel without
``MemAvailable``). The agent reads three small files every heartbeat for
months, and psutil's modules would be resident all that time for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from protocol import MAX_REPORTED_MODELS, TELEMETRY_SCHEMA_SETS, InferenceStats, Telemetry

#: hwmon chips whose temp*_input psutil reads; the coretemp platform path
#: holds the same files on some kernels without a /sys/class/hwmon link.
_HWMON_GLOBS = ("class/hwmon/hwmon*/temp*_input", "class/hwmon/hwmon*/device/temp*_input")
_CORETEMP_GLOB = "devices/platform/coretemp.*/hwmon/hwmon*/temp*_input"
#: ``/proc/stat`` cpu line fields: user nice system idle iowait irq softirq steal guest guest_nice
_IDLE, _IOWAIT, _GUEST, _GUEST_NICE = 3, 4, 8, 9


def _psutil() -> ModuleType:
    import psutil

    return psutil


def read_cpu_ticks(proc: Path) -> list[int]:
    """The system-wide ``cpu`` line of ``/proc/stat``: one tick count per field."""
    with open(proc / "stat", "rb") as f:
        return [int(v) for v in f.readline().split()[1:11]]


def cpu_percent_between(before: list[int], after: list[int]) -> float:
    """Busy share of all CPU time between two ``/proc/stat`` readings, as psutil has it.

    Guest time is already counted in user and nice, so it leaves the total;
    idle and iowait are not busy. A field that went backwards counts as 0.
    """
    delta = [max(0, b - a) for a, b in zip(before, after, strict=False)]
    delta += [0] * (10 - len(delta))
    total = sum(delta) - delta[_GUEST] - delta[_GUEST_NICE]
    busy = total - delta[_IDLE] - delta[_IOWAIT]
    return round(busy / total * 100, 1) if total > 0 else 0.0


def ram_used_bytes(proc: Path) -> int | None:
    """Total minus available RAM from ``/proc/meminfo`` (psutil's ``used``).

    None when the kernel reports no usable ``MemAvailable`` (before 3.14, or
    0 through a kernel bug): psutil then estimates it from the zone
    watermarks, and that estimate is left to psutil.
    """
    fields: dict[bytes, int] = {}
    with open(proc / "meminfo", "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] in (b"MemTotal:", b"MemFree:", b"MemAvailable:"):
                fields[parts[0]] = int(parts[1]) * 1024
    total, avail = fields.get(b"MemTotal:"), fields.get(b"MemAvailable:")
    if total is None or not avail:
        return None
    if avail > total:
        # Inside some containers the host's figures leak through; psutil and
        # procps use free memory then.
        avail = fields.get(b"MemFree:", 0)
    return total - avail


def _read_milli_c(path: Path) -> float | None:
    try:
        return float(path.read_bytes()) / 1000.0
    except (OSError, ValueError):
        return None


def hottest_sensor_c(sys_root: Path) -> float | None:
    """Hottest non-zero temperature from hwmon, else from the thermal zones.

    The same files psutil's ``sensors_temperatures`` reads on Linux: thermal
    zones count only when there is no hwmon temperature file at all.
    """
    inputs = {p for pattern in _HWMON_GLOBS for p in sys_root.glob(pattern)}
    for path in sys_root.glob(_CORETEMP_GLOB):
        # the same sensor as class/hwmon/hwmonN/tempK_input when that exists
        if sys_root / "class/hwmon" / path.parent.name / path.name not in inputs:
            inputs.add(path)
    if inputs:
        # psutil skips a sensor whose chip has no readable name
        readings = [_read_milli_c(p) for p in inputs if (p.parent / "name").is_file()]
    else:
        readings = [_read_milli_c(zone / "temp")
                    for zone in sys_root.glob("class/thermal/thermal_zone*")
                    if (zone / "type").is_file()]
    values = [r for r in readings if r]
    return max(values) if values else None


def _psutil_temperature_c() -> float | None:
    """Hottest CPU-ish sensor psutil knows, or None where the kernel exposes none."""
    read = getattr(_psutil(), "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    return max(readings) if readings else None


class TelemetrySampler:
    """Builds one ``Telemetry`` message per heartbeat.

    ``root`` is where ``proc/`` and ``sys/`` are read (``/`` on a device;
    tests pass recorded trees). Without a readable ``proc/stat`` under it,
    psutil measures instead.
    """

    def __init__(
        self,
        device_id: str,
        active_models: Callable[[], list[str]] = list,
        inference: Callable[[], list[InferenceStats]] = list,
        *,
        root: Path = Path("/"),
        downloads: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self._device_id = device_id
        self._active_models = active_models
        self._inference = inference
        #: bytes each active ``name@version`` fetched when it was installed
        self._downloads = downloads
        self._proc = root / "proc"
        self._sys = root / "sys"
        self._started = time.monotonic()
        self._seq = 0
        # Prime: the first CPU figure needs a baseline.
        self._cpu_ticks: list[int] | None
        try:
            self._cpu_ticks = read_cpu_ticks(self._proc)
        except (OSError, ValueError):
            self._cpu_ticks = None
            _psutil().cpu_percent(interval=None)

    def _cpu_percent(self) -> float:
        if self._cpu_ticks is None:
            return float(_psutil().cpu_percent(interval=None))
        try:
            now = read_cpu_ticks(self._proc)
        except (OSError, ValueError):
            return 0.0
        before, self._cpu_ticks = self._cpu_ticks, now
        return cpu_percent_between(before, now)

    def _ram_used(self) -> int:
        if self._cpu_ticks is not None:
            try:
                used = ram_used_bytes(self._proc)
            except (OSError, ValueError):
                used = None
            if used is not None:
                return used
        return int(_psutil().virtual_memory().used)

    def _temperature(self) -> float | None:
        if self._cpu_ticks is None:
            return _psutil_temperature_c()
        return hottest_sensor_c(self._sys)

    def sample(self) -> Telemetry:
        """Measure now; CPU is the system-wide average since the last sample."""
        self._seq += 1
        temp = self._temperature()
        return Telemetry(
            schema=TELEMETRY_SCHEMA_SETS,
            device_id=self._device_id,
            ts=time.time(),
            seq=self._seq,
            uptime_s=round(time.monotonic() - self._started, 3),
            cpu_percent=self._cpu_percent(),
            ram_used_bytes=self._ram_used(),
            temp_c=max(-100.0, min(200.0, temp)) if temp is not None else None,
            models=self._active_models()[:MAX_REPORTED_MODELS],
            inference=self._inference(),
            downloaded_bytes=dict(list(self._downloads().items())[:MAX_REPORTED_MODELS]) or None,
        )
