"""Many simulated devices on a few MQTT connections, driven by one timer thread.

10,000 devices with a paho client (and its thread) each would need far more
than two cores, so devices share connections: device *i* publishes and
subscribes through connection ``i % connections``, every message on its own
device's topics, so the broker and the control plane see exactly the
traffic real devices would send. The one thing lost is the per-device Last
Will: a simulator killed outright leaves its devices to the control plane's
missed-heartbeat detection; stopped cleanly, it publishes ``offline`` for
each of them. The broker user needs write access to every device's
``hello``/``state``/``telemetry``/``events`` and read access to every
``desired`` (docs/simulator.md has the ACL lines).

All device work (verifying assignments, building reports) runs on the timer
thread; paho's network threads only hand incoming ``desired`` payloads over
through a queue. Heartbeats, the bulk of the traffic, leave on their own
connections (:mod:`fleetsim.wire`), written by the timer thread itself,
all those falling due within one tick in one send.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.profiles import FirmwareProfile
from agent.trust import TrustRoots
from protocol import (
    EventType,
    ReleaseManifest,
    TopicError,
    TopicKind,
    UpdateState,
    device_topic,
    parse_topic,
)

from .device import Step, make_devices
from .policy import SimClock, app_locks, hold
from .scenario import Scenario
from .wheel import HeartbeatWheel
from .wire import HeartbeatLink, topic_head

log = logging.getLogger(__name__)

#: topics per SUBSCRIBE packet
SUBSCRIBE_BATCH = 500
#: QoS 1 messages a connection may have unacknowledged (paho's default, 20,
#: would cap a connection at 20 round trips' worth of messages)
MAX_INFLIGHT = 2000
#: the timer thread looks at the incoming queue at least this often
TICK_S = 0.05
#: ... and at most this often: timers falling due meanwhile run together, and
#: their heartbeats leave in one send per connection (at 10,000 heartbeats a
#: second, ~25 per connection: fewer wake-ups and system calls than at 2 ms)
MIN_TICK_S = 0.005
#: connections carrying heartbeats (:mod:`fleetsim.wire`); one takes ~10,000 msg/s
HEARTBEAT_LINKS = 2


@dataclass
class FleetStats:
    """What the simulator has done so far; read it from any thread."""

    started: float = field(default_factory=time.monotonic)
    #: the wall time at ``started``, to line several simulators' seconds up
    started_wall: float = field(default_factory=time.time)
    published: Counter[str] = field(default_factory=Counter)
    assignments: Counter[str] = field(default_factory=Counter)
    publish_errors: int = 0
    #: heartbeats sent in each whole second since ``started``
    heartbeats_per_second: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_heartbeats(self, count: int, now: float) -> None:
        """Add ``count`` heartbeats sent at ``now`` (monotonic)."""
        second = int(now - self.started)
        with self.lock:
            per_second = self.heartbeats_per_second
            if len(per_second) <= second:
                per_second.extend([0] * (second + 1 - len(per_second)))
            per_second[second] += count
            self.published["telemetry"] += count

    def count(self, counter: Counter[str], key: str) -> None:
        """Add one to ``counter[key]`` under the lock."""
        with self.lock:
            counter[key] += 1

    def snapshot(self) -> dict[str, object]:
        """A consistent copy, with messages per second since start."""
        with self.lock:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            total = sum(self.published.values())
            return {"elapsed_s": round(elapsed, 1), "started_wall": self.started_wall,
                    "published": dict(self.published),
                    "published_per_s": round(total / elapsed, 1),
                    "assignments": dict(self.assignments),
                    "publish_errors": self.publish_errors,
                    "heartbeats_per_second": list(self.heartbeats_per_second)}


class FleetSimulator:
    """Run ``scenario`` against the broker at ``broker_url``."""

    def __init__(self, scenario: Scenario, broker_url: str, username: str, password: str,
                 *, trust: TrustRoots | None, profiles: list[FirmwareProfile],
                 connections: int | None = None, client_prefix: str = "fleetsim",
                 catch_up: int = 0, part: tuple[int, int] = (0, 1)) -> None:
        """``part`` = (k, n): simulate only every n-th device from the k-th, so that n
        processes share one scenario's fleet; ``catch_up``: see :class:`HeartbeatWheel`."""
        k, n = part
        if not 0 <= k < n:
            raise ValueError(f"part {k}/{n}: k must be in 0..n-1")
        self.scenario = scenario
        start = scenario.clock_start.timestamp() if scenario.clock_start else None
        #: the devices' clock, for their update windows and locks
        self.clock = SimClock(start)
        locks = scenario.locks
        self.devices = make_devices(scenario, profiles, locks=app_locks(
            scenario.devices, locks.fraction, locks.hold_s, locks.reason, self.clock(),
            scenario.seed) if locks else None)[k::n]
        self.trust = trust
        #: every simulated device gets the same release bytes: verified once
        self._release_cache: dict[bytes, ReleaseManifest] = {}
        self.stats = FleetStats()
        url = urlsplit(broker_url)
        if url.scheme != "mqtt" or not url.hostname:
            raise ValueError(f"broker URL must look like mqtt://host:1883, got {broker_url!r}")
        self._host, self._port = url.hostname, url.port or 1883
        self._credentials = (username, password)
        count = connections or max(1, min(16, len(self.devices) // 1000 + 1))
        if n > 1:
            client_prefix = f"{client_prefix}-{k}of{n}"
        self._clients = [self._client(f"{client_prefix}-{i}") for i in range(count)]
        self._rng = random.Random(scenario.seed + 1_000_003 * k)
        self._catch_up = catch_up
        self._incoming: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._by_id = {d.device_id: i for i, d in enumerate(self.devices)}
        #: each device's steps of its current update (a refresh may look again)
        self._steps: dict[int, list[Step]] = {}
        self._client_prefix = client_prefix
        self._links: list[HeartbeatLink] = []
        self._wheel = HeartbeatWheel([], 1.0)
        self._telemetry_topics = [topic_head(device_topic(d.device_id, TopicKind.TELEMETRY)
                                             .encode()) for d in self.devices]

    # -- connections -------------------------------------------------------------------

    def _client(self, client_id: str) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(*self._credentials)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.on_message = self._on_message
        return client

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        self._incoming.put((msg.topic, msg.payload))

    def _connection(self, index: int) -> mqtt.Client:
        return self._clients[index % len(self._clients)]

    def _publish(self, index: int, kind: TopicKind, payload: bytes, retain: bool = False) -> None:
        device = self.devices[index]
        info = self._connection(index).publish(device_topic(device.device_id, kind), payload,
                                               qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            with self.stats.lock:
                self.stats.publish_errors += 1
            return
        self.stats.count(self.stats.published, kind.value)

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect, subscribe every device's ``desired``, and start the devices."""
        for client in self._clients:
            client.connect(self._host, self._port, keepalive=60)
            client.loop_start()
        deadline = time.monotonic() + timeout
        while not all(c.is_connected() for c in self._clients):
            if time.monotonic() > deadline:
                self.stop()
                raise ConnectionError(f"could not connect to {self._host}:{self._port} within "
                                      f"{timeout:g} s; is the broker running and the user allowed?")
            time.sleep(0.02)
        count = min(HEARTBEAT_LINKS, len(self._clients))
        self._links = [HeartbeatLink(self._host, self._port, f"{self._client_prefix}-beat-{i}",
                                     *self._credentials) for i in range(count)]
        for c, client in enumerate(self._clients):
            topics = [(device_topic(d.device_id, TopicKind.DESIRED), 1)
                      for i, d in enumerate(self.devices) if i % len(self._clients) == c]
            for start in range(0, len(topics), SUBSCRIBE_BATCH):
                client.subscribe(topics[start:start + SUBSCRIBE_BATCH])
        now = time.monotonic()
        ramp, beat = self.scenario.ramp_s, self.scenario.heartbeat_s
        first = []
        for i in range(len(self.devices)):
            come_up = now + ramp * i / len(self.devices)
            self._at(come_up, lambda i=i: self._come_up(i))
            # First heartbeat a random fraction of a period after coming up,
            # so the fleet's telemetry is spread evenly, as a real one's is.
            first.append(come_up + beat * self._rng.random())
        self._wheel = HeartbeatWheel(first, beat, self._catch_up)
        self._thread = threading.Thread(target=self._run, name="fleetsim", daemon=True)
        self._thread.start()

    def stop(self, *, say_offline: bool = True) -> None:
        """Stop the devices; with ``say_offline``, each reports ``offline`` first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if say_offline:
            pending = [self._connection(i).publish(
                device_topic(d.device_id, TopicKind.STATE), d.state(False), qos=1, retain=True)
                for i, d in enumerate(self.devices)]
            for info in pending[-len(self._clients):]:
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    info.wait_for_publish(timeout=10)
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        for link in self._links:
            link.close()

    def run_for(self, seconds: float) -> None:
        """Block for ``seconds`` (or until :meth:`stop`)."""
        self._stop.wait(seconds)

    def states(self) -> Counter[str]:
        """Devices by their update state (``none`` before any assignment)."""
        return Counter(d.update.state.value if d.update else "none" for d in self.devices)

    def active_versions(self) -> Counter[str]:
        """Devices by active ``name@version`` (``none`` when none is active)."""
        return Counter(f"{d.active.name}@{d.active.version}" if d.active else "none"
                       for d in self.devices)

    # -- the timer thread -----------------------------------------------------------------

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._order), action))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, action = heapq.heappop(self._timers)
                    action()
                self._heartbeats(self._wheel.due(now), now)
                for link in self._links:
                    link.flush()
                wait = TICK_S if not self._timers else min(TICK_S, self._timers[0][0] - now)
                # heartbeats fall due all the time: look again after one short tick
                # (a plain sleep: a queue wait with a timeout spins on its lock)
                if self._incoming.empty():
                    time.sleep(MIN_TICK_S if self.devices else max(wait, MIN_TICK_S))
                while True:  # what arrived meanwhile, before going back to the timers
                    try:
                        topic, payload = self._incoming.get_nowait()
                    except queue.Empty:
                        break
                    self._desired(topic, payload)
        except Exception:
            log.exception("the simulator's timer thread failed; devices stop reporting")
            raise

    def _come_up(self, i: int) -> None:
        self._publish(i, TopicKind.STATE, self.devices[i].state(True), retain=True)
        self._publish(i, TopicKind.HELLO, self.devices[i].hello(), retain=True)

    def _heartbeats(self, due: list[int], now: float) -> None:
        links, devices, topics = self._links, self.devices, self._telemetry_topics
        scenario, rng = self.scenario, self._rng
        for i in due:
            link = links[i % len(links)]
            while not link.can_publish:  # the broker's Receive Maximum: wait for PUBACKs
                link.flush()
                time.sleep(MIN_TICK_S)
            link.publish_head(topics[i], devices[i].telemetry(scenario, rng))
        if due:
            self.stats.count_heartbeats(len(due), now)

    def _desired(self, topic: str, payload: bytes) -> None:
        try:
            device_id, kind = parse_topic(topic)
        except TopicError:
            return
        i = self._by_id.get(device_id)
        if i is None or kind is not TopicKind.DESIRED or not payload:
            return  # not ours, or a cleared retained message
        device = self.devices[i]
        verified = device.verify(payload, self.trust, self._release_cache)
        if verified is None:
            return  # a set with nothing to run
        if isinstance(verified, str):
            self.stats.count(self.stats.assignments, "rejected")
            log.info("%s rejected an assignment: %s", device.device_id, verified)
            self._publish(i, TopicKind.EVENTS, device.event(_REJECTED, None, verified))
            return
        if device.is_refresh(verified):
            device.highest_sequence = verified.sequence
            self.stats.count(self.stats.assignments, "refreshed")
            update = device.update
            assert update is not None
            if update.policy != verified.policy:
                # An operator's override (or another policy): look again now.
                update.policy, update.generation = verified.policy, update.generation + 1
                if update.waiting_at is not None:
                    self._play(i, update.assignment_id, self._steps[i], update.waiting_at)
            return
        self.stats.count(self.stats.assignments, "accepted")
        steps = device.accept(verified, self.scenario, self._rng)
        self._steps[i] = steps
        self._play(i, verified.assignment_id, steps, 0)

    def _play(self, i: int, assignment_id: str, steps: list[Step], at: int,
              generation: int | None = None) -> None:
        """Send ``steps[at]`` and schedule the next; a newer assignment ends the chain."""
        device = self.devices[i]
        update = device.update
        if update is None or update.assignment_id != assignment_id:
            return  # superseded: the new assignment has its own chain
        if generation is not None and generation != update.generation:
            return  # a refresh looked again meanwhile: its chain goes on
        step = steps[at]
        if step.gate is not None:
            held = hold(step.gate, update.policy, device.lock, self.clock(), self._rng)
            if held is not None:
                update.waiting_at = at
                if update.said != held.reason:
                    update.said = held.reason
                    locked = held.reason.startswith("locked")
                    self.stats.count(self.stats.assignments,
                                     "held_locked" if locked else f"held_{held.event.value}")
                    self._publish(i, TopicKind.EVENTS,
                                  device.event(held.event, assignment_id, held.reason))
                gen = update.generation
                self._at(self.clock.monotonic_at(held.retry_at),
                         lambda: self._play(i, assignment_id, steps, at, gen))
                return
            update.waiting_at, update.said = None, None
            self._at(time.monotonic() + steps[at + 1].delay_s,
                     lambda: self._play(i, assignment_id, steps, at + 1))
            return
        self._publish(i, TopicKind.EVENTS, device.event(step.event, assignment_id, step.reason))
        if step.final is not None:
            device.finish(step.final, step.reason)
            self.stats.count(self.stats.assignments, step.final.value)
            self._publish(i, TopicKind.HELLO, device.hello(), retain=True)
            return
        device.update.state = _STATE_AFTER.get(step.event, device.update.state)
        delay = steps[at + 1].delay_s
        self._at(time.monotonic() + delay, lambda: self._play(i, assignment_id, steps, at + 1))


_REJECTED = EventType.REJECTED
#: the persisted state an agent is in after sending each event (hello reports it)
_STATE_AFTER = {
    EventType.VERIFIED: UpdateState.VERIFIED,
    EventType.FIT_CHECKED: UpdateState.FIT_CHECKED,
    EventType.DOWNLOADING: UpdateState.DOWNLOADING,
    EventType.STAGED: UpdateState.STAGED,
    EventType.HEALTH_PASSED: UpdateState.HEALTH_CHECKED,
}
