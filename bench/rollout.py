"""Rollout to a simulated fleet: creation -> desired state delivered, and tick overhead.

    .venv/bin/python bench/rollout.py              # ROLLOUT_SIZES=1000,10000

For each fleet size N: a private Mosquitto (ACLs on), a control plane on
SQLite in this process (API, ingest, director, publisher, rollout engine
ticked every 0.5 s) with real Ed25519 release and director keys, and a
release with a variant per tier. N devices from ``fleetsim``
run in a process of their own, sharing a few MQTT connections, and verify
every assignment they get as a real agent does (both signatures, device
id, expiry, sequence, tier fit). Once every device has said hello, one
rollout is created through the API: one stage of 100 %, zero bake. Figures,
each from the ``POST /v1/rollouts`` call:

- ``signed``: every device has a signed assignment stored;
- ``published``: the broker acknowledged every device's retained ``desired``;
- ``delivered``: every simulated device received and verified its assignment;
- ``completed``: every device reported ``activated`` (the simulated install
  takes 0-6 s) and the engine finished.

Engine overhead: the wall time of :meth:`RolloutEngine.tick` with no live
rollout (median), the longest tick during the rollout (the one that joins
and assigns all N devices), and the median tick over the completed rollout
of N devices (what every tick pays while the rollout stays live).

``ROLLOUT_PROFILE=DIR``: py-spy samples this process (the control plane:
engine, director, publisher, ingest receiver, API) from just before the
``POST`` until every ``desired`` is acknowledged, into ``DIR/rollout-N.txt``
(collapsed stacks), and the figures get the CPU seconds per category
(``bench/_profile.py``).

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from _common import report, scratch_broker
from _profile import breakdown
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.broker_auth import CONTROL_PLANE_USER  # noqa: E402
from controlplane.client import publish_release  # noqa: E402
from controlplane.db.models import AssignmentRecord, Device, DeviceSequence  # noqa: E402
from controlplane.devfleet.fleet import DevKeys, ensure_dev_keys  # noqa: E402
from controlplane.devfleet.mosquitto import MosquittoBroker  # noqa: E402
from controlplane.service import ControlPlane  # noqa: E402
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN  # noqa: E402
from tests.support.controlplane import cp_settings  # noqa: E402

SIZES = [int(n) for n in os.environ.get("ROLLOUT_SIZES", "1000,10000").split(",")]
TICK_S = 0.5
#: the scheduler's own interval: out of the way of the benchmark's ticks
SCHEDULED_TICK_S = 3600.0
#: ticks over the completed rollout that the overhead figure is the median of
TIMED_TICKS = 5
#: upper bound on any one wait, so the benchmark always ends
WAIT_S = 300.0
PROFILE_DIR = os.environ.get("ROLLOUT_PROFILE")
PROFILE_RATE = 100

#: a simulator process's start (shared with bench/_fleet_window.py): the imports,
#: ``n`` and ``prefix`` (argv 5 and 6) and ``trust``, the pinned key lists (argv 7 and 8)
SIMULATOR_SETUP = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from agent.profiles import default_profiles_dir, load_profiles
from agent.trust import TrustRoots
from fleetsim import FleetSimulator, Scenario
from protocol import verify_pinned_key_list

n, prefix = int(sys.argv[5]), sys.argv[6]
trust = TrustRoots(release=verify_pinned_key_list(Path(sys.argv[7]).read_bytes(), "release"),
                   director=verify_pinned_key_list(Path(sys.argv[8]).read_bytes(), "director"))
"""
#: the simulator process: prints "up", then "delivered <wall time>" once every
#: device accepted an assignment (or "gave_up" when WAIT_S passes), then exits on stdin EOF
SIMULATOR = SIMULATOR_SETUP + """
# Hellos spread over up to 30 s, and installs over 0-6 s after delivery (no download
# time): a fleet of 10,000 reporting all at once would only measure the ingest.
scenario = Scenario(devices=n, id_prefix=prefix, heartbeat_s=60.0, ramp_s=min(30.0, n / 330),
                    labels={"bench": prefix},
                    releases={"bench@2.0.0": {"download_bytes_per_s": 1e12, "health_check_s": 3.0,
                                              "jitter": 1.0}})
sim = FleetSimulator(scenario, sys.argv[2], sys.argv[3], sys.argv[4], trust=trust,
                     profiles=load_profiles(default_profiles_dir()))
sim.start()
print("up", flush=True)
deadline = time.monotonic() + float(sys.argv[9])
while time.monotonic() < deadline:
    if sim.stats.assignments["accepted"] >= n:
        print("delivered", time.time(), flush=True)
        break
    time.sleep(0.02)
else:
    print("gave_up", dict(sim.stats.assignments), flush=True)
sys.stdin.read()
sim.stop()
"""


def release_spec(work: Path) -> Path:
    """A release with a variant per tier; the simulated devices never download it."""
    artifact = work / "bench.gguf"
    artifact.write_bytes(b"GGUF" + os.urandom(4096))

    def variant() -> dict[str, Any]:
        return {"file": str(artifact), "format": "gguf", "quantization": "Q4_1",
                "parameters": 135_000_000, "context_length": 2048,
                "health_check": {"max_ttft_ms": 30000, "min_tokens_per_s": 1,
                                 "golden_prompts": [{"prompt": "2+2?", "expected": ["4"]}]}}

    path = work / "release.yaml"
    path.write_text(yaml.safe_dump({"name": "bench", "version": "2.0.0", "variants": {
        "micro": variant(), "small": variant(), "medium": variant()}}))
    return path


def profile(n: int) -> subprocess.Popen[bytes]:
    """py-spy on this process until SIGINT, into ``PROFILE_DIR/rollout-N.txt``."""
    Path(PROFILE_DIR or "").mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(os.getpid()),
         "--nonblocking", "--rate", str(PROFILE_RATE), "--format", "raw",
         "-o", str(Path(PROFILE_DIR or "") / f"rollout-{n}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    return spy


def wait(what: str, predicate: Callable[[], bool], poll: float = 0.25) -> float:
    """Poll until ``predicate``; return the wall time it first held. Bounded by WAIT_S.

    Not faster: the polls run in the control plane's process, and a tight
    loop of counting queries takes the interpreter lock from the publisher
    it is timing. So each figure is late by up to ``poll`` seconds.
    """
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {WAIT_S:g} s waiting for {what}")
        time.sleep(poll)
    return time.time()


def count(cp: ControlPlane, query: Any) -> int:
    assert cp.engine is not None
    with cp.engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def one_size(n: int, broker: MosquittoBroker, keys: DevKeys, work: Path) -> dict[str, float]:
    """Roll one release out to ``n`` simulated devices; the figures for that size."""
    password = broker.users[CONTROL_PLANE_USER]
    prefix = f"ro{n}"
    cp = ControlPlane(cp_settings(
        work / f"cp-{n}", broker, (CONTROL_PLANE_USER, password), ingest_flush_ms=200,
        release_keys_file=keys.release_keys_file, director_keys_file=keys.director_keys_file,
        director_key_files=[keys.director_key],
    ), rollout_tick_s=SCHEDULED_TICK_S).start()
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=60)
    sim = subprocess.Popen(
        [sys.executable, "-c", SIMULATOR, str(ROOT), broker.url, CONTROL_PLANE_USER, password,
         str(n), prefix, str(keys.release_keys_file), str(keys.director_keys_file),
         str(WAIT_S)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sim.stdin is not None and sim.stdout is not None
    figures: dict[str, float] = {}
    # Ticks from here, every TICK_S, in place of the scheduler's (which runs
    # once at start, then hourly): with thousands of devices reporting at
    # once, SQLite's write lock is contended enough that APScheduler's
    # SQLAlchemy job store can fail an update, which stops the scheduler's
    # thread; the figures should be the engine's.
    stop = threading.Event()
    #: (wall time the tick started, its duration in s), for the overhead figures
    timed: list[tuple[float, float]] = []

    def ticker() -> None:
        assert cp.rollouts is not None
        while not stop.wait(TICK_S):  # bounded: stopped in the finally below
            started, t = time.time(), time.perf_counter()
            cp.rollouts.tick()
            timed.append((started, time.perf_counter() - t))

    def tick_ms(since: float, until: float, pick: Callable[[list[float]], float]) -> float:
        durations = [d for at, d in timed if since <= at < until]
        return round(1000 * pick(durations), 1) if durations else -1.0

    ticks = threading.Thread(target=ticker, name="bench-ticks", daemon=True)
    ticks.start()
    try:
        publish_release(release_spec(work), [keys.release_key], cp.api_url, ADMIN_TOKEN)
        assert sim.stdout.readline().strip() == "up"
        print(f"N={n}: waiting for every device's hello", flush=True)
        wait("every hello", lambda: count(cp, select(func.count()).select_from(Device).where(
            Device.tier.is_not(None), Device.id.like(f"{prefix}-%"))) >= n, poll=0.2)
        time.sleep(2.0)  # let the ingest settle: the clock below is the rollout's

        spy = profile(n) if PROFILE_DIR else None
        t0 = time.time()
        r = api.post("/v1/rollouts", json={
            "model": "bench", "version": "2.0.0", "target": {"labels": {"bench": prefix}},
            "stages": [{"percent": 100, "bake_s": 0}]})
        assert r.status_code == 201, r.text
        rollout_id = r.json()["id"]
        signed = wait("signed", lambda: count(cp, select(func.count()).select_from(
            AssignmentRecord).where(AssignmentRecord.rollout_id == rollout_id)) >= n)
        published = wait("published", lambda: count(cp, select(func.count()).select_from(
            DeviceSequence).where(DeviceSequence.published_sequence > 0,
                                  DeviceSequence.published_sequence
                                  == DeviceSequence.last_sequence)) >= n)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            spy.wait(60)
            figures |= {f"n{n}_profile_cpu_s_{k.replace(' ', '_')}": v for k, v in breakdown(
                Path(PROFILE_DIR or "") / f"rollout-{n}.txt", PROFILE_RATE).items()}
        print(f"N={n}: signed {signed - t0:.2f} s, published {published - t0:.2f} s", flush=True)
        line = sim.stdout.readline().split()
        if not line or line[0] != "delivered":
            raise SystemExit(f"the simulator did not get every assignment: {line}")
        delivered = float(line[1])
        completed = wait("completed", lambda: api.get(
            f"/v1/rollouts/{rollout_id}").json()["state"] == "completed")
        detail = api.get(f"/v1/rollouts/{rollout_id}").json()
        if detail["counts"].get("succeeded") != n:
            raise SystemExit(f"not every device succeeded: {detail['counts']}")
        time.sleep(TIMED_TICKS * TICK_S + 1)  # a few ticks over the completed rollout
        now = time.time()
        figures |= {
            f"n{n}_signed_s": round(signed - t0, 2),
            f"n{n}_published_s": round(published - t0, 2),
            f"n{n}_delivered_s": round(delivered - t0, 2),
            f"n{n}_completed_s": round(completed - t0, 2),
            # Ticks with no live rollout, the longest tick of the rollout (it
            # joins and assigns all N devices), and ticks over the completed one.
            f"n{n}_tick_idle_ms": tick_ms(0, t0, statistics.median),
            f"n{n}_tick_max_during_rollout_ms": tick_ms(t0, completed, max),
            f"n{n}_tick_completed_rollout_ms": tick_ms(completed + 1, now, statistics.median),
        }
        print(f"N={n}: {json.dumps(figures)}", flush=True)
    finally:
        stop.set()
        ticks.join(30)
        sim.stdin.close()
        sim.wait(timeout=60)
        api.close()
        cp.stop()
    return figures


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-rollout-"))
    keys = ensure_dev_keys(work / "keys")
    broker = scratch_broker([])
    figures: dict[str, float | int | str] = {"tick_interval_s": TICK_S}
    try:
        for n in SIZES:
            figures |= one_size(n, broker, keys, work)
    finally:
        broker.stop()
    biggest = max(SIZES)
    figures["target_published_s"] = 10.0
    figures["target_met"] = str(figures.get(f"n{biggest}_published_s", 1e9) <= 10.0).lower()
    report(figures)


if __name__ == "__main__":
    main()
