"""The units' sandboxes under a real systemd: the agent and the control plane
run as shipped in systemd/, with a test drop-in that changes only what must
change on a test machine (ExecStart to this checkout's interpreter, the
config path, and where the interpreter lives under /root or /home, a
read-only view of it). Everything else, seccomp filter, W^X, private /dev,
user namespace, read-only OS, comes from the unit files themselves.

The manager is a systemd booted in private namespaces for this module
(tests/support/systemd_ns.py); where that is impossible the module skips
and says why.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import protocol as p
from controlplane.devfleet.mosquitto import MosquittoBroker, free_port
from tests.support.agents import write_agent_config
from tests.support.controlplane import wait_until
from tests.support.mqtt import RawClient
from tests.support.systemd_ns import SHARE, NamespacedSystemd, unavailable_reason
from tests.support.units import AGENT_UNIT, CONTROLPLANE_UNIT, REPO, SYSUSERS_CONF

pytestmark = pytest.mark.integration

AGENT = AGENT_UNIT.name
CHECK = "slmfleet-agent-sandbox-check.service"

#: Run inside the agent's sandbox: what the process may see and do, as JSON.
_SANDBOX_FACTS = r"""
import json, mmap, os, socket
facts = {"uid_name": __import__("pwd").getpwuid(os.getuid()).pw_name}
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
for key in ("Seccomp", "NoNewPrivs", "CapEff", "CapBnd"):
    facts[key] = status[key].strip()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    facts["wx_mmap"] = "allowed"
except OSError as exc:
    facts["wx_mmap"] = exc.strerror
def writable(path):
    try:
        with open(os.path.join(path, ".probe"), "w"):
            pass
        os.unlink(os.path.join(path, ".probe"))
        return True
    except OSError:
        return False
dirs = ("/var/lib/slmfleet/agent", "/etc", "/usr", "/var/tmp")
facts["writable"] = {d: writable(d) for d in dirs}
proc = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat")
facts["proc_files"] = {f: os.path.exists(f) for f in proc}
facts["pid1_visible"] = os.path.exists("/proc/1/cmdline")
facts["dev"] = sorted(os.listdir("/dev"))
try:
    facts["home_entries"] = len(os.listdir("/home"))
except OSError:  # ProtectHome=yes: not even listable
    facts["home_entries"] = 0
families = {"AF_NETLINK": socket.AF_NETLINK, "AF_PACKET": socket.AF_PACKET,
            "AF_INET": socket.AF_INET}
facts["sockets"] = {}
for name, family in families.items():
    try:
        socket.socket(family, socket.SOCK_DGRAM).close()
        facts["sockets"][name] = "allowed"
    except OSError as exc:
        facts["sockets"][name] = exc.strerror
print(json.dumps(facts))
"""

#: Run inside the agent's sandbox: both inference runtimes do real work.
_INFERENCE = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])
y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8])
graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "relu", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
out = session.run(None, {"X": np.array([[-1, 2, -3, 4, -5, 6, -7, 8]], "float32")})[0]
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
text = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
print(json.dumps({"onnx": out.tolist(), "llama": text["choices"][0]["text"]}))
"""


def _interpreter_dropin() -> list[str]:
    """Drop-in lines that let the sandbox run this checkout's interpreter.

    ``ProtectHome=yes`` hides /root and /home, ``PrivateTmp=yes`` hides
    /tmp and /var/tmp; when the interpreter or the checkout lives there (a CI
    clone often does), bind just those paths in, read-only, over an empty
    home or the private tmp. Everything else in the unit stays as shipped.
    """
    lines = [f"WorkingDirectory={REPO}"]
    homes = (Path("/root"), Path("/home"), Path("/run/user"))
    tmps = (Path("/tmp"), Path("/var/tmp"))
    needed = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), REPO,
              Path(sys.executable).resolve().parent}
    in_home = sorted(str(path) for path in needed if any(path.is_relative_to(h) for h in homes))
    in_tmp = sorted(str(path) for path in needed if any(path.is_relative_to(t) for t in tmps))
    if in_home:
        lines.append("ProtectHome=tmpfs")
    lines += [f"BindReadOnlyPaths={path}" for path in in_home + in_tmp]
    return lines


def _dropin(command: str, log_name: str, *extra: str) -> str:
    return "\n".join([
        "[Service]",
        "ExecStart=",
        f"ExecStart={command}",
        *_interpreter_dropin(),
        f"StandardOutput=append:{SHARE}/{log_name}",
        "StandardError=inherit",
        *extra,
    ]) + "\n"


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamespacedSystemd]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot boot a namespaced systemd here: {reason}")
    with NamespacedSystemd(tmp_path_factory.mktemp("systemd"), SYSUSERS_CONF) as manager:
        yield manager


def _run_in_agent_sandbox(manager: NamespacedSystemd, name: str, script: str, *args: str,
                          extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a Python script as a oneshot unit built from the agent unit; its JSON output."""
    (manager.share / f"{name}.py").write_text(script)
    (manager.share / f"{name}.py").chmod(0o644)
    log = manager.share / f"{name}.log"
    log.unlink(missing_ok=True)
    command = " ".join([sys.executable, str(SHARE / f"{name}.py"), *args])
    manager.install(CHECK, AGENT_UNIT.read_text(), _dropin(
        command, f"{name}.log",
        # Same sandbox, but run to completion instead of serving.
        "Type=oneshot", "NotifyAccess=none", "WatchdogSec=0", "Restart=no", *extra,
    ))
    result = manager.run("systemctl", "start", CHECK, check=False, timeout=120)
    output = log.read_text() if log.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{output}"
    return json.loads(output.strip().splitlines()[-1])


def test_agent_sandbox_is_in_force(manager: NamespacedSystemd) -> None:
    facts = _run_in_agent_sandbox(manager, "facts", _SANDBOX_FACTS)
    assert facts["uid_name"] == "slmfleet-agent"
    assert facts["Seccomp"] == "2", "SystemCallFilter= installs a seccomp filter"
    assert facts["NoNewPrivs"] == "1"
    assert int(facts["CapEff"], 16) == int(facts["CapBnd"], 16) == 0
    assert facts["wx_mmap"] == "Operation not permitted", "MemoryDenyWriteExecute="
    assert facts["writable"] == {"/var/lib/slmfleet/agent": True, "/etc": False,
                                 "/usr": False, "/var/tmp": True}  # /var/tmp is private
    assert all(facts["proc_files"].values()), "the probe reads these"
    assert not facts["pid1_visible"], "ProtectProc=invisible"
    assert not {"vda", "sda", "nvme0n1", "mem", "kmsg"} & set(facts["dev"]), "PrivateDevices="
    assert facts["home_entries"] == 0, "ProtectHome="
    assert facts["sockets"]["AF_INET"] == "allowed"
    assert facts["sockets"]["AF_NETLINK"] != "allowed"
    assert facts["sockets"]["AF_PACKET"] != "allowed"


def test_procsubset_pid_would_hide_what_the_probe_reads(manager: NamespacedSystemd) -> None:
    """Why the agent unit leaves ProcSubset= alone: psutil needs these files."""
    facts = _run_in_agent_sandbox(manager, "facts-subset", _SANDBOX_FACTS,
                                  extra=("ProcSubset=pid",))
    assert facts["proc_files"] == {"/proc/cpuinfo": False, "/proc/meminfo": False,
                                   "/proc/stat": False}


def test_inference_runtimes_work_with_memory_deny_write_execute(
    manager: NamespacedSystemd, model_path: Path
) -> None:
    """llama.cpp (GGUF, CPU) and onnxruntime (CPU) under the agent's W^X sandbox."""
    out = _run_in_agent_sandbox(
        manager, "inference", _INFERENCE, "/run/slmfleet-model.gguf",
        extra=(f"BindReadOnlyPaths={model_path}:/run/slmfleet-model.gguf",),
    )
    assert out["onnx"] == [[0, 2, 0, 4, 0, 6, 0, 8]]
    assert out["llama"].strip(), "the model generated text"


class _StateWatcher:
    """The control plane's view of one device: its retained hello and state."""

    def __init__(self, broker: MosquittoBroker, cp: tuple[str, str], device_id: str) -> None:
        self.device_id = device_id
        self.raw = RawClient(broker.url, *cp)
        self.raw.connect()
        self.raw.subscribe(f"{p.TOPIC_ROOT}/{device_id}/#")

    def last(self, kind: p.TopicKind) -> Any:
        for msg in reversed(list(self.raw.messages)):
            if p.parse_topic(msg.topic) == (self.device_id, kind) and msg.payload:
                return p.decode(kind, msg.payload)
        return None

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def agent_unit(manager: NamespacedSystemd, broker: MosquittoBroker, new_device,
               cp_credentials: tuple[str, str]) -> Iterator[_StateWatcher]:
    """The agent unit installed with a config for a fresh device; stopped afterwards."""
    device_id = f"sd-{secrets.token_hex(4)}"
    password = new_device(device_id)
    # The real default state_dir: the unit's StateDirectory= is its only writable path.
    write_agent_config(manager.share, device_id, broker.url, password,
                       state_dir="/var/lib/slmfleet/agent", log_level="INFO")
    (manager.share / "agent.toml").chmod(0o644)
    command = f"{sys.executable} -m slmfleet agent run --config {SHARE}/agent.toml"
    manager.install(AGENT, AGENT_UNIT.read_text(), _dropin(
        command, "agent.log",
        # Short enough to watch the watchdog act within a test.
        "WatchdogSec=1s", "RestartSec=100ms",
    ))
    watcher = _StateWatcher(broker, cp_credentials, device_id)
    try:
        yield watcher
    finally:
        manager.run("systemctl", "stop", AGENT, check=False)
        manager.run("systemctl", "reset-failed", AGENT, check=False)
        watcher.close()


def test_agent_starts_under_its_unit_and_reports_ready(
    manager: NamespacedSystemd, agent_unit: _StateWatcher
) -> None:
    watcher = agent_unit
    # Type=notify: `systemctl start` returns only once the agent sent READY=1.
    started = manager.run("systemctl", "start", AGENT, check=False, timeout=60)
    log = (manager.share / "agent.log").read_text()
    assert started.returncode == 0, f"{started.stderr}\n{log}"
    # READY=1 may come first from the local API serving ("serving locally ...");
    # the status says "connected to broker" once the link is up.
    def show() -> dict[str, str]:
        return manager.show(AGENT, "ActiveState", "SubState", "StatusText", "NRestarts")

    wait_until(lambda: show()["StatusText"] == "connected to broker", 15, "the broker connection")
    assert show() == {"ActiveState": "active", "SubState": "running",
                      "StatusText": "connected to broker", "NRestarts": "0"}

    wait_until(lambda: watcher.last(p.TopicKind.HELLO), 5, "retained hello")
    hello = watcher.last(p.TopicKind.HELLO)
    # The probe saw the real machine through the sandbox.
    assert hello.capabilities.ram_bytes > 0
    assert hello.capabilities.cpu.model
    assert hello.capabilities.disk_free_bytes > 0
    assert hello.simulated is False
    assert watcher.last(p.TopicKind.STATE).state == p.DeviceState.ONLINE

    stopped = manager.run("systemctl", "stop", AGENT, check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert manager.show(AGENT, "Result", "ActiveState") == {"Result": "success",
                                                            "ActiveState": "inactive"}
    wait_until(lambda: watcher.last(p.TopicKind.STATE).state == p.DeviceState.OFFLINE, 5,
          "state=offline after a clean stop")


def test_watchdog_restarts_a_hung_agent(
    manager: NamespacedSystemd, agent_unit: _StateWatcher
) -> None:
    manager.run("systemctl", "start", AGENT, timeout=60)
    # More than a watchdog period passes: the agent keeps feeding it.
    time.sleep(1.5)
    assert manager.show(AGENT, "ActiveState", "NRestarts") == {"ActiveState": "active",
                                                               "NRestarts": "0"}
    hung = manager.show(AGENT, "MainPID")["MainPID"]
    manager.run("kill", f"-{signal.SIGSTOP.value}", hung)
    wait_until(lambda: manager.show(AGENT, "NRestarts")["NRestarts"] == "1", 10,
          "a watchdog restart")
    wait_until(lambda: manager.show(AGENT, "ActiveState")["ActiveState"] == "active", 10,
          "the restarted agent")
    assert manager.show(AGENT, "MainPID")["MainPID"] != hung


def test_controlplane_serves_under_its_unit(
    manager: NamespacedSystemd, broker: MosquittoBroker, cp_credentials: tuple[str, str]
) -> None:
    port = free_port()
    config = manager.share / "controlplane.toml"
    config.write_text(
        f'mqtt_url = "{broker.url}"\n'
        f'mqtt_username = "{cp_credentials[0]}"\n'
        f'mqtt_password = "{cp_credentials[1]}"\n'
        f"api_port = {port}\n"
    )
    config.chmod(0o644)
    unit = CONTROLPLANE_UNIT.name
    command = (f"{sys.executable} -m slmfleet controlplane serve"
               f" --config {SHARE}/controlplane.toml")
    manager.install(unit, CONTROLPLANE_UNIT.read_text(), _dropin(command, "controlplane.log"))
    try:
        manager.run("systemctl", "start", unit)

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(healthy, 30, "the control plane's /healthz")
        except AssertionError:
            raise AssertionError((manager.share / "controlplane.log").read_text()) from None
        manager.run("systemctl", "stop", unit)
        assert manager.show(unit, "Result")["Result"] == "success"
    finally:
        manager.run("systemctl", "stop", unit, check=False)
