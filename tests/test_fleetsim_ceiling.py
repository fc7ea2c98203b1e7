"""The simulator as a load generator that keeps its asked rate.

- a late tick sends the beats a stall swallowed, up to ``catch_up`` periods;
- ``--procs N`` splits one scenario's fleet over N processes: every device
  once, on the real broker, and one summary whose seconds line up;
- a heartbeat PUBLISH built from the pre-encoded topic field is the same
  packet the plain one is.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import protocol as p
from agent.profiles import default_profiles_dir, load_profiles
from fleetsim import FleetSimulator, Scenario
from fleetsim.procs import merge, parse_part
from fleetsim.wheel import HeartbeatWheel
from fleetsim.wire import HeartbeatLink, topic_head
from tests.support.controlplane import wait_until


def _beats(wheel: HeartbeatWheel, times: list[float]) -> collections.Counter[int]:
    got: collections.Counter[int] = collections.Counter()
    for t in times:
        got.update(wheel.due(t))
    return got


@pytest.mark.parametrize(("catch_up", "each"), [(0, 1), (1, 2), (2, 3), (9, 3)])
def test_a_stall_sends_what_it_owed_up_to_catch_up(catch_up: int, each: int) -> None:
    first = [10.0 + i / 10 for i in range(10)]  # all up by 10.9
    wheel = HeartbeatWheel(first, 1.0, catch_up)
    _beats(wheel, [10.95])
    # a stall of exactly three periods: every device owed three beats
    assert _beats(wheel, [13.95]) == {i: each for i in range(10)}
    # and the ticks after it are back to one a period
    assert _beats(wheel, [13.95 + k / 20 for k in range(1, 21)]) == {i: 1 for i in range(10)}


def test_catch_up_counts_a_device_that_came_up_inside_the_stall_from_its_first_beat() -> None:
    wheel = HeartbeatWheel([10.0, 10.5, 12.5], 1.0, catch_up=5)
    _beats(wheel, [10.6])
    got = _beats(wheel, [13.0])  # 12.5 beat once, the others owe 11, 12 and 13 (10.5: 11.5, 12.5)
    assert got == {0: 3, 1: 2, 2: 1}


def test_catch_up_is_counted_in_periods() -> None:
    with pytest.raises(ValueError, match="catch_up"):
        HeartbeatWheel([0.0], 1.0, catch_up=-1)


def _sim(part: tuple[int, int]) -> FleetSimulator:
    return FleetSimulator(Scenario(devices=25, id_prefix="split"), "mqtt://127.0.0.1:1", "u",
                          "p", trust=None, profiles=load_profiles(default_profiles_dir()),
                          part=part)


def test_parts_split_one_fleet_without_overlap() -> None:
    whole = {d.device_id: (d.board, d.labels) for d in _sim((0, 1)).devices}
    parts = [{d.device_id: (d.board, d.labels) for d in _sim((k, 3)).devices}
             for k in range(3)]
    assert sum(len(x) for x in parts) == len(whole) == 25
    assert {k: v for x in parts for k, v in x.items()} == whole
    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        _sim((3, 3))
    assert parse_part("1/4") == (1, 4)
    for bad in ("1", "a/b", "4/4", "-1/2"):
        with pytest.raises(ValueError, match="--part"):
            parse_part(bad)


def test_merged_summary_lines_seconds_up_by_wall_time() -> None:
    a = {"started_wall": 100.0, "elapsed_s": 5.0, "published_per_s": 10.0, "publish_errors": 0,
         "heartbeats_per_second": [1, 2, 3], "published": {"telemetry": 6}, "devices": 2,
         "states": {"none": 2}}
    b = {"started_wall": 101.1, "elapsed_s": 4.0, "published_per_s": 5.0, "publish_errors": 1,
         "heartbeats_per_second": [10, 20, 30], "published": {"telemetry": 60, "hello": 1},
         "devices": 3, "states": {"none": 3}}
    out = merge([a, b])
    assert out["heartbeats_per_second"] == [1, 12, 23, 30]
    assert out["published"] == {"telemetry": 66, "hello": 1}
    assert out["devices"] == 5 and out["parts"] == 2 and out["publish_errors"] == 1
    assert out["published_per_s"] == 15.0 and out["states"] == {"none": 5}


def test_pre_encoded_topic_gives_the_same_packet() -> None:
    topic = p.device_topic("same-dev", p.TopicKind.TELEMETRY).encode()
    plain, ready = HeartbeatLink.__new__(HeartbeatLink), HeartbeatLink.__new__(HeartbeatLink)
    for link in (plain, ready):
        link._out, link._next_id, link.inflight, link.published = bytearray(), 65535, 0, 0
    for payload in (b"x", b"y" * 200, b"z" * 20_000):  # one-, two- and three-byte lengths
        plain.publish(topic, payload)
        ready.publish_head(topic_head(topic), payload)
    assert plain._out == ready._out
    # MQTT v5 §3.3: type and QoS 1, remaining length, topic, packet id 65,535, no properties
    first = b"\x32" + bytes([2 + len(topic) + 3 + 1]) + b"\x00\x22" + topic + b"\xff\xff\x00x"
    assert len(topic) == 0x22 and plain._out.startswith(first)
    assert ready._next_id == 3  # wrapped past 65,535 to 1


def test_procs_split_the_fleet_on_the_broker(broker, cp_credentials) -> None:
    """Two processes, one summary, and every device's heartbeats on the broker."""
    seen: set[str] = set()
    counter = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="procs-counter",
                          protocol=mqtt.MQTTv5)
    counter.username_pw_set(*cp_credentials)
    counter.on_message = lambda _c, _u, msg: seen.add(msg.topic.split("/")[3])
    counter.connect(broker.host, broker.port)
    counter.subscribe("slmfleet/v1/dev/+/telemetry", qos=0)
    counter.loop_start()
    try:
        time.sleep(0.3)
        out = subprocess.run(
            [sys.executable, "-m", "slmfleet", "simulate", "--broker", broker.url,
             "--username", cp_credentials[0], "--password", cp_credentials[1],
             "--devices", "60", "--heartbeat", "0.5", "--ramp", "0.2", "--duration", "3",
             "--procs", "2", "--catch-up", "2", "--output", "json"],
            capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["parts"] == 2 and summary["devices"] == 60
        assert summary["published"]["hello"] == 60 and summary["publish_errors"] == 0
        assert sum(summary["heartbeats_per_second"]) == summary["published"]["telemetry"] >= 120
        wait_until(lambda: len({d for d in seen if d.startswith("sim-")}) == 60, 10,
                   "every device's heartbeat")
    finally:
        counter.disconnect()
        counter.loop_stop()


def test_procs_need_json_output(broker, cp_credentials) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "slmfleet", "simulate", "--broker", broker.url,
         "--username", cp_credentials[0], "--password", cp_credentials[1], "--devices", "4",
         "--procs", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--output json" in out.stderr


def test_the_ceiling_counts_only_whole_seconds_inside_its_window() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fleet import DEVICES, lag_growth, sent_rate

    summary = {"started_wall": 1000.0, "published_per_s": 1.0,
               "heartbeats_per_second": [0, 5, DEVICES, 100, DEVICES, DEVICES, 7]}
    # seconds 2..5 lie wholly in [1001.5, 1006.0]; 1 starts before it, 6 ends after it
    out = sent_rate(summary, 1001.5, 1006.0)
    assert out["ceiling_sent_seconds"] == 4
    assert out["ceiling_sent_min_msgs_per_s"] == 100
    assert out["ceiling_sent_median_msgs_per_s"] == DEVICES
    assert out["ceiling_sent_mean_msgs_per_s"] == round((3 * DEVICES + 100) / 4, 1)
    assert out["ceiling_sent_seconds_below_90pct"] == 1
    polls = [(1000.0 + t, 2.0 + 0.5 * t) for t in range(0, 31)]  # lag grows 0.5 s a second
    growth = lag_growth(polls, 1000.0, 1030.0)
    assert growth["ceiling_lag_growth_s_per_s"] == 0.5
    assert growth["ceiling_lag_first_5s_s"] < growth["ceiling_lag_last_5s_s"]
    assert lag_growth(polls[:1], 1000.0, 1030.0)["ceiling_lag_growth_s_per_s"] == -1.0
