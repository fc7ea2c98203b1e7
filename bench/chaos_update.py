"""Crash consistency at scale: 1,000 SIGKILLs at random points of the update pipeline.

Each device runs two models. Every trial publishes a new signed desired set
that changes both at once (new releases, or every fifth time a rollback of
both to their previous versions) on a real Mosquitto, lets a real agent
start working on it, SIGKILLs the agent at a random moment inside a chosen
phase of one of the two entries, taken in turn (just after the publish,
fit-checked, downloading, staged / health-checking, activated / cleaning
up), checks the disk, restarts the agent and waits until it settles by
itself. Invariants, per trial and per model name:

- right after the kill: the active version is the old or the new one, and
  its bytes match its sha256 (never neither, never a damaged one);
- after the restart, with no new input: the entry ends ``activated`` (all
  entries are valid), the new version is active and intact, and staging
  is empty.

To fit 1,000 restarts in a few minutes on 2 cores, three things differ from
``tests/test_agent_update_crash.py`` (which runs the real thing, 50 times):

- the agent runs in a process forked from this one (the real ``Agent``
  class: MQTT link, updater, event spool, model store), not a fresh
  ``slmfleet agent run``; that skips ~0.8 s of interpreter start and
  hardware probe per restart, which is not what is under test;
- the artifact is a 1 MiB file of random bytes, not the 93 MB GGUF (trials
  that kill during the download fetch a 3 MiB one at 16 MiB/s, so the kill
  lands mid-transfer and leaves a partial file to resume);
- the health check is a stand-in subprocess (``sh``: read the request,
  sleep 20 ms, pass) behind the same ``SubprocessHealthChecker``, since a
  random file cannot be loaded by llama.cpp.

Two devices run their trials side by side, each in a worker process of its
own. No process here starts a thread before it forks (the artifact server
runs in a child process, MQTT is driven by hand), so forking is safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from _common import report, scratch_broker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

import protocol as p  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.healthcheck import SubprocessHealthChecker  # noqa: E402
from agent.profiles import generic_profile  # noqa: E402
from agent.service import Agent  # noqa: E402
from agent.update.state import UpdateStateStore  # noqa: E402
from agent.update.stores import ModelStores  # noqa: E402
from controlplane.broker_auth import CONTROL_PLANE_USER  # noqa: E402
from tests.support.signer import TrustSimulator, capabilities  # noqa: E402
from tests.support.updates import seed_active, sign_set, variant_for, write_trust  # noqa: E402

TRIALS = int(os.environ.get("CHAOS_TRIALS", "1000"))
#: stop early (and say so) rather than run past this
TIME_BUDGET_S = 480.0
#: an update that has not settled after this long counts as a violation
SETTLE_TIMEOUT_S = 30.0
#: devices (each with its own worker process) running trials side by side
WORKERS = 2
FAST, SLOW = "model.bin", "slow.bin"
#: the two models each device runs; every set changes both
NAMES = ("chaos", "chaos-embed")
ARTIFACT_BYTES = 1 << 20
#: trials that kill during the download fetch this one, served at this rate
#: (in ~50 ms pieces), so the kill lands mid-transfer; the downloader writes
#: 1 MiB batches, so it must be a few MiB for a partial file to be left
SLOW_ARTIFACT_BYTES = 3 << 20
TRICKLE_BPS = 16 << 20
STAND_IN_HEALTH = [
    "sh", "-c", """cat >/dev/null; sleep 0.02; echo '{"passed": true, "reasons": []}'""",
]
ORDER = ["verified", "fit_checked", "downloading", "staged", "health_checked", "activated"]
#: phase -> (persisted state that starts it, longest random delay after it, s); an
#: entry is persisted fit-checked at once (the set's fit check runs before it is saved)
PHASES: dict[str, tuple[str | None, float]] = {
    "publish": (None, 0.03),
    "fit_checked": ("fit_checked", 0.003),
    "downloading": ("downloading", 0.25),
    "staged": ("staged", 0.05),
    "activated": ("activated", 0.02),
}
NO_DOWNLOAD = ("publish", "fit_checked", "staged", "activated")

SERVE = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.support.http_artifacts import ArtifactServer
server = ArtifactServer(sys.argv[2]).start()
server.set_fault(sys.argv[3], trickle_bps=float(sys.argv[4]))
print(server.base_url, flush=True)
sys.stdin.read()
server.close()
"""


class Publisher:
    """The control plane's MQTT client, driven by hand (no network thread)."""

    def __init__(self, host: str, port: int, password: str, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(CONTROL_PLANE_USER, password)
        self.client.connect(host, port, keepalive=600)
        deadline = time.monotonic() + 10
        while not self.client.is_connected():
            self.client.loop(0.05)
            if time.monotonic() > deadline:
                raise SystemExit("control-plane client could not connect")

    def publish(self, device_id: str, payload: bytes) -> None:
        info = self.client.publish(p.device_topic(device_id, p.TopicKind.DESIRED), payload,
                                   qos=1, retain=True)
        while not info.is_published():
            self.client.loop(0.01)


class Chaos:
    """One device, its disk, and the trials."""

    def __init__(self, work: Path, broker: Any, base_url: str, device_id: str) -> None:
        self.work, self.base_url, self.device_id = work, base_url, device_id
        self.artifact = base_dir(work) / FAST
        self.slow_artifact = base_dir(work) / SLOW
        self.sim = TrustSimulator()
        self.config = AgentConfig(
            device_id=device_id, broker_url=broker.url, password=broker.users[device_id],
            state_dir=work / "state", heartbeat_interval_s=60, reconnect_min_s=0.05,
            reconnect_max_s=0.2, log_level="WARNING", api_port=0,
        )
        write_trust(self.config.state_dir, self.sim)
        for name in NAMES:
            seed_active(self.config.models_path, name, "0.0.1", self.artifact)
        caps = capabilities()
        self.hardware = (caps, [], generic_profile(caps))
        self.stores = ModelStores(self.config.models_path)
        self.state = UpdateStateStore(self.config.update_state_path)
        self.publisher = Publisher(broker.host, broker.port, broker.users[CONTROL_PLANE_USER],
                                   f"cp-{device_id}")
        self.releases: dict[str, dict[str, Any]] = {}
        self.sequence = 0
        self.log = work / "agents.log"
        self.pid: int | None = None

    def warm_up(self) -> None:
        """Pay one-time costs here, once, instead of in every forked agent.

        A real agent imports httpx and cryptography, loads its CA bundle and
        builds its pydantic validators once in its life; forked from a cold
        parent, every child would pay for them again.
        """
        from agent.update.fetcher import default_ssl_context

        default_ssl_context()  # the CA bundle, loaded once for every child to inherit

        release = self.sim.release("warm", "0.0.0", variants={p.Tier.MICRO: variant_for(
            self.artifact, "model.bin")})
        self.sim.verify(self.sim.assign(self.device_id, release, p.Tier.MICRO),
                        device_id=self.device_id)

    # -- the agent ---------------------------------------------------------------

    def spawn(self) -> None:
        """Start an agent in a forked child; it becomes ``self.pid``."""
        pid = os.fork()
        if pid == 0:
            self._child()
        self.pid = pid

    def _child(self) -> NoReturn:
        try:
            logging.basicConfig(filename=self.log, level=logging.WARNING, force=True,
                                format="%(asctime)s %(process)d %(name)s: %(message)s")
            health = SubprocessHealthChecker(30, STAND_IN_HEALTH)
            asyncio.run(Agent(self.config, hardware=self.hardware, health=health).run())
        except BaseException:
            logging.exception("agent died")
        finally:
            os._exit(0)

    def kill(self) -> None:
        """SIGKILL the running agent and reap it."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None

    # -- observing the disk ----------------------------------------------------------

    def persisted(self, sequence: int, name: str) -> str:
        current = self.state.load().models.get(name)
        if current is None or current.sequence != sequence:
            return "before verified"
        return current.state.value

    def wait_state(self, sequence: int, at_least: str, name: str,
                   timeout: float = SETTLE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        want = ORDER.index(at_least)
        while True:
            state = self.persisted(sequence, name)
            if state in ORDER and ORDER.index(state) >= want:
                return
            if state in ("rejected", "failed", "rolled_back") or time.monotonic() > deadline:
                raise RuntimeError(f"sequence {sequence} of {name} stuck at {state}")
            time.sleep(0.002)

    def staging(self) -> list[str]:
        return sorted(e.name for _, store in self.stores.all()
                      for e in (store.root / "staging").iterdir())

    def installed(self) -> dict[str, list[str]]:
        return {name: store.installed() for name, store in self.stores.all()}

    # -- one trial ----------------------------------------------------------------------

    def assign(self, i: int, slow: str | None) -> tuple[int, dict[str, str], bool]:
        """Publish a set changing both names (``slow``'s artifact trickles); return its
        sequence, the new key by name and whether it rolls both back."""
        previous = {name: self.stores.store(name).previous() for name in NAMES}
        rollback = i % 5 == 4 and all(v is not None and v.key in self.releases
                                      for v in previous.values())
        keys: dict[str, str] = {}
        for name in NAMES:
            if rollback:
                keys[name] = previous[name].key  # type: ignore[union-attr]
                continue
            version = f"1.{i}.0"
            keys[name] = f"{name}@{version}-micro"
            variant = (variant_for(self.slow_artifact, SLOW) if slow == name
                       else variant_for(self.artifact, FAST))
            self.releases[keys[name]] = self.sim.release(name, version,
                                                         variants={p.Tier.MICRO: variant})
        self.sequence += 1
        self.sim.now = time.time()
        payload = sign_set(self.sim, self.device_id,
                           {name: self.releases[keys[name]] for name in NAMES},
                           sequence=self.sequence, artifact_url_base=self.base_url,
                           ids={name: f"{name}-{self.sequence}" for name in NAMES})
        self.publisher.publish(self.device_id, payload)
        return self.sequence, keys, rollback

    def trial(self, i: int, rng: random.Random) -> dict[str, Any]:
        """Run trial ``i`` against the running agent; leave the restarted one running."""
        old = {name: self.stores.store(name).active().key for name in NAMES}  # type: ignore
        will_rollback = i % 5 == 4
        choices = NO_DOWNLOAD if will_rollback else tuple(PHASES)
        # Every fifth trial is a rollback: shift by i // 5 so that the others
        # still come round to every phase.
        phase = choices[(i + i // 5) % len(choices)]
        # Each entry's phases in turn: the one that runs first, then the other.
        target = NAMES[(i // len(choices)) % len(NAMES)]
        sequence, new, rollback = self.assign(i, slow=target if phase == "downloading" else None)
        start, longest = PHASES[phase]
        if start is not None:
            self.wait_state(sequence, start, target)
        time.sleep(rng.uniform(0, longest))
        self.kill()

        result: dict[str, Any] = {"phase": phase, "target": target,
                                  "killed_at": self.persisted(sequence, target),
                                  "rollback": rollback, "problems": []}
        partial = self.stores.store(target).staging_path(new[target])
        result["partial_left"] = partial.is_file() and partial.stat().st_size > 0
        for name in NAMES:
            store = self.stores.store(name)
            active = store.active()
            if active is None or active.key not in (old[name], new[name]) or not (
                store.verify_hash(active.key)
            ):
                result["problems"].append(f"after kill: {name} active {active and active.key!r}")

        self.spawn()
        try:
            for name in NAMES:
                self.wait_state(sequence, "activated", name)
            # gc of the oldest version runs right after the activation is recorded;
            # it fsyncs, and fsync on a busy shared disk can stall for seconds.
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            # Versions first: gc renames one into staging/ in one step, so
            # reading staging first could miss it in both places.
            while any(len(keys) > self.config.keep_versions
                      for keys in self.installed().values()) or self.staging():
                if time.monotonic() > deadline:
                    result["problems"].append(
                        f"not cleaned up after {SETTLE_TIMEOUT_S:g} s: "
                        f"{self.installed()} installed, staging {self.staging()}"
                    )
                    break
                time.sleep(0.002)
        except RuntimeError as exc:
            result["problems"].append(str(exc))
        for name in NAMES:
            store = self.stores.store(name)
            active = store.active()
            if active is None or active.key != new[name] or not store.verify_hash(new[name]):
                result["problems"].append(
                    f"after restart: {name} active {active and active.key!r}")
        if self.staging():
            result["problems"].append(f"staging not empty: {self.staging()}")
        self.publisher.client.loop(0)  # keepalive
        return result


def base_dir(work: Path) -> Path:
    """Where the artifacts live (shared by the workers)."""
    return work.parent / "artifacts"


def run_worker(index: int, trials: int, broker: Any, base_url: str, work: Path) -> NoReturn:
    """One device's trials, in a forked worker; results go to ``work/results.json``."""
    status = 1
    try:
        chaos = Chaos(work, broker, base_url, f"chaos-{index}")
        chaos.warm_up()
        rng = random.Random(20261123 + index)
        results: list[dict[str, Any]] = []
        started = time.monotonic()
        chaos.spawn()
        try:
            for i in range(trials):
                if time.monotonic() - started > TIME_BUDGET_S:
                    print(f"[{index}] time budget spent; stopping early", flush=True)
                    break
                t0 = time.monotonic()
                result = chaos.trial(i, rng)
                result["s"] = time.monotonic() - t0
                results.append(result)
                if result["problems"]:
                    print(f"[{index}] trial {i}: VIOLATION {result}", flush=True)
                if (i + 1) % 100 == 0:
                    bad = sum(1 for r in results if r["problems"])
                    print(f"[{index}] {i + 1} trials in {time.monotonic() - started:.0f} s, "
                          f"{bad} violations", flush=True)
        finally:
            chaos.kill()
        (work / "results.json").write_text(json.dumps(results))
        status = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(status)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="slmfleet-chaos-"))
    artifacts = work / "artifacts"
    artifacts.mkdir()
    (artifacts / FAST).write_bytes(secrets.token_bytes(ARTIFACT_BYTES))
    (artifacts / SLOW).write_bytes(secrets.token_bytes(SLOW_ARTIFACT_BYTES))
    devices = [f"chaos-{i}" for i in range(WORKERS)]
    broker = scratch_broker(devices)
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(ROOT), str(artifacts),
                               SLOW, str(TRICKLE_BPS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    base_url = server.stdout.readline().strip()
    print(f"{TRIALS} trials on {WORKERS} devices side by side, each set changing "
          f"{len(NAMES)} models; artifact "
          f"{ARTIFACT_BYTES >> 20} MiB of random bytes ({SLOW_ARTIFACT_BYTES >> 20} MiB, "
          f"trickled, when the kill targets the download); stand-in health check; "
          f"work dir {work}", flush=True)
    started = time.monotonic()
    workers = {}
    try:
        for index in range(WORKERS):
            share = TRIALS // WORKERS + (1 if index < TRIALS % WORKERS else 0)
            device_work = work / devices[index]
            pid = os.fork()
            if pid == 0:
                run_worker(index, share, broker, base_url, device_work)
            workers[pid] = device_work
        failed = [pid for pid in workers if os.waitpid(pid, 0)[1] != 0]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
        broker.stop()
    if failed:
        raise SystemExit(f"{len(failed)} worker(s) crashed; see above")

    results = [r for d in workers.values() for r in json.loads((d / "results.json").read_text())]
    killed_at = Counter(f'{r["target"]}:{r["killed_at"]}' for r in results)
    phases = Counter(r["phase"] for r in results)
    violations = sum(1 for r in results if r["problems"])
    print(f"kills by phase: {dict(phases)}")
    print(f"kills by persisted state: {dict(killed_at)}")
    print(f"violations: {violations} of {len(results)}")
    report({
        "trials": len(results),
        "violations": violations,
        "rollback_trials": sum(1 for r in results if r["rollback"]),
        "partial_download_left_at_kill": sum(1 for r in results if r["partial_left"]),
        "kills_by_state": json.dumps(dict(killed_at), sort_keys=True),
        "trial_median_s": round(statistics.median(r["s"] for r in results), 3),
        "total_s": round(time.monotonic() - started, 1),
        "artifact_mib": ARTIFACT_BYTES >> 20,
        "models_per_set": len(NAMES),
    })


if __name__ == "__main__":
    main()
