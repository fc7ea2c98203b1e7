"""The window scenario of bench/fleet.py: a rollout whose activation waits for a window.

    FLEET_SCENARIO=window .venv/bin/python bench/fleet.py   # FLEET_DEVICES=N

A private Mosquitto (ACLs on), a control plane on SQLite in this process
(real Ed25519 release and director keys, the engine ticked every 0.5 s),
and N ``fleetsim`` devices reading signed sets in a process of their own,
their clock set so that the rollout's activation window (``0 2 * * *``,
UTC, one hour) opens :data:`LEAD_S` seconds after they start;
:data:`LOCKED` of them hold an app's update lock for a while. One rollout,
one stage of 100 %, no bake. Figures:

- ``staged_before_opening``: devices the engine saw waiting (staged,
  deferred) a moment before the opening, and ``activated_before_opening``
  (must be 0);
- ``deferred_by_window``, ``deferred_by_lock``: devices that reported
  ``deferred`` for the closed window, and for an app's lock (``locks_held``
  hold one; the last is released ``last_lock_release_after_opening_s`` after
  the opening, which bounds the time to 100 % from below);
- ``opening_to_50pct_s``, ``opening_to_90pct_s``, ``opening_to_100pct_s``:
  from the window's opening until that share of the devices is ``succeeded``
  in the rollout, and ``opening_to_completed_s`` until the engine completed it.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from _common import report, scratch_broker
from rollout import SIMULATOR_SETUP, count, release_spec, wait  # its set-up
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.broker_auth import CONTROL_PLANE_USER  # noqa: E402
from controlplane.client import publish_release  # noqa: E402
from controlplane.db.models import Device  # noqa: E402
from controlplane.devfleet.fleet import ensure_dev_keys  # noqa: E402
from controlplane.service import ControlPlane  # noqa: E402
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN  # noqa: E402
from tests.support.controlplane import cp_settings  # noqa: E402

#: the window opens this long after the simulated devices start: long enough for
#: every device to say hello, get its assignment and stage it (FLEET_WINDOW_LEAD_S)
LEAD_S = float(os.environ.get("FLEET_WINDOW_LEAD_S", "150"))
OPENS = datetime(2026, 12, 7, 2, 0, tzinfo=UTC)
CLOCK_START = (OPENS - timedelta(seconds=LEAD_S)).isoformat()
WINDOW = {"cron": "0 2 * * *", "duration_s": 3600, "tz": "UTC"}
#: share of devices holding an update lock, and for how long (+-50 %) from their start
LOCKED, LOCK_HOLD_S = 0.05, LEAD_S + 10.0
TICK_S = 0.5

#: prints "opens <wall time of the opening> <locks> <last release after it, s>", then
#: "held <json counts>" every 2 s until its stdin closes
SIMULATOR = SIMULATOR_SETUP + """
import json, threading
scenario = Scenario(devices=n, id_prefix=prefix, heartbeat_s=60.0, ramp_s=min(30.0, n / 330),
                    labels={"bench": prefix}, sets=True, clock_start=sys.argv[9],
                    locks={"fraction": float(sys.argv[10]), "hold_s": float(sys.argv[11])},
                    releases={"bench@2.0.0": {"download_bytes_per_s": 1e12,
                                              "health_check_s": 3.0, "jitter": 1.0}})
sim = FleetSimulator(scenario, sys.argv[2], sys.argv[3], sys.argv[4], trust=trust,
                     profiles=load_profiles(default_profiles_dir()))
sim.start()
lead = float(sys.argv[12])
untils = [d.lock.until for d in sim.devices if d.lock is not None]
opens = sim.clock() + lead
print("opens", time.time() + lead, len(untils), max(untils, default=opens) - opens, flush=True)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
while not done.wait(2):
    print("held", json.dumps(dict(sim.stats.assignments)), flush=True)
sim.stop()
"""


def run(n: int) -> dict[str, float | int]:
    """The window scenario for ``n`` devices; its figures."""
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-window-"))
    keys = ensure_dev_keys(work / "keys")
    broker = scratch_broker([])
    password = broker.users[CONTROL_PLANE_USER]
    prefix = f"win{n}"
    cp = ControlPlane(cp_settings(
        work / "cp", broker, (CONTROL_PLANE_USER, password), ingest_flush_ms=200,
        release_keys_file=keys.release_keys_file, director_keys_file=keys.director_keys_file,
        director_key_files=[keys.director_key],
    ), rollout_tick_s=3600.0).start()
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=60)
    sim = subprocess.Popen(
        [sys.executable, "-c", SIMULATOR, str(ROOT), broker.url, CONTROL_PLANE_USER, password,
         str(n), prefix, str(keys.release_keys_file), str(keys.director_keys_file),
         CLOCK_START, str(LOCKED), str(LOCK_HOLD_S), str(LEAD_S)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sim.stdin is not None and sim.stdout is not None
    stop = threading.Event()

    def ticker() -> None:  # the engine's ticks, as bench/rollout.py explains
        assert cp.rollouts is not None
        while not stop.wait(TICK_S):
            cp.rollouts.tick()

    threading.Thread(target=ticker, name="bench-ticks", daemon=True).start()
    try:
        publish_release(release_spec(work), [keys.release_key], cp.api_url, ADMIN_TOKEN)
        line = sim.stdout.readline().split()
        assert line[0] == "opens", line
        opens, locked, last_release = float(line[1]), int(line[2]), float(line[3])
        wait("every hello", lambda: count(cp, select(func.count()).select_from(Device).where(
            Device.tier.is_not(None), Device.id.like(f"{prefix}-%"))) >= n, poll=0.5)
        r = api.post("/v1/rollouts", json={
            "model": "bench", "version": "2.0.0", "target": {"labels": {"bench": prefix}},
            "stages": [{"percent": 100, "bake_s": 0}], "activation_window": WINDOW})
        assert r.status_code == 201, r.text
        path = f"/v1/rollouts/{r.json()['id']}"
        if time.time() > opens - 3:
            raise SystemExit("the window opened before the fleet was staged: raise LEAD_S")
        time.sleep(opens - 2 - time.time())
        before = api.get(path).json()["counts"]
        print(f"a moment before the opening: {before}", flush=True)
        reached: dict[int, float] = {}
        deadline = opens + 300
        while len(reached) < 3 and time.time() < deadline:
            succeeded = api.get(path).json()["counts"].get("succeeded", 0)
            for pct in (50, 90, 100):
                if pct not in reached and succeeded >= n * pct / 100:
                    reached[pct] = time.time()
            time.sleep(0.25)
        completed = wait("completed", lambda: api.get(path).json()["state"] == "completed")
        held: dict[str, int] = {}
        while held.get("activated", 0) < n and time.time() < deadline:
            line = sim.stdout.readline().split(maxsplit=1)  # every 2 s
            if line and line[0] == "held":
                held = json.loads(line[1])
    finally:
        stop.set()
        sim.stdin.close()
        sim.wait(timeout=60)
        api.close()
        cp.stop()
        broker.stop()
    return {
        "devices": n,
        "staged_before_opening": before.get("waiting", 0),
        "activated_before_opening": before.get("succeeded", 0),
        "deferred_by_window": held.get("held_deferred", 0),
        "deferred_by_lock": held.get("held_locked", 0),
        "locks_held": locked,
        "last_lock_release_after_opening_s": round(last_release, 2),
        **{f"opening_to_{pct}pct_s": round(at - opens, 2) for pct, at in reached.items()},
        "opening_to_completed_s": round(completed - opens, 2),
    }


def main(n: int) -> None:
    """Run the window scenario for ``n`` devices and report its figures."""
    report(run(n))
