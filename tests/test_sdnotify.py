"""sd_notify against a real notify socket: the agent/sdnotify.py functions, and
a real agent process talking to a socket bound the way systemd binds it.

The socket receives with ``SO_PASSCRED``, so each datagram carries the
sender's pid from the kernel, which is what systemd's ``NotifyAccess=main``
checks: the messages must come from the agent process itself.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.sdnotify import notify, watchdog_interval_s
from controlplane.devfleet.mosquitto import MosquittoBroker, free_port
from tests.support.agents import AgentProcess, write_agent_config

#: WATCHDOG_USEC handed to the agent: it should ping every 0.5 s
WATCHDOG_USEC = 1_000_000


@dataclass(frozen=True)
class Datagram:
    """One notification as systemd would see it."""

    at: float  #: time.monotonic() on receipt
    pid: int  #: sender pid, from the kernel (SCM_CREDENTIALS)
    fields: dict[str, str]


class NotifySocket:
    """An ``AF_UNIX``/``SOCK_DGRAM`` socket bound like systemd's notify socket.

    ``address`` is a path, or ``@name`` for the abstract namespace; use it as
    ``NOTIFY_SOCKET``. A thread collects datagrams until :meth:`close`.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.datagrams: list[Datagram] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.05)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds_size = struct.calcsize("iII")
        while not self._closing.is_set():
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(creds_size)
                )
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:creds_size])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.datagrams.append(Datagram(time.monotonic(), pid, fields))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15.0) -> Datagram:
        """The first datagram setting ``key`` (to ``value``, if given); fail on timeout."""

        def find() -> Datagram | None:
            return next((d for d in self.datagrams if key in d.fields
                         and (value is None or d.fields[key] == value)), None)

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout)
            found = find()
        assert found is not None, f"no {key}={value or '*'} within {timeout} s: {self.datagrams}"
        return found

    def with_field(self, key: str, value: str) -> list[Datagram]:
        with self._cond:
            return [d for d in self.datagrams if d.fields.get(key) == value]

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=2)
        self._sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as path:
        yield Path(path)


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(short_dir / "notify.sock"))
    yield sock
    sock.close()


def _agent_env(notify_address: str) -> dict[str, str]:
    # WATCHDOG_PID empty reads as unset; it also overrides one this test run
    # may have inherited from a service manager.
    return {"NOTIFY_SOCKET": notify_address, "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": ""}


@pytest.fixture
def device(new_device) -> tuple[str, str]:
    device_id = f"sdn-{secrets.token_hex(4)}"
    return device_id, new_device(device_id)


# -- agent/sdnotify.py on its own ------------------------------------------------


def test_notify_without_socket_is_a_no_op() -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_notify_reaches_a_path_socket(notify_socket: NotifySocket) -> None:
    assert notify("READY=1\nSTATUS=hi", environ={"NOTIFY_SOCKET": notify_socket.address})
    got = notify_socket.wait_for("READY", "1", timeout=2)
    assert got.fields == {"READY": "1", "STATUS": "hi"}
    assert got.pid == os.getpid()


def test_notify_reaches_an_abstract_socket() -> None:
    sock = NotifySocket(f"@slmfleet-test-{secrets.token_hex(6)}")
    try:
        assert notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": sock.address})
        assert sock.wait_for("WATCHDOG", "1", timeout=2).pid == os.getpid()
    finally:
        sock.close()


def test_notify_to_a_socket_nobody_listens_on_returns_false(short_dir: Path) -> None:
    assert notify("READY=1", environ={"NOTIFY_SOCKET": str(short_dir / "gone.sock")}) is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 0.5
    assert watchdog_interval_s({}) is None
    # The watchdog belongs to another process (we were forked from the service).
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None


# -- a real agent process --------------------------------------------------------


@pytest.mark.integration
def test_agent_sends_ready_watchdog_and_stopping(
    tmp_path: Path, broker: MosquittoBroker, device: tuple[str, str],
    notify_socket: NotifySocket,
) -> None:
    config = write_agent_config(tmp_path, device[0], broker.url, device[1])
    agent = AgentProcess(config, env=_agent_env(notify_socket.address))
    try:
        ready = notify_socket.wait_for("STATUS", "connected to broker")
        assert ready.fields["READY"] == "1"
        assert f"connected to {broker.url}" in agent.log(), "status only after the connect"

        # Watch the watchdog for a few periods after READY.
        time.sleep(2.2)
        pings = [d.at for d in notify_socket.with_field("WATCHDOG", "1") if d.at >= ready.at]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4, pings
        assert 0.4 <= statistics.median(gaps) <= 0.7, gaps
        assert max(gaps) < WATCHDOG_USEC / 1e6, f"systemd would have killed it: {gaps}"

        assert agent.terminate() == 0, agent.log()
        notify_socket.wait_for("STOPPING", "1", timeout=2)
        # NotifyAccess=main: every message came from the agent process itself.
        assert {d.pid for d in notify_socket.datagrams} == {agent.pid}
    finally:
        agent.stop()


@pytest.mark.integration
def test_agent_without_broker_is_ready_once_it_serves_locally(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """No broker: the agent still serves apps on the device, so it reports READY=1
    (saying the broker is missing) instead of being restarted by systemd's start
    timeout; the watchdog runs all along."""
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    config = write_agent_config(tmp_path, "sdn-offline", nowhere, "unused")
    agent = AgentProcess(config, env=_agent_env(notify_socket.address))
    try:
        ready = notify_socket.wait_for("READY", "1")
        assert "broker not connected" in ready.fields["STATUS"], ready.fields
        assert "local API on http://127.0.0.1:" in agent.log()
        notify_socket.wait_for("WATCHDOG", "1")
        time.sleep(1.2)
        assert len(notify_socket.with_field("WATCHDOG", "1")) >= 2
        assert not [d for d in notify_socket.datagrams
                    if d.fields.get("STATUS") == "connected to broker"]
    finally:
        agent.stop()


@pytest.mark.integration
def test_agent_notifies_an_abstract_socket(
    tmp_path: Path, broker: MosquittoBroker, device: tuple[str, str]
) -> None:
    sock = NotifySocket(f"@slmfleet-test-{secrets.token_hex(6)}")
    agent = AgentProcess(write_agent_config(tmp_path, device[0], broker.url, device[1]),
                         env=_agent_env(sock.address))
    try:
        assert sock.wait_for("READY", "1").pid == agent.pid
        assert agent.terminate() == 0
        sock.wait_for("STOPPING", "1", timeout=2)
    finally:
        agent.stop()
        sock.close()


@pytest.mark.integration
def test_a_stop_right_after_ready_always_ends_the_agent(
    tmp_path: Path, broker: MosquittoBroker, new_device
) -> None:
    """systemd may stop the agent the moment it says READY=1. About one such
    stop in ten left the MQTT link's task waiting for messages as if never
    cancelled, and the agent ran on until systemd killed it (and re-hashed its
    model at the next start, for want of a clean-shutdown marker). Twenty in a
    row must all end cleanly, each well inside the unit's TimeoutStopSec."""
    for attempt in range(20):
        device_id = f"sdn-{secrets.token_hex(4)}"
        sock = NotifySocket(f"@slmfleet-test-{secrets.token_hex(6)}")
        agent = AgentProcess(write_agent_config(tmp_path / str(attempt), device_id, broker.url,
                                                new_device(device_id)),
                             env=_agent_env(sock.address))
        try:
            assert sock.wait_for("READY", "1").pid == agent.pid
            started = time.monotonic()
            assert agent.terminate(timeout=20) == 0, agent.log()[-2000:]
            assert time.monotonic() - started < 8, agent.log()[-2000:]
            assert "stopped" in agent.log()
        finally:
            agent.stop()
            sock.close()


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another process (here: this test) is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.integration
def test_agent_whose_api_port_is_taken_exits_and_is_never_ready(
    tmp_path: Path, broker: MosquittoBroker, device: tuple[str, str],
    notify_socket: NotifySocket, held_port: int,
) -> None:
    """An agent configured to serve apps that cannot serve them is not ready:
    it exits non-zero (systemd's Restart=on-failure retries it, then leaves the
    unit failed), saying which address and what to do, and never sends READY=1."""
    config = write_agent_config(tmp_path, device[0], broker.url, device[1],
                                api_port=held_port)
    agent = AgentProcess(config, env=_agent_env(notify_socket.address))
    try:
        assert agent.proc.wait(timeout=60) == 1, agent.log()
        log = agent.log()
        assert f"local API cannot listen on 127.0.0.1:{held_port}" in log
        assert "api_port" in log and "another process holds that port" in log
        assert f"connected to {broker.url}" not in log, "it must fail before joining"
        time.sleep(0.2)  # a datagram sent just before exiting has surely arrived
        assert not notify_socket.with_field("READY", "1"), notify_socket.datagrams
    finally:
        agent.stop()


@pytest.mark.integration
def test_agent_without_local_api_ignores_api_port(
    tmp_path: Path, broker: MosquittoBroker, device: tuple[str, str],
    notify_socket: NotifySocket, held_port: int,
) -> None:
    """``api_enabled = false``: no API, so its port (taken here) does not matter."""
    config = write_agent_config(tmp_path, device[0], broker.url, device[1],
                                api_port=held_port, api_enabled=False)
    agent = AgentProcess(config, env=_agent_env(notify_socket.address))
    try:
        notify_socket.wait_for("STATUS", "connected to broker")
        assert "local API" not in agent.log()
        assert agent.terminate() == 0, agent.log()
    finally:
        agent.stop()
