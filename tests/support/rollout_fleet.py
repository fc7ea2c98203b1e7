"""Honest simulated devices for rollout tests.

Each :class:`SimDevice` is a real MQTT client with its own broker
credentials (ACLs on), speaking the real protocol: a retained ``hello`` and
``state``, heartbeats with per-version inference stats, and, for every
``desired`` payload, the checks an agent makes (:func:`protocol.verify_assignment`
with the pinned keys and the highest sequence it accepted) followed by the
events an agent reports. What a version *does* on the device -- pass or fail
its health check, how fast it decodes -- comes from a :class:`Behaviour`
the test chooses, in place of running a real model. Every payload a device
received is kept, so a test can prove which devices never saw a release.

A device made with ``sets=True`` speaks as an agent that runs a set of
models: ``slmfleet.hello/2`` listing each active model and its update,
``slmfleet.telemetry/2``, and every ``desired`` payload checked with
:func:`protocol.verify_desired`; each entry whose assignment id is new is
installed on its own, and a name the document leaves out is unloaded.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

import protocol as p
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support.controlplane import wait_until
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator

#: RAM each simulated tier reports, enough for the test variants of that tier
TIER_RAM = {"micro": 4 << 30, "small": 16 << 30, "medium": 64 << 30}
SHA = "cd" * 32


@dataclass(frozen=True)
class Behaviour:
    """How a version runs on the simulated hardware."""

    healthy: bool = True
    tokens_per_s: float = 80.0
    latency_p95_ms: float = 400.0
    errors_per_10: int = 0
    #: refuse the update with this code, as an agent's fit check rejects one
    refuses: p.EventCode | None = None


@dataclass
class SimDevice:
    """One simulated device; thread-safe, driven by paho's network thread."""

    broker: MosquittoBroker
    device_id: str
    tier: str
    trust: TrustSimulator
    behaviours: dict[str, Behaviour]
    labels: dict[str, str] = field(default_factory=dict)
    active: tuple[str, str] | None = None
    #: speak hello/2 and read set documents
    sets: bool = False
    #: sets: every active model, name -> version
    models: dict[str, str] = field(default_factory=dict)
    #: what it accepted to install: VerifiedAssignment (old form) or VerifiedEntry (sets)
    received: list[Any] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    #: sets: every document accepted, in order
    documents: list[p.VerifiedDesired] = field(default_factory=list)
    #: broker password already issued (say, through the control plane's API);
    #: None: provision one on the broker directly
    password: str | None = None

    def __post_init__(self) -> None:
        if self.password is None:
            self.password = provision_device(self.broker, self.device_id)
        self._lock = threading.Lock()
        self._seq = 0
        self._tele_seq = 0
        self._highest = 0
        self._accepted: bytes | None = None
        self._update: p.UpdateStatus | None = None
        #: sets: each model's latest update, by name
        self._updates: dict[str, p.UpdateStatus] = {}
        self.client: mqtt.Client | None = None
        if self.sets and self.active is not None:
            self.models[self.active[0]] = self.active[1]

    # -- connection --------------------------------------------------------------

    def connect(self) -> SimDevice:
        """Connect, announce ourselves (retained hello + online) and listen to ``desired``."""
        url = urlsplit(self.broker.url)
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"{self.device_id}-{secrets.token_hex(3)}",
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(self.device_id, self.password)
        client.will_set(p.device_topic(self.device_id, p.TopicKind.STATE),
                        p.encode(p.State(device_id=self.device_id, state=p.DeviceState.OFFLINE,
                                         ts=time.time())), qos=1, retain=True)
        connected = threading.Event()
        client.on_connect = lambda *_a, **_k: connected.set()
        client.on_message = self._on_message
        client.connect(url.hostname or "127.0.0.1", url.port or 1883)
        client.loop_start()
        assert connected.wait(5), f"{self.device_id}: no CONNACK"
        self.client = client
        self._say(p.TopicKind.STATE, p.State(device_id=self.device_id,
                                             state=p.DeviceState.ONLINE, ts=time.time()),
                  retain=True)
        self._hello()
        client.subscribe(p.device_topic(self.device_id, p.TopicKind.DESIRED), qos=1)
        return self

    def disconnect(self, *, clean: bool = True) -> None:
        """Go away: publish ``offline`` first (as the agent's shutdown does)."""
        client, self.client = self.client, None
        if client is None:
            return
        if clean:
            info = client.publish(
                p.device_topic(self.device_id, p.TopicKind.STATE),
                p.encode(p.State(device_id=self.device_id, state=p.DeviceState.OFFLINE,
                                 ts=time.time())), qos=1, retain=True)
            info.wait_for_publish(5)
        client.disconnect()
        client.loop_stop()

    def _say(self, kind: p.TopicKind, message: object, *, retain: bool = False) -> None:
        client = self.client
        if client is not None:
            client.publish(p.device_topic(self.device_id, kind), p.encode(message),  # type: ignore[arg-type]
                           qos=1, retain=retain)

    def _hello(self) -> None:
        tier = p.Tier(self.tier)
        active = None
        if self.active is not None and not self.sets:
            name, version = self.active
            active = p.ActiveModel(name=name, version=version, tier=tier, sha256=SHA)
        form: dict[str, Any] = {"active_model": active}
        if self.sets:
            form = {
                "schema": p.HELLO_SCHEMA_SETS,
                "models": [p.ActiveModel(name=n, version=v, tier=tier, sha256=SHA)
                           for n, v in sorted(self.models.items())],
                "updates": [self._updates[n] for n in sorted(self._updates)],
            }
        self._say(p.TopicKind.HELLO, p.Hello(
            device_id=self.device_id, ts=time.time(), agent_version="sim-1",
            capabilities=p.Capabilities(
                cpu=p.CpuInfo(model="sim", arch="aarch64", cores=4, threads=4),
                ram_bytes=TIER_RAM[self.tier], disk_free_bytes=64 << 30,
                os=p.OsInfo(system="Linux", release="6.1"),
            ),
            profile=f"sim-{self.tier}", tier=tier,
            runtimes=[p.Runtime(name="llama.cpp", version="0.3.2")],
            update=self._update, labels=self.labels, simulated=True, **form,
        ), retain=True)

    # -- the update pipeline, simulated ---------------------------------------------

    def _event(self, type_: str, assignment_id: str, reason: str | None = None,
               code: p.EventCode | None = None) -> None:
        self._seq += 1
        self._say(p.TopicKind.EVENTS, p.Event(
            device_id=self.device_id, ts=time.time(), seq=self._seq, type=p.EventType(type_),
            assignment_id=assignment_id, code=code, reason=reason))

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        with self._lock:
            if not payload or payload == self._accepted:
                return
            if self.sets:
                self._on_set(payload)
                return
            verified = self._verify(p.verify_assignment, payload)
            if verified is None:
                return
            a = verified.assignment
            self._highest, self._accepted = a.sequence, payload
            if self._update is not None and self._update.assignment_id == a.assignment_id:
                return  # a re-sign of what we run: nothing to do
            self.received.append(verified)
            self._install(None, a.assignment_id, a.sequence, verified.manifest)
            self._hello()

    def _verify(self, check: Callable[..., Any], payload: bytes) -> Any:
        """``check`` (an agent's acceptance check) with the pinned keys; None when refused."""
        try:
            return check(
                payload, device_id=self.device_id, release_keys=self.trust.release_keys,
                director_keys=self.trust.director_keys, now=time.time(),
                highest_sequence=self._highest, device_tier=p.Tier(self.tier),
            )
        except p.ProtocolError as exc:
            self.rejected.append(f"{exc.reason}: {exc}")
            return None

    def _on_set(self, payload: bytes) -> None:
        """A desired payload, read as an agent that runs sets does."""
        desired: p.VerifiedDesired | None = self._verify(p.verify_desired, payload)
        if desired is None:
            return
        self._highest, self._accepted = desired.sequence, payload
        self.documents.append(desired)
        for name, refused in desired.refused.items():
            self.rejected.append(f"{name}: {refused.error.reason}: {refused.error}")
        for name in set(self.models) - set(desired.entries):
            # Left out of the set: unload it (an agent keeps the files for rollback).
            del self.models[name]
        for name, entry in desired.entries.items():
            update = self._updates.get(name)
            if update is not None and update.assignment_id == entry.assignment_id:
                continue  # a refresh of what it runs, or another model's change
            self.received.append(entry)
            self._install(name, entry.assignment_id, desired.sequence, entry.manifest)
        self._update = p.UpdateStatus(assignment_id=f"doc-{desired.sequence}",
                                      sequence=desired.sequence, state=p.UpdateState.ACTIVATED,
                                      ts=time.time())
        self._hello()

    def _running(self, name: str) -> str | None:
        if self.sets:
            return self.models.get(name)
        return self.active[1] if self.active and self.active[0] == name else None

    def _install(self, name: str | None, aid: str, sequence: int,
                 manifest: p.ReleaseManifest) -> None:
        """Install one release as ``name`` (None: the old form's one model)."""
        behaviour = self.behaviours.get(manifest.version, Behaviour())
        if behaviour.refuses is not None:
            self._event("received", aid)
            self._event("verified", aid)
            reason = f"{behaviour.refuses.value}: simulated"
            self._event("rejected", aid, reason, behaviour.refuses)
            self._record(name, p.UpdateStatus(
                model=name, assignment_id=aid, sequence=sequence, ref=manifest.ref,
                state=p.UpdateState.REJECTED, reason=reason, ts=time.time()))
            return
        for step in ("received", "verified", "fit_checked", "downloading", "staged"):
            self._event(step, aid)
        if self._running(manifest.name) == manifest.version:
            state, reason = p.UpdateState.ACTIVATED, None
        elif behaviour.healthy:
            self._event("health_passed", aid)
            state, reason = p.UpdateState.ACTIVATED, None
        else:
            reason = 'prompt 1: answer "L\'Étoile" contains none of [\'paris\']'
            self._event("health_failed", aid, reason, p.EventCode.HEALTH_FAILED)
            state, reason = p.UpdateState.FAILED, f"health_failed: {reason}"
        if state is p.UpdateState.ACTIVATED:
            if self.sets:
                self.models[manifest.name] = manifest.version
            else:
                self.active = (manifest.name, manifest.version)
            self._event("activated", aid)
        else:
            self._event("failed", aid, reason, p.EventCode.HEALTH_FAILED)
        self._record(name, p.UpdateStatus(
            model=name, assignment_id=aid, sequence=sequence, ref=manifest.ref, state=state,
            reason=reason, ts=time.time()))

    def _record(self, name: str | None, status: p.UpdateStatus) -> None:
        if name is None:
            self._update = status
        else:
            self._updates[name] = status

    # -- heartbeats ------------------------------------------------------------------

    def heartbeat(self) -> None:
        """One telemetry message with this interval's inference stats for each active version."""
        with self._lock:
            self._tele_seq += 1
            if self.sets:
                running = sorted(self.models.items())
            else:
                running = [self.active] if self.active is not None else []
            stats = []
            for name, version in running:
                b = self.behaviours.get(version, Behaviour())
                stats.append(p.InferenceStats(
                    model=name, version=version, requests=10,
                    errors=b.errors_per_10, tokens=int(b.tokens_per_s * 2),
                    latency_p95_ms=b.latency_p95_ms, latency_p50_ms=b.latency_p95_ms / 2,
                    ttft_p95_ms=50.0, ttft_p50_ms=30.0, tokens_per_s=b.tokens_per_s))
            refs = [f"{n}@{v}" for n, v in running]
            form: dict[str, Any] = (
                {"schema": p.TELEMETRY_SCHEMA_SETS, "models": refs} if self.sets
                else {"active_model": refs[0] if refs else None})
            self._say(p.TopicKind.TELEMETRY, p.Telemetry(
                device_id=self.device_id, ts=time.time(), seq=self._tele_seq, uptime_s=100.0,
                cpu_percent=20.0, ram_used_bytes=1 << 30, inference=stats, **form))

    def clear(self) -> None:
        """Drop this device's retained messages from the shared broker."""
        for kind in (p.TopicKind.HELLO, p.TopicKind.STATE):
            if self.client is not None:
                self.client.publish(p.device_topic(self.device_id, kind), b"", qos=1,
                                    retain=True).wait_for_publish(5)


class SimFleet:
    """Simulated devices plus a background heartbeat, for one test."""

    def __init__(self, broker: MosquittoBroker, trust: TrustSimulator, *,
                 heartbeat_s: float = 0.25) -> None:
        self.broker, self.trust, self.heartbeat_s = broker, trust, heartbeat_s
        self.devices: dict[str, SimDevice] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sim-heartbeats", daemon=True)
        self._thread.start()

    def add(self, device_id: str, tier: str, behaviours: dict[str, Behaviour],
            *, labels: dict[str, str], active: tuple[str, str] | None = None,
            sets: bool = False, models: dict[str, str] | None = None) -> SimDevice:
        device = SimDevice(self.broker, device_id, tier, self.trust, behaviours,
                           labels=labels, active=active, sets=sets,
                           models=dict(models or {})).connect()
        self.devices[device_id] = device
        return device

    def _beat(self) -> None:
        # Bounded by the test's lifetime: close() stops it.
        while not self._stop.wait(self.heartbeat_s):
            for device in list(self.devices.values()):
                try:
                    device.heartbeat()
                except Exception:  # a device torn down mid-beat
                    continue

    def received(self, version: str) -> set[str]:
        """Ids of devices that accepted an assignment (or a set entry) of ``version``."""
        return {d.device_id for d in self.devices.values()
                if any(v.manifest.version == version for v in d.received)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for device in self.devices.values():
            device.clear()
            device.disconnect()


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             poll: float = 0.05) -> object:
    """:func:`tests.support.controlplane.wait_until`, polling a little less often."""
    return wait_until(predicate, timeout, what, poll)


def ids(prefix: str, n: int) -> Iterable[str]:
    """``n`` unique device ids starting with ``prefix``."""
    tag = secrets.token_hex(2)
    return (f"{prefix}-{tag}-{i:02d}" for i in range(n))


def start_three_stage_rollout(api: Any, fleet: SimFleet, trust: TrustSimulator, model: str,
                              behaviours: dict[str, Behaviour], prefix: str,
                              middle_bake_s: float) -> tuple[list[SimDevice], str]:
    """Publish ``model`` 1.0.0 and 1.1.0 (small tier), put 8 small devices on 1.0.0, and
    start a rollout of 1.1.0 in stages of 25, 50 and 100 % whose middle stage bakes
    ``middle_bake_s``. Returns the devices and the rollout's id."""
    from tests.support.registry import publish

    publish(api, trust, model, "1.0.0", (p.Tier.SMALL,))
    publish(api, trust, model, "1.1.0", (p.Tier.SMALL,))
    labels = {"test": secrets.token_hex(4)}
    devices = [fleet.add(d, "small", behaviours, labels=labels, active=(model, "1.0.0"))
               for d in ids(prefix, 8)]
    wait_for(lambda: len(api.get("/v1/devices", params={
        "label": f"test={labels['test']}", "online": True}).json()["items"]) == 8,
        15, "the simulated devices online")
    r = api.post("/v1/rollouts", json={
        "model": model, "version": "1.1.0", "target": {"labels": labels},
        "stages": [{"percent": 25, "bake_s": 0}, {"percent": 50, "bake_s": middle_bake_s},
                   {"percent": 100, "bake_s": 0}]})
    assert r.status_code == 201, r.text
    return devices, r.json()["id"]

