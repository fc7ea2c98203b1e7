"""What makes a held fleet cheap: the simulator's heartbeat path and the
benchmark's per-role CPU accounting, against the real broker.

- :class:`fleetsim.wire.HeartbeatLink` speaks MQTT v5 to the real Mosquitto:
  every PUBLISH arrives, every PUBACK is counted, the Receive Maximum the
  broker grants is read from its CONNACK;
- a simulated heartbeat, now formatted from a template, decodes with the
  protocol's strict model, with and without an active model;
- :class:`fleetsim.wheel.HeartbeatWheel` gives each device one beat per
  period at its phase, none before it came up, and no backlog after a stall;
- ``bench/_roles.py`` tells a control plane, its writer and the benchmark
  apart by command line.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import protocol as p
from agent.profiles import default_profiles_dir, load_profiles
from fleetsim.device import make_devices
from fleetsim.scenario import Scenario
from fleetsim.wheel import HeartbeatWheel
from fleetsim.wire import HeartbeatLink, LinkError
from tests.support.controlplane import wait_until

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _roles import cp_role, cpu_by_role  # noqa: E402


def test_heartbeat_link_publishes_qos1_through_the_broker(broker, cp_credentials) -> None:
    user, password = cp_credentials
    got: list[bytes] = []
    counter = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="beat-counter",
                          protocol=mqtt.MQTTv5)
    counter.username_pw_set(user, password)
    counter.on_message = lambda _c, _u, msg: got.append(msg.payload)
    counter.connect(broker.host, broker.port)
    counter.subscribe("slmfleet/v1/dev/+/telemetry", qos=1)
    counter.loop_start()
    time.sleep(0.3)  # the subscription is in place before the first publish
    link = HeartbeatLink(broker.host, broker.port, "beat-link-test", user, password)
    try:
        assert 0 < link.receive_maximum <= 65535
        topic = p.device_topic("beat-dev", p.TopicKind.TELEMETRY).encode()
        payloads = [b"x" * n for n in (1, 127, 128, 16_383, 16_384, 200)]  # varint edges
        for payload in payloads:
            link.publish(topic, payload)
        assert link.inflight == len(payloads)
        wait_until(lambda: (link.flush(), link.acked == len(payloads))[1], 10, "PUBACKs")
        assert link.inflight == 0 and link.pending_bytes == 0
        wait_until(lambda: len(got) == len(payloads), 10, "delivery")
        assert sorted(got, key=len) == sorted(payloads, key=len)
    finally:
        link.close()
        counter.disconnect()
        counter.loop_stop()


def test_heartbeat_link_refused_credentials_say_so(broker) -> None:
    with pytest.raises(LinkError, match="refused"):
        HeartbeatLink(broker.host, broker.port, "beat-bad", "nobody", "wrong")


def test_simulated_heartbeats_decode_with_the_strict_model() -> None:
    scenario = Scenario().model_copy(update={"devices": 20})
    devices = make_devices(scenario, load_profiles(default_profiles_dir()))
    rng = random.Random(7)
    idle = p.decode(p.TopicKind.TELEMETRY, devices[0].telemetry(scenario, rng))
    assert isinstance(idle, p.Telemetry) and idle.inference == [] and idle.seq == 1
    assert idle.device_id == devices[0].device_id
    busy = devices[1]
    busy.active = p.ActiveModel(name="smollm2", version="1.2.0", tier=busy.tier,
                                sha256="0" * 64)
    for _ in range(50):  # figures present or absent as requests and errors fall
        beat = p.decode(p.TopicKind.TELEMETRY, busy.telemetry(scenario, rng))
        assert isinstance(beat, p.Telemetry)
        assert beat.active_model == "smollm2@1.2.0"
        (stats,) = beat.inference
        assert stats.model == "smollm2" and stats.version == "1.2.0"
        assert stats.tokens == (stats.requests - stats.errors) * 64
        assert (stats.latency_p95_ms is not None) == (stats.requests > stats.errors)


def test_wheel_beats_each_device_once_a_period_from_its_first_beat() -> None:
    first = [10.0, 10.25, 10.5, 12.9]  # the last comes up later
    wheel = HeartbeatWheel(first, 1.0)
    beats: dict[int, list[float]] = {i: [] for i in range(4)}
    t = 9.0
    while t < 14.0:
        t = round(t + 0.05, 2)
        for i in wheel.due(t):
            beats[i].append(t)
    assert [len(beats[i]) for i in range(3)] == [4, 4, 4]  # 10..13, 10.25..13.25, 10.5..13.5
    assert beats[3] == [12.9, 13.9]
    gaps = [b - a for i in range(4) for a, b in zip(beats[i], beats[i][1:], strict=False)]
    assert gaps and all(g == pytest.approx(1.0) for g in gaps)
    # a stall of three periods: one beat each, not three
    assert sorted(wheel.due(t + 3.0)) == [0, 1, 2, 3]


def test_roles_tell_control_plane_writer_and_bench_apart(tmp_path: Path) -> None:
    script = ROOT / "bench" / "_controlplane.py"
    assert cp_role([sys.executable, str(script), "--role", "replica1", "{}"]) == "replica1"
    assert cp_role([sys.executable, "-m", "slmfleet", "simulate"]) is None
    # CPU shares come from pid snapshots: a process that started in the window
    # counts from zero, one that was there counts its growth.
    before = {1: ("bench", 1.0), 2: ("controlplane", 5.0)}
    after = {1: ("bench", 1.5), 2: ("controlplane", 6.0), 3: ("controlplane_writer", 0.5)}
    assert cpu_by_role(before, after, 10.0) == {"bench": 5.0, "controlplane": 10.0,
                                                "controlplane_writer": 5.0}
    # a live child of this test, classified by its command line
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              "slmfleet", "simulate"])
    try:
        from _roles import classify

        proc = psutil.Process(child.pid)
        # right after fork the child still shows this process's command line
        wait_until(lambda: "simulate" in proc.cmdline(), 10, "the child's exec")
        assert classify(proc, bench_pid=0) == "simulator"
        assert classify(psutil.Process(), bench_pid=psutil.Process().pid) == "bench"
    finally:
        child.kill()
        child.wait()
