"""The agent's local OpenAI-compatible API against the real SmolLM2-135M GGUF.

One real agent process (real Mosquitto, the model seeded as its active
version) serves every test here: the official ``openai`` client streamed
and not, bad input, a full queue, and a worker killed mid-request.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import (
    KeptAlive,
    ready_url,
    serving_rig,
    telemetry,
    worker_pids,
)
from tests.support.updates import DeviceRig, wait_for

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def rig(tmp_path_factory, broker, cp_credentials, model_path: Path) -> Iterator[DeviceRig]:
    work = tmp_path_factory.mktemp("local-api")
    device_id = f"api-{secrets.token_hex(3)}"
    (work / "artifacts").mkdir()
    with (
        ArtifactServer(work / "artifacts") as server,
        serving_rig(work, broker, cp_credentials, device_id, server, model_path, MODEL,
                    inference_max_queue=2, api_max_prompt_chars=4000,
                    heartbeat_interval_s=2.0) as rig,
    ):
        yield rig


@pytest.fixture(scope="module")
def url(rig: DeviceRig) -> str:
    return ready_url(rig)


def test_openai_client_chat_streamed_and_not(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the chemical symbol for water?"}])
    assert "h2o" in reply.choices[0].message.content.lower(), reply
    assert reply.model == f"{MODEL}@1.0.0"
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "What is 2 + 2?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "4" in text or "four" in text.lower(), text
    assert len(chunks) > 3, "streamed piece by piece"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    text_reply = client.completions.create(model=MODEL, prompt="The capital of Germany is",
                                           max_tokens=8, temperature=0)
    assert text_reply.choices[0].text.strip() and text_reply.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_bad_input_gets_a_clear_4xx_and_nothing_breaks(url: str) -> None:
    chat = f"{url}/v1/chat/completions"
    ok_body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}

    r = httpx.post(chat, content=b'{"model": "x", "messages": [', timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(chat, json={**ok_body, "messages": [{"role": "user",
                                                        "content": "x" * 5000}]}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "prompt_too_long"
    r = httpx.post(chat, content=b"x" * (2 << 20), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(chat, json={**ok_body, "model": "gpt-4o"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(chat, json={**ok_body, "max_tokens": -3}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(chat, json={**ok_body, "messages": [{"role": "user",
                                                        "content": "hi " * 1300}],
                               "max_tokens": 1000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
    assert httpx.get(chat, timeout=30).status_code == 405

    # Too many at once: the queue holds 2 waiting behind the one running; the rest get 503.
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = httpx.post(chat, json={**ok_body, "max_tokens": 16}, timeout=120)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    statuses = sorted(r.status_code for r in results)
    assert len(results) == 8 and 200 in statuses and 503 in statuses, statuses
    busy = next(r for r in results if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["code"] == "overloaded"
    assert httpx.post(chat, json=ok_body, timeout=60).status_code == 200, "still serving"


def test_one_connection_serves_request_after_request(url: str) -> None:
    """HTTP/1.1 keep-alive for GETs as well as POSTs: apps that poll /healthz or
    /metrics do not pay a new connection each time."""
    conn = KeptAlive(url)
    try:
        for path in ("/healthz", "/v1/models", "/metrics", "/healthz"):
            status, response = conn.get(path)
            assert status == 200, (path, response.body)
        assert json.loads(response.body)["status"] == "ok"
    finally:
        conn.close()


def test_killed_worker_fails_one_request_cleanly_and_restarts(rig: DeviceRig, url: str) -> None:
    assert rig.agent is not None
    (old,) = worker_pids(rig.agent.pid)
    outcome: list[httpx.Response] = []
    long = threading.Thread(target=lambda: outcome.append(httpx.post(
        f"{url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 400, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}]})))
    long.start()
    wait_for(lambda: "slmfleet_inference_queue_depth" in httpx.get(f"{url}/metrics").text
             and httpx.get(f"{url}/metrics").text.count('outcome="ok"'), 10, "metrics")
    threading.Event().wait(1.0)  # well into the 400-token generation
    os.kill(old, signal.SIGKILL)
    long.join(timeout=120)
    (r,) = outcome
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_crashed", r.text
    assert "killed by SIGKILL" in r.json()["error"]["message"]
    assert r.headers["retry-after"]

    new = wait_for(lambda: [p for p in worker_pids(rig.agent.pid) if p != old], 30,
                   "a new worker")
    assert old not in worker_pids(rig.agent.pid) and new
    after = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"]
    assert rig.agent.proc.poll() is None, "the agent survives its worker"

    crashed = wait_for(lambda: [s for t in telemetry(rig) for s in t.inference if s.crashes],
                       20, "a heartbeat counting the crash")
    assert crashed[0].model == MODEL and crashed[0].version == "1.0.0"
    assert crashed[0].crashes == 1 and crashed[0].ooms == 0
    assert 'slmfleet_inference_worker_restarts_total{model="smollm2-135m",version="1.0.0"} 1' \
        in httpx.get(f"{url}/metrics").text
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok", "one crash is not yet unhealthy"


def test_heartbeat_carries_inference_counters(rig: DeviceRig, url: str) -> None:
    beats = wait_for(lambda: [s for t in telemetry(rig) for s in t.inference
                              if s.requests and s.tokens], 20, "a heartbeat with requests")
    stats = beats[0]
    assert stats.model == MODEL and stats.version == "1.0.0"
    assert stats.latency_p50_ms is not None and stats.latency_p95_ms >= stats.latency_p50_ms
    assert stats.ttft_p50_ms is not None and stats.ttft_p50_ms <= stats.latency_p95_ms
    assert stats.tokens_per_s is not None and stats.tokens_per_s > 0
    text = httpx.get(f"{url}/metrics").text
    labels = 'model="smollm2-135m",version="1.0.0"'
    assert f'slmfleet_inference_ttft_seconds_bucket{{{labels},le="+Inf"}}' in text
    assert 'slmfleet_inference_requests_total{model="smollm2-135m",version="1.0.0",' \
        'outcome="rejected"}' in text
