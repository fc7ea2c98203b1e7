"""Heartbeat telemetry read from /proc and /sys: psutil's figures without psutil."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from agent.telemetry import (
    TelemetrySampler,
    cpu_percent_between,
    hottest_sensor_c,
    ram_used_bytes,
    read_cpu_ticks,
)

MEMINFO = """MemTotal:        8000000 kB
MemFree:          500000 kB
MemAvailable:    6000000 kB
Buffers:           10000 kB
Cached:          4000000 kB
"""


def write(root: Path, relative: str, content: str) -> Path:
    """Put a file into a fake root, creating its directories."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


# -- CPU -----------------------------------------------------------------------


def test_cpu_percent_is_busy_share_without_guest_idle_iowait() -> None:
    #          user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 1000, 20, 0, 0, 0, 0, 0]
    after = [160, 0, 70, 1100, 40, 0, 0, 0, 30, 0]
    # guest 30 is already inside user: total 80 + 100 + 20 = 200, busy 80
    assert cpu_percent_between(before, after) == 40.0


def test_cpu_percent_edge_cases() -> None:
    same = [5, 0, 5, 100, 0, 0, 0, 0]  # an old kernel: no guest fields
    assert cpu_percent_between(same, same) == 0.0
    # a counter that went backwards counts as no time, as in psutil and top
    assert cpu_percent_between([10, 0, 0, 100], [5, 0, 0, 200]) == 0.0
    assert cpu_percent_between([0, 0, 0, 0], [50, 0, 0, 50]) == 50.0


def test_cpu_ticks_from_proc_stat(tmp_path: Path) -> None:
    write(tmp_path, "stat", "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert read_cpu_ticks(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


# -- RAM -----------------------------------------------------------------------


def test_ram_used_is_total_minus_available(tmp_path: Path) -> None:
    write(tmp_path, "meminfo", MEMINFO)
    assert ram_used_bytes(tmp_path) == (8000000 - 6000000) * 1024


def test_ram_used_left_to_psutil_without_mem_available(tmp_path: Path) -> None:
    write(tmp_path, "meminfo", MEMINFO.replace("MemAvailable:    6000000", "MemAvailable:    0"))
    assert ram_used_bytes(tmp_path) is None
    lines = [line for line in MEMINFO.splitlines() if not line.startswith("MemAvailable")]
    write(tmp_path, "meminfo", "\n".join(lines) + "\n")
    assert ram_used_bytes(tmp_path) is None


def test_ram_available_above_total_falls_back_to_free(tmp_path: Path) -> None:
    write(tmp_path, "meminfo", MEMINFO.replace("6000000", "9000000"))
    assert ram_used_bytes(tmp_path) == (8000000 - 500000) * 1024


# -- temperature ---------------------------------------------------------------


def test_hottest_hwmon_sensor(tmp_path: Path) -> None:
    write(tmp_path, "class/hwmon/hwmon0/name", "k10temp\n")
    write(tmp_path, "class/hwmon/hwmon0/temp1_input", "45250\n")
    write(tmp_path, "class/hwmon/hwmon0/temp2_input", "0\n")  # unused input: ignored
    write(tmp_path, "class/hwmon/hwmon1/device/name", "nvme\n")
    write(tmp_path, "class/hwmon/hwmon1/device/temp1_input", "51000\n")
    write(tmp_path, "class/hwmon/hwmon2/temp1_input", "99000\n")  # no chip name: skipped
    # thermal zones only count when hwmon has no temperatures at all
    write(tmp_path, "class/thermal/thermal_zone0/type", "x86_pkg_temp\n")
    write(tmp_path, "class/thermal/thermal_zone0/temp", "80000\n")
    assert hottest_sensor_c(tmp_path) == 51.0


def test_coretemp_platform_sensor_without_class_link(tmp_path: Path) -> None:
    write(tmp_path, "devices/platform/coretemp.0/hwmon/hwmon3/name", "coretemp\n")
    write(tmp_path, "devices/platform/coretemp.0/hwmon/hwmon3/temp1_input", "62000\n")
    assert hottest_sensor_c(tmp_path) == 62.0


def test_thermal_zones_without_hwmon(tmp_path: Path) -> None:
    write(tmp_path, "class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(tmp_path, "class/thermal/thermal_zone0/temp", "48312\n")
    write(tmp_path, "class/thermal/thermal_zone1/type", "gpu-thermal\n")
    write(tmp_path, "class/thermal/thermal_zone1/temp", "not a number\n")
    assert hottest_sensor_c(tmp_path) == 48.312


def test_no_sensors(tmp_path: Path) -> None:
    assert hottest_sensor_c(tmp_path) is None


# -- the sampler ---------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_sampler_agrees_with_psutil_on_this_machine() -> None:
    sampler = TelemetrySampler("dev-1", active_models=lambda: ["m@1", "e@2"])
    time.sleep(0.2)
    first = sampler.sample()
    expected_ram = psutil.virtual_memory().used
    assert first.seq == 1 and first.active_refs() == ["m@1", "e@2"]
    assert 0.0 <= first.cpu_percent <= 100.0
    # RAM moves a little between two reads; the definition is the same
    assert abs(first.ram_used_bytes - expected_ram) < 0.05 * psutil.virtual_memory().total
    sensors = psutil.sensors_temperatures()
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    if readings:
        assert first.temp_c is not None
    else:
        assert first.temp_c is None
    assert sampler.sample().seq == 2


def test_sampler_without_proc_uses_psutil(tmp_path: Path) -> None:
    sampler = TelemetrySampler("dev-1", root=tmp_path)  # no proc/stat under it
    sample = sampler.sample()
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert sample.ram_used_bytes > 0


def test_sampler_reads_the_given_root(tmp_path: Path) -> None:
    write(tmp_path, "proc/stat", "cpu  100 0 50 1000 0 0 0 0 0 0\n")
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "300000\n")
    sampler = TelemetrySampler("dev-1", root=tmp_path)
    write(tmp_path, "proc/stat", "cpu  150 0 50 1050 0 0 0 0 0 0\n")
    sample = sampler.sample()
    assert sample.cpu_percent == 50.0
    assert sample.ram_used_bytes == 2000000 * 1024
    assert sample.temp_c == 200.0  # clamped to what the wire accepts
