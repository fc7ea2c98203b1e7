"""A simulated fleet against the real broker and control plane: ingest under load.

    .venv/bin/python bench/fleet.py                    # FLEET_DEVICES=N, FLEET_HOLD_S=S
    FLEET_REPLICAS=2 .venv/bin/python bench/fleet.py   # two replicas on PostgreSQL
    FLEET_DB=postgresql .venv/bin/python bench/fleet.py
    FLEET_SCENARIO=window .venv/bin/python bench/fleet.py  # activation window, locks

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
   for 30 s, sent by ``FLEET_SIM_PROCS`` simulator processes (default 2)
   that catch up on beats a busy machine held them back from: what the
   simulator sent in each whole second of the window (mean, median, min),
   telemetry rows written per second, and how fast the ingest lag grows
   (it grows when the ingest, not the simulator, is the limit).

Ingest lag is the time from a heartbeat's ``ts`` (set by the simulated
device when it sends) until the row can be read from the database, sampled
by polling every 0.2 s, so it is an upper bound with that resolution.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from _common import report, scratch_broker
from _controlplane import PROFILE_RATE, ControlPlaneProcess
from _profile import breakdown
from _roles import RoleCpu, cpu_by_role
from sqlalchemy import Engine, func, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.broker_auth import CONTROL_PLANE_USER  # noqa: E402
from controlplane.db import TelemetryRow, make_engine  # noqa: E402

DEVICES = int(os.environ.get("FLEET_DEVICES", "10000"))
HOLD_S = float(os.environ.get("FLEET_HOLD_S", "60"))
#: control-plane replicas; more than one runs on PostgreSQL with a shared subscription
REPLICAS = int(os.environ.get("FLEET_REPLICAS", "1"))
DATABASE = os.environ.get("FLEET_DB", "sqlite")
#: FLEET_SCENARIO=window: a rollout waiting for its activation window (bench/_fleet_window.py)
SCENARIO = os.environ.get("FLEET_SCENARIO", "ingest")
#: FLEET_CEILING=0 skips the ceiling phase
CEILING_S = float(os.environ.get("FLEET_CEILING", "30"))
POLL_S = 0.2
#: from the ceiling simulator's start to the window: its start-up, 5 s ramp and the hellos
CEILING_WARMUP_S = 15.0
#: simulator processes at the ceiling, and the heartbeat periods a late tick still sends
SIM_PROCS = int(os.environ.get("FLEET_SIM_PROCS", "2"))
SIM_CATCH_UP = 3
#: FLEET_PROFILE=DIR: run each control plane under py-spy, collapsed stacks in DIR
PROFILE_DIR = os.environ.get("FLEET_PROFILE")
#: how often retention runs in the benchmark (the default is 300 s, which a
#: hold never reaches); it rolls up what arrived since, so its cost per message holds
RETENTION_S = 30.0
#: Prometheus' default scrape interval: a held fleet is watched, not left alone
SCRAPE_S = 15.0
TOKEN = "slmf_bench-" + secrets.token_urlsafe(32)


class Poller:
    """A daemon thread calling :meth:`poll` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Poller:
        """Start polling; return self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def poll(self) -> None:
        """One round of work."""
        raise NotImplementedError


class LagProbe(Poller):
    """Polls the telemetry table and records, for each new row, now - its ``ts``."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(POLL_S)
        self.engine = engine
        self.lags: list[float] = []
        #: (wall time of a poll, median lag of the rows it read)
        self.polls: list[tuple[float, float]] = []
        self.rows = 0
        with engine.connect() as conn:
            self._last_id = conn.execute(select(func.max(TelemetryRow.id))).scalar() or 0

    def poll(self) -> None:
        """Read the rows written since the last poll."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(TelemetryRow.id, TelemetryRow.ts).where(
                TelemetryRow.id > self._last_id)).all()
        now = time.time()
        if rows:
            self._last_id = max(r.id for r in rows)
            self.rows += len(rows)
            lags = [now - r.ts for r in rows]
            self.lags += lags
            self.polls.append((now, statistics.median(lags)))


class Scraper(Poller):
    """Reads ``/metrics`` every :data:`SCRAPE_S`, as Prometheus would; counts the answers."""

    def __init__(self, api_url: str) -> None:
        super().__init__(SCRAPE_S)
        self.request = urllib.request.Request(f"{api_url}/metrics",
                                              headers={"Authorization": f"Bearer {TOKEN}"})
        self.scrapes = 0

    def poll(self) -> None:
        """One scrape."""
        with urllib.request.urlopen(self.request, timeout=30) as answer:
            answer.read()
        self.scrapes += 1


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values or [0])


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


def simulate(broker_url: str, password: str, heartbeat: float, ramp: float,
             duration: float, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "slmfleet", "simulate", "--broker", broker_url,
         "--username", CONTROL_PLANE_USER, "--devices", str(DEVICES),
         "--heartbeat", str(heartbeat), "--ramp", str(ramp), "--duration", str(duration),
         "--output", "json", *options],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "SLMFLEET_SIM_PASSWORD": password},
    )


class Accounting:
    """CPU per role (processes) and per thread group (inside each control plane)."""

    def __init__(self, roles: RoleCpu, planes: list[ControlPlaneProcess]) -> None:
        self.roles = roles
        self.planes = planes

    def snapshot(self) -> tuple[float, dict[int, tuple[str, float]], dict[str, dict[str, float]]]:
        """(monotonic time, processes, threads of each control plane), taken now."""
        return (time.monotonic(), self.roles.snapshot(),
                {p.role: p.threads() for p in self.planes})

    @staticmethod
    def figures(name: str, before: tuple, after: tuple) -> dict[str, float]:
        """Percent of one core per role and per control-plane thread group over a window."""
        seconds = after[0] - before[0]
        out = {f"{name}_cpu_pct_{role}": pct
               for role, pct in cpu_by_role(before[1], after[1], seconds).items()}
        for plane, groups in after[2].items():
            for group, cpu in sorted(groups.items()):
                spent = cpu - before[2].get(plane, {}).get(group, 0.0)
                out[f"{name}_cpu_pct_{plane}_thread_{group}"] = round(100 * spent / seconds, 2)
        return out


def control_plane_share(figures: dict[str, float], name: str) -> float:
    """The control plane's own processes (every replica and its writer), % of one core."""
    prefix = f"{name}_cpu_pct_"
    return round(sum(v for k, v in figures.items() if k.startswith(prefix)
                     and "_thread_" not in k
                     and k.removeprefix(prefix).split("_")[0].startswith(("controlplane",
                                                                          "replica"))), 2)


def measure(name: str, accounting: Accounting, probe: LagProbe, seconds: float,
            size: Callable[[], int]) -> dict[str, float]:
    """Sleep ``seconds`` and return what every role spent and what the probe saw."""
    rows0, lags0, size0 = probe.rows, len(probe.lags), size()
    spies = []
    if PROFILE_DIR:
        Path(PROFILE_DIR).mkdir(parents=True, exist_ok=True)
        spies = [(p.role, p.profile(seconds, Path(PROFILE_DIR) / f"{name}-{p.role}.txt"))
                 for p in accounting.planes]
    psutil.cpu_percent()
    before = accounting.snapshot()
    time.sleep(seconds)
    after = accounting.snapshot()
    profiles = {}
    for role, spy in spies:
        spy.wait(60)
        out = Path(PROFILE_DIR or "") / f"{name}-{role}.txt"
        if out.exists():
            profiles[role] = breakdown(out, PROFILE_RATE, seconds)
    machine = psutil.cpu_percent()
    elapsed = after[0] - before[0]
    figures = accounting.figures(name, before, after)
    figures[f"{name}_cpu_pct_control_plane_total"] = control_plane_share(figures, name)
    for role, shares in profiles.items():
        figures |= {f"{name}_profile_pct_{role}_{what.replace(' ', '_').replace(',', '')}": pct
                    for what, pct in shares.items()}
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
    for key, value in figures.items():
        print(f"  {key}: {value}", flush=True)
    return figures


def sent_rate(summary: dict[str, Any], since: float, until: float) -> dict[str, float]:
    """What the simulator sent in each whole second it spent inside the window
    [``since``, ``until``] (wall times): mean, median and min, heartbeats a second."""
    start = summary.get("started_wall", 0.0)
    per_second = summary.get("heartbeats_per_second") or []
    inside = [n for i, n in enumerate(per_second) if since <= start + i and start + i + 1 <= until]
    print(f"  simulator, heartbeats in each second of the window: {inside}", flush=True)
    pick = {"mean": statistics.mean, "median": statistics.median, "min": min}
    out = {f"ceiling_sent_{what}_msgs_per_s": round(float(f(inside)), 1) if inside else -1.0
           for what, f in pick.items()}
    return out | {"ceiling_sent_seconds": len(inside),
                  "ceiling_sent_seconds_below_90pct": sum(n < 0.9 * DEVICES for n in inside),
                  "ceiling_sent_whole_run_msgs_per_s": summary.get("published_per_s", -1)}


def lag_growth(polls: list[tuple[float, float]], since: float, until: float) -> dict[str, float]:
    """How the ingest lag moved over the window: its median over the first and the
    last 5 s, and the least-squares slope of each poll's median lag (s per s)."""
    inside = [(t, lag) for t, lag in polls if since <= t <= until]
    if len(inside) < 2:
        return {"ceiling_lag_growth_s_per_s": -1.0}
    first = [lag for t, lag in inside if t < since + 5]
    last = [lag for t, lag in inside if t > until - 5]
    return {"ceiling_lag_first_5s_s": round(statistics.median(first), 3) if first else -1,
            "ceiling_lag_last_5s_s": round(statistics.median(last), 3) if last else -1,
            "ceiling_lag_growth_s_per_s": round(statistics.linear_regression(
                [t for t, _ in inside], [lag for _, lag in inside]).slope, 3)}


def backend_roles(engine: Engine) -> Callable[[], dict[int, str]]:
    """The PostgreSQL backend pids serving the benchmark's own connections (the probe)."""
    def read() -> dict[int, str]:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'slmfleet-bench'"
            )).scalars().all()
        return {int(pid): "postgres_bench" for pid in rows}
    return read


def main() -> None:
    if SCENARIO == "window":
        from _fleet_window import main as window_scenario

        window_scenario(DEVICES)
        return
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-fleet-"))
    broker = scratch_broker([])
    password = broker.users[CONTROL_PLANE_USER]
    postgres = None
    common: dict[str, object] = {"mqtt_url": broker.url, "username": CONTROL_PLANE_USER,
                                 "password": password, "ingest_flush_ms": 200,
                                 "bootstrap_token": TOKEN,
                                 # retention runs inside the hold window, not 5 min in
                                 "retention_interval_s": RETENTION_S}
    if REPLICAS > 1 or DATABASE == "postgresql":
        from tests.support.postgres import PostgresCluster

        postgres = PostgresCluster().start()
        common["database_url"] = postgres.create_database("fleet")
    else:
        common["database_url"] = f"sqlite:///{work / 'controlplane' / 'controlplane.db'}"
    if REPLICAS > 1:
        common["mqtt_shared_group"] = "slmfleet-cp"
    planes: list[ControlPlaneProcess] = []
    probe: LagProbe | None = None
    scraper: Scraper | None = None
    try:
        for i in range(REPLICAS):
            role = "controlplane" if i == 0 else f"replica{i}"
            planes.append(ControlPlaneProcess(role, {**common, "data_dir": str(work / role)}))
        url = str(common["database_url"])
        if url.startswith("postgresql"):
            url += "?application_name=slmfleet-bench"
        engine = make_engine(url)
        probe = LagProbe(engine).start()
        scraper = Scraper(planes[0].api_url).start()
        roles = RoleCpu(broker.data_dir, postgres.root / "data" if postgres else None,
                        backend_roles(engine) if postgres else None)
        accounting = Accounting(roles, planes)
        figures: dict[str, float | int | str] = {"devices": DEVICES, "replicas": REPLICAS,
                                                 "database": engine.dialect.name}
        size = functools.partial(db_bytes, engine, work / "controlplane")
        ramp = 20.0
        print(f"{DEVICES} devices coming up over {ramp:g} s, 30 s heartbeat, "
              f"{REPLICAS} replica(s) on {figures['database']}", flush=True)
        sim = simulate(broker.url, password, 30.0, ramp, ramp + 35 + HOLD_S)
        time.sleep(ramp + 35)  # up, plus one full heartbeat period to settle
        hold = measure("hold", accounting, probe, HOLD_S, size)
        sim.communicate(timeout=120)
        device_seconds = DEVICES * hold["hold_seconds"]
        figures |= hold
        figures["db_bytes_per_device_day"] = round(
            hold["hold_db_growth_bytes"] / device_seconds * 86400)

        if CEILING_S:
            print(f"ceiling: {DEVICES} devices at a 1 s heartbeat for {CEILING_S:g} s, "
                  f"{SIM_PROCS} simulator process(es)", flush=True)
            sim = simulate(broker.url, password, 1.0, 5.0, CEILING_WARMUP_S + CEILING_S + 2,
                           "--procs", str(SIM_PROCS), "--catch-up", str(SIM_CATCH_UP))
            time.sleep(CEILING_WARMUP_S)
            since = time.time()
            figures |= measure("ceiling", accounting, probe, CEILING_S, size)
            until = time.time()
            summary = json.loads((sim.communicate(timeout=120)[0] or "{}").strip().splitlines()[-1])
            figures |= sent_rate(summary, since, until) | lag_growth(probe.polls, since, until)
            figures["ceiling_asked_msgs_per_s"] = DEVICES
            for key in ("ceiling_sent_mean_msgs_per_s", "ceiling_sent_median_msgs_per_s",
                        "ceiling_sent_min_msgs_per_s", "ceiling_lag_growth_s_per_s"):
                print(f"  {key}: {figures[key]}", flush=True)
    finally:
        if probe is not None:
            probe.stop()
        if scraper is not None:
            scraper.stop()
        for plane in planes:
            plane.stop()
        broker.stop()
        if postgres is not None:
            postgres.stop()
    report(figures)


if __name__ == "__main__":
    main()
