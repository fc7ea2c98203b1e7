"""The agent's MQTT link against a real Mosquitto: hello, state, Last Will,
heartbeat, clean shutdown and reconnect with backoff."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

import protocol as p
from agent.backoff import Backoff
from agent.config import load_config
from agent.link import MqttLink
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support.agents import AgentProcess, write_agent_config
from tests.support.mqtt import RawClient


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Watcher:
    """Subscribes as the control plane and decodes everything one device says."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.raw = RawClient(broker.url, CONTROL_PLANE_USER, broker.users[CONTROL_PLANE_USER])
        self.device_id = device_id
        self.raw.connect()
        self.raw.subscribe(f"{p.TOPIC_ROOT}/{device_id}/#")

    def decoded(self, kind: p.TopicKind) -> list:
        out = []
        for msg in list(self.raw.messages):
            device, k = p.parse_topic(msg.topic)
            if k == kind and device == self.device_id and msg.payload:
                out.append(p.decode(k, msg.payload))
        return out

    def states(self) -> list[str]:
        return [m.state.value for m in self.decoded(p.TopicKind.STATE)]

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def device(new_device) -> tuple[str, str]:
    device_id = f"dev-{secrets.token_hex(4)}"
    return device_id, new_device(device_id)


@pytest.fixture
def watcher(broker, device) -> Iterator[Watcher]:
    w = Watcher(broker, device[0])
    yield w
    w.close()


def _start(tmp_path: Path, broker_url: str, device: tuple[str, str], **extra) -> AgentProcess:
    return AgentProcess(write_agent_config(tmp_path, device[0], broker_url, device[1], **extra))


def test_hello_state_and_heartbeat(tmp_path, broker, device, watcher) -> None:
    agent = _start(tmp_path, broker.url, device, labels={"site": "lab"},
                   simulate={"preset": "raspberry-pi-4-4gb"})
    try:
        _wait(lambda: watcher.decoded(p.TopicKind.HELLO), 10, "hello")
        hello = watcher.decoded(p.TopicKind.HELLO)[0]
        assert hello.device_id == device[0]
        assert hello.tier == p.Tier.MICRO
        assert hello.profile == "raspberry-pi-4-4gb"
        assert hello.simulated is True
        assert hello.labels == {"site": "lab"}
        assert watcher.states()[-1] == "online"
        _wait(lambda: len(watcher.decoded(p.TopicKind.TELEMETRY)) >= 2, 10, "two heartbeats")
        beats = watcher.decoded(p.TopicKind.TELEMETRY)
        assert beats[1].seq == beats[0].seq + 1
        assert beats[0].ram_used_bytes > 0
    finally:
        agent.stop()


def test_retained_hello_reaches_late_subscriber(tmp_path, broker, device) -> None:
    agent = _start(tmp_path, broker.url, device)
    try:
        early = Watcher(broker, device[0])
        _wait(lambda: early.decoded(p.TopicKind.HELLO), 10, "hello")
        early.close()
        late = Watcher(broker, device[0])
        _wait(lambda: late.decoded(p.TopicKind.HELLO), 5, "retained hello")
        late.close()
        # a real probe of this machine, not simulated
        hello = late.decoded(p.TopicKind.HELLO)[0]
        assert hello.simulated is False and hello.capabilities.cpu.cores >= 1
    finally:
        agent.stop()


def test_sigkill_triggers_last_will(tmp_path, broker, device, watcher) -> None:
    agent = _start(tmp_path, broker.url, device, keepalive_s=5)
    _wait(lambda: "online" in watcher.states(), 10, "online")
    agent.kill()
    # The broker publishes the will once it notices the dead socket (the
    # kernel closes it at once on SIGKILL, so no keepalive wait is needed).
    _wait(lambda: watcher.states()[-1] == "offline", 10, "Last Will offline")


def test_clean_shutdown_publishes_offline(tmp_path, broker, device, watcher) -> None:
    agent = _start(tmp_path, broker.url, device)
    _wait(lambda: "online" in watcher.states(), 10, "online")
    assert agent.terminate() == 0
    # Published and acknowledged before the agent exited; the broker may
    # still be forwarding it to the watcher.
    _wait(lambda: watcher.states()[-1] == "offline", 5, "offline on clean shutdown")
    assert "stopped" in agent.log()


def test_reconnects_after_broker_restart(tmp_path, device) -> None:
    # A broker of its own: restarting the shared one would disturb other tests.
    users = {CONTROL_PLANE_USER: secrets.token_urlsafe(8), device[0]: device[1]}
    own = MosquittoBroker(tmp_path / "broker", users=users).start()
    agent = _start(tmp_path / "agent", own.url, device)
    try:
        w = Watcher(own, device[0])
        _wait(lambda: w.decoded(p.TopicKind.HELLO), 10, "first hello")
        w.close()
        own.stop()
        time.sleep(1.0)
        own.start()
        w2 = Watcher(own, device[0])
        # persistence is off, so a hello here proves the agent reconnected and re-sent it
        _wait(lambda: w2.decoded(p.TopicKind.HELLO), 15, "hello after reconnect")
        assert w2.states()[-1] == "online"
        assert "reconnecting in" in agent.log()
        w2.close()
    finally:
        agent.stop()
        own.stop()


def test_wrong_password_keeps_retrying_without_crashing(tmp_path, broker, device) -> None:
    agent = _start(tmp_path, broker.url, (device[0], "wrong-password"))
    try:
        _wait(lambda: agent.log().count("reconnecting in") >= 2, 10, "retries")
        assert agent.proc.poll() is None
    finally:
        agent.stop()


def test_bad_config_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "Bad/Id"\n')
    agent = AgentProcess(path)
    assert agent.proc.wait(timeout=20) == 2
    assert "device_id" in agent.log() and "invalid device id" in agent.log()


def test_backoff_grows_with_jitter_and_resets() -> None:
    import random

    b = Backoff(1.0, 8.0, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(4.0 <= d <= 8.0 for d in delays[3:])  # capped at the maximum
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not lockstep
    b.reset()
    assert b.next_delay() <= 1.0


def test_hello_is_json_with_schema(tmp_path, broker, device, watcher) -> None:
    agent = _start(tmp_path, broker.url, device, simulate={"preset": "x86_64-gpu-workstation"})
    try:
        _wait(lambda: watcher.decoded(p.TopicKind.HELLO), 10, "hello")
        raw = next(m.payload for m in watcher.raw.messages if m.topic.endswith("/hello"))
        assert json.loads(raw)["schema"] == "slmfleet.hello/2", "this agent reads model sets"
        assert watcher.decoded(p.TopicKind.HELLO)[0].tier == p.Tier.MEDIUM
    finally:
        agent.stop()


def test_stop_before_subscribe_acked_still_publishes_offline(tmp_path, broker, device, watcher,
                                                             monkeypatch) -> None:
    """A stop that lands after ``online`` went out but before the link finished
    connecting (a slow SUBACK) must not leave a retained ``online`` behind."""
    async def never_acked(self, *args, **kwargs):
        await asyncio.Event().wait()

    monkeypatch.setattr(aiomqtt.Client, "subscribe", never_acked)
    config = load_config(write_agent_config(tmp_path, device[0], broker.url, device[1]))

    async def scenario() -> None:
        link = MqttLink(config, hello=lambda: b"{}")
        runner = asyncio.create_task(link.run())
        deadline = time.monotonic() + 10
        while "online" not in watcher.states():
            assert time.monotonic() < deadline, "timed out waiting for online"
            await asyncio.sleep(0.05)
        assert not link.connected.is_set()
        await link.close()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(scenario())
    _wait(lambda: watcher.states()[-1] == "offline", 5, "offline after an early stop")
