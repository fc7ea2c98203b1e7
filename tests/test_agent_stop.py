"""Stopping an agent that is answering local requests, the way its supervisors do.

systemd's default KillMode=control-group and Ctrl-C in a terminal signal the
agent and its inference workers at once. The agent decides when its workers
stop: the request being answered finishes, a new request is told the agent
is stopping, and nothing is reported as a crash.
"""

from __future__ import annotations

import json
import secrets
import signal
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import KeptAlive, ready_url, worker_pids
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator
from tests.support.updates import DeviceRig, seed_active, wait_for

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemd", "ctrl-c"])
def test_the_request_being_answered_finishes_and_a_new_one_is_told_to_retry(
    tmp_path: Path, broker, cp_credentials, model_path: Path, sig: signal.Signals
) -> None:
    device_id = f"stop-{secrets.token_hex(3)}"
    (tmp_path / "artifacts").mkdir()
    with ArtifactServer(tmp_path / "artifacts") as server:
        rig = DeviceRig(tmp_path, broker, cp_credentials, device_id,
                        provision_device(broker, device_id), server, TrustSimulator(),
                        api_port=0)
        seed_active(rig.state_dir / "models", MODEL, "1.0.0", model_path)
        rig.start()
        try:
            url = ready_url(rig)
            assert rig.agent is not None
            workers = worker_pids(rig.agent.pid)
            kept_alive = KeptAlive(url)
            assert kept_alive.get("/v1/models")[0] == 200

            first_token = threading.Event()
            chunks: list[dict] = []

            def stream() -> None:
                body = {"model": MODEL, "max_tokens": 120, "temperature": 0, "stream": True,
                        "messages": [{"role": "user", "content": "Tell a long dragon story."}]}
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                                  timeout=60) as response:
                    assert response.status_code == 200
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            chunks.append(json.loads(line.removeprefix("data: ")))
                            first_token.set()

            streaming = threading.Thread(target=stream)
            streaming.start()
            assert first_token.wait(30), "no first token"

            stopping = threading.Thread(target=rig.agent.terminate_group, args=(sig, 30))
            stopping.start()

            def listener_closed() -> bool:
                try:
                    httpx.get(f"{url}/healthz", timeout=5)
                except httpx.ConnectError:
                    return True
                return False

            wait_for(listener_closed, 10, "the agent to stop listening")
            status, refused = kept_alive.get("/v1/models")
            assert status == 503, refused
            assert json.loads(refused.body)["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"] == "5"

            streaming.join(60)
            stopping.join(60)
            kept_alive.close()
            finish = [c["choices"][0]["finish_reason"] for c in chunks
                      if c["choices"][0].get("finish_reason")]
            assert finish == ["length"], "the request ran to its end"
            assert rig.agent.proc.returncode == 0
            log = rig.agent.log()
            assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
            assert "killed by" not in log, "no worker was reported dead"
            assert workers and not any(psutil.pid_exists(pid) for pid in workers), \
                "the agent stopped its workers before it exited"
        finally:
            rig.close()
