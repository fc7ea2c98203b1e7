"""A simulated fleet against the real broker and control plane: ingest under load.

    .venv/bin/python bench/fleet.py                    # FLEET_DEVICES=N, FLEET_HOLD_S=S
    FLEET_REPLICAS=2 .venv/bin/python bench/fleet.py   # two replicas on PostgreSQL
    FLEET_DB=postgresql .venv/bin/python bench/fleet.py

One broker, one control plane (API, ingest parent and its writer process, on
SQLite) and ``slmfleet simulate`` in a process of its own, all on this
machine. With ``FLEET_REPLICAS=2`` a second control plane runs in its own
process, both on one PostgreSQL database, splitting the ingest through an
MQTT v5 shared subscription. Two phases, the same devices:

1. **hold**: 10,000 devices at a 30 s heartbeat (~333 msg/s) for
   ``FLEET_HOLD_S`` seconds after they came up: CPU of each process and of
   the machine (headroom = what is left of all cores), ingest lag, database
   growth per device-day.
2. **ceiling**: the same devices at a 1 s heartbeat (~10,000 msg/s offered)
   for 30 s: telemetry rows written per second, and whether the ingest
   keeps up (lag) or drops.

Ingest lag is the time from a heartbeat's ``ts`` (set by the simulated
device when it sends) until the row can be read from the database, sampled
by polling every 0.2 s, so it is an upper bound with that resolution.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from _common import report, scratch_broker
from sqlalchemy import func, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.broker_auth import CONTROL_PLANE_USER  # noqa: E402
from controlplane.db import TelemetryRow  # noqa: E402
from controlplane.service import ControlPlane  # noqa: E402
from tests.support.controlplane import cp_settings  # noqa: E402

DEVICES = int(os.environ.get("FLEET_DEVICES", "10000"))
HOLD_S = float(os.environ.get("FLEET_HOLD_S", "60"))
#: control-plane replicas; more than one runs on PostgreSQL with a shared subscription
REPLICAS = int(os.environ.get("FLEET_REPLICAS", "1"))
DATABASE = os.environ.get("FLEET_DB", "sqlite")
CEILING_S = 30.0
POLL_S = 0.2


class LagProbe:
    """Polls the telemetry table and records, for each new row, now - its ``ts``."""

    def __init__(self, engine: object) -> None:
        self.engine = engine
        self.lags: list[float] = []
        self.rows = 0
        self._last_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LagProbe:
        with self.engine.connect() as conn:  # type: ignore[attr-defined]
            self._last_id = conn.execute(select(func.max(TelemetryRow.id))).scalar() or 0
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            with self.engine.connect() as conn:  # type: ignore[attr-defined]
                rows = conn.execute(select(TelemetryRow.id, TelemetryRow.ts).where(
                    TelemetryRow.id > self._last_id)).all()
            now = time.time()
            if rows:
                self._last_id = max(r.id for r in rows)
                self.rows += len(rows)
                self.lags += [now - r.ts for r in rows]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values or [0])


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def db_bytes(engine: Any, data_dir: Path) -> int:
    """Bytes the database takes: the SQLite files, or PostgreSQL's own figure."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            # The tables themselves: the database's size also moves with
            # autovacuum and the catalog, which would swamp a short run.
            return int(conn.execute(text(
                "SELECT sum(pg_total_relation_size(relid)) FROM pg_stat_user_tables"
            )).scalar())
    return sum(f.stat().st_size for f in data_dir.glob("*.db*"))


def broker_process(data_dir: Path) -> psutil.Process:
    """The mosquitto process whose command line names ``data_dir`` (its config is there)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "mosquitto" in (proc.info["name"] or "") and str(data_dir) in " ".join(
                proc.info["cmdline"] or []):
            return proc
    raise RuntimeError(f"no mosquitto process for {data_dir}")


def simulate(broker_url: str, password: str, heartbeat: float, ramp: float,
             duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "slmfleet", "simulate", "--broker", broker_url,
         "--username", CONTROL_PLANE_USER, "--password", password, "--devices", str(DEVICES),
         "--heartbeat", str(heartbeat), "--ramp", str(ramp), "--duration", str(duration),
         "--output", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )


def measure(name: str, sim: subprocess.Popen[str], procs: dict[str, psutil.Process],
            probe: LagProbe, seconds: float, size: Callable[[], int]) -> dict[str, float]:
    groups = {k: [p, *p.children(recursive=True)] for k, p in procs.items()}
    groups["simulator"] = [psutil.Process(sim.pid)]
    cpu0 = {k: cpu_seconds(v) for k, v in groups.items()}
    rows0, lags0, size0 = probe.rows, len(probe.lags), size()
    psutil.cpu_percent()
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    machine = psutil.cpu_percent()
    figures = {f"{name}_{k}_cpu_pct": round(100 * (cpu_seconds(v) - cpu0[k]) / elapsed, 1)
               for k, v in groups.items()}
    lags = probe.lags[lags0:]
    cores = psutil.cpu_count() or 1
    figures |= {
        # psutil's machine-wide figure is per core; as a share of all cores x 100
        f"{name}_machine_cpu_pct": round(machine * cores, 1),
        f"{name}_machine_cpu_capacity_pct": cores * 100,
        f"{name}_ingested_msgs_per_s": round((probe.rows - rows0) / elapsed, 1),
        f"{name}_lag_p50_s": round(statistics.median(lags), 3) if lags else -1,
        f"{name}_lag_p99_s": round(p99(lags), 3),
        f"{name}_db_growth_bytes": size() - size0,
        f"{name}_seconds": round(elapsed, 1),
    }
    print(f"{name}: {figures}", flush=True)
    return figures


REPLICA = """
import sys, signal
sys.path.insert(0, sys.argv[1])
from controlplane.service import ControlPlane
from tests.support.controlplane import cp_settings
from pathlib import Path
class B:  # what cp_settings reads of a broker
    url = sys.argv[3]
cp = ControlPlane(cp_settings(Path(sys.argv[2]), B, (sys.argv[4], sys.argv[5]),
                              database_url=sys.argv[6], mqtt_shared_group="slmfleet-cp",
                              ingest_flush_ms=200)).start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
cp.stop()
"""


def start_replica(work: Path, broker_url: str, password: str, url: str) -> subprocess.Popen[str]:
    """A second control plane in a process of its own, as a real replica would be."""
    proc = subprocess.Popen([sys.executable, "-c", REPLICA, str(ROOT), str(work), broker_url,
                             CONTROL_PLANE_USER, password, url],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-fleet-"))
    broker = scratch_broker([])
    password = broker.users[CONTROL_PLANE_USER]
    postgres = None
    extra: dict[str, object] = {}
    if REPLICAS > 1 or DATABASE == "postgresql":
        from tests.support.postgres import PostgresCluster

        postgres = PostgresCluster().start()
        extra["database_url"] = postgres.create_database("fleet")
    if REPLICAS > 1:
        extra["mqtt_shared_group"] = "slmfleet-cp"
    cp = ControlPlane(cp_settings(work / "cp", broker, (CONTROL_PLANE_USER, password),
                                  ingest_flush_ms=200, **extra)).start()
    others = [start_replica(work / f"cp{i}", broker.url, password, str(extra["database_url"]))
              for i in range(1, REPLICAS)]
    probe = LagProbe(cp.engine).start()
    procs = {"broker": broker_process(broker.data_dir), "controlplane": psutil.Process()}
    procs |= {f"replica{i}": psutil.Process(o.pid) for i, o in enumerate(others, 1)}
    figures: dict[str, float | int | str] = {"devices": DEVICES, "replicas": REPLICAS,
                                             "database": cp.engine.dialect.name}
    size = functools.partial(db_bytes, cp.engine, work / "cp")
    try:
        ramp = 20.0
        print(f"{DEVICES} devices coming up over {ramp:g} s, 30 s heartbeat, "
              f"{REPLICAS} replica(s) on {figures['database']}", flush=True)
        sim = simulate(broker.url, password, 30.0, ramp, ramp + 35 + HOLD_S)
        time.sleep(ramp + 35)  # up, plus one full heartbeat period to settle
        hold = measure("hold", sim, procs, probe, HOLD_S, size)
        sim.communicate(timeout=120)
        device_seconds = DEVICES * hold["hold_seconds"]
        figures |= hold
        figures["db_bytes_per_device_day"] = round(
            hold["hold_db_growth_bytes"] / device_seconds * 86400)

        print(f"ceiling: {DEVICES} devices at a 1 s heartbeat for {CEILING_S:g} s", flush=True)
        sim = simulate(broker.url, password, 1.0, 5.0, 5 + 5 + CEILING_S)
        time.sleep(10)
        figures |= measure("ceiling", sim, procs, probe, CEILING_S, size)
        summary = json.loads((sim.communicate(timeout=120)[0] or "{}").strip().splitlines()[-1])
        # What the simulator managed to send over its whole run (ramp included),
        # below the 10,000/s asked for when the cores are saturated.
        figures["ceiling_sent_msgs_per_s"] = summary.get("published_per_s", -1)
        figures["ceiling_asked_msgs_per_s"] = DEVICES
    finally:
        probe.stop()
        for other in others:
            other.terminate()
            other.wait(timeout=30)
        cp.stop()
        broker.stop()
        if postgres is not None:
            postgres.stop()
    report(figures)


if __name__ == "__main__":
    main()
