"""Helpers for control-plane tests: settings for a temp dir, device messages, waiting."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import protocol as p
from controlplane.config import ControlPlaneSettings
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support import database
from tests.support.auth import ADMIN_TOKEN

SHA = "ab" * 32


def cp_settings(
    data_dir: Path, broker: MosquittoBroker, credentials: tuple[str, str], **overrides: Any
) -> ControlPlaneSettings:
    """Settings for a control plane on a free API port against ``broker``.

    Its first admin token is :data:`tests.support.auth.ADMIN_TOKEN`; send
    ``ADMIN_HEADERS`` with every API call.
    """
    username, password = credentials
    # The CLI (in-process or as a subprocess) finds its token here, so
    # `slmfleet models publish` in a test talks to this control plane as admin.
    os.environ["SLMFLEET_TOKEN"] = ADMIN_TOKEN
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "mqtt_url": broker.url,
        "mqtt_username": username,
        "mqtt_password": password,
        "api_port": 0,
        "ingest_flush_ms": 10,
        "bootstrap_token": ADMIN_TOKEN,
    }
    values.update(database.settings(overrides))
    values.update(overrides)
    return ControlPlaneSettings(**values)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
    poll: float = 0.02,
) -> Any:
    """Poll ``predicate`` every ``poll`` s until it returns something truthy; return that.

    Raises AssertionError naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def hello(
    device_id: str,
    *,
    tier: str = "micro",
    profile: str = "raspberry-pi-4-4gb",
    labels: dict[str, str] | None = None,
    ram_bytes: int = 4 * 1024**3,
    **extra: Any,
) -> p.Hello:
    """A plausible hello for ``device_id``."""
    return p.Hello(
        device_id=device_id,
        ts=time.time(),
        agent_version="0.1.0",
        capabilities=p.Capabilities(
            cpu=p.CpuInfo(model="Cortex-A72", arch="aarch64", cores=4, threads=4),
            ram_bytes=ram_bytes,
            disk_free_bytes=20 * 1024**3,
            os=p.OsInfo(system="Linux", release="6.1"),
        ),
        profile=profile,
        tier=p.Tier(tier),
        runtimes=[p.Runtime(name="llama.cpp", version="0.3.2")],
        active_model=p.ActiveModel(name="smollm2", version="1.0.0", tier=p.Tier(tier), sha256=SHA),
        labels=labels or {},
        **extra,
    )


def telemetry(device_id: str, seq: int, **extra: Any) -> p.Telemetry:
    """A heartbeat with one inference-stats entry."""
    values: dict[str, Any] = {
        "device_id": device_id,
        "ts": time.time(),
        "seq": seq,
        "uptime_s": 10.0 + seq,
        "cpu_percent": 12.5,
        "ram_used_bytes": 1024**3,
        "temp_c": 48.0,
        "active_model": "smollm2@1.0.0",
        "inference": [p.InferenceStats(model="smollm2", version="1.0.0", requests=3, tokens=90)],
    }
    values.update(extra)
    return p.Telemetry(**values)


def event(device_id: str, seq: int, type_: str = "downloading", **extra: Any) -> p.Event:
    """An update-pipeline event."""
    return p.Event(
        device_id=device_id, ts=time.time(), seq=seq, type=p.EventType(type_), **extra
    )


def state(device_id: str, online: bool) -> p.State:
    """An online/offline state message."""
    return p.State(
        device_id=device_id,
        state=p.DeviceState.ONLINE if online else p.DeviceState.OFFLINE,
        ts=time.time(),
    )
