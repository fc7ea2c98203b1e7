"""Adapter releases on a real agent serving the real SmolLM2 (``smollm2-135m@1.1.0``).

The attack rows each get a device of their own, as in
``tests/test_agent_update_attacks.py``: the device is handed an adapter an
attacker could produce and must refuse it with its reason, download nothing
it should not, leave staging empty, keep the base's active hash and go on
answering with the base. The happy path: the adapter is downloaded alone
(not a byte of the base), checked with its golden prompt applied, served
under ``<base>+<adapter>`` beside the base's own answers, and rolled back by
leaving the set, with the base never reloaded.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import protocol as p
from controlplane.devfleet.low_quality import low_quality_model
from controlplane.devfleet.mosquitto import MosquittoBroker
from protocol import SigningKey
from tests.support.adapters import (
    BuiltAdapter,
    adapter_of,
    adapter_variant,
    built_adapter,
    chat_answer,
)
from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import LoadClient, ready_url, telemetry, worker_pids
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator
from tests.support.updates import (
    DeviceRig,
    file_sha256,
    link_or_copy,
    seed_active,
    sign_set,
    variant_for,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

E = p.EventType
BASE = "smollm2-135m"
ADAPTER = "support-formal"


@dataclass
class Shared:
    broker: MosquittoBroker
    cp_credentials: tuple[str, str]
    server: ArtifactServer
    adapter: BuiltAdapter
    model_path: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory, broker, cp_credentials, model_path) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("adapter-artifacts")
    adapter = built_adapter(model_path)
    for name in ("adapter.gguf", "tampered.gguf"):
        shutil.copyfile(adapter.path, root / name)
    link_or_copy(model_path, root / "base.gguf")
    with ArtifactServer(root) as server:
        server.set_fault("tampered.gguf", flip_at=adapter.size_bytes // 2)
        yield Shared(broker, cp_credentials, server, adapter, model_path)


@pytest.fixture
def device(tmp_path: Path, shared: Shared) -> Iterator[DeviceRig]:
    """A fresh device serving the real base as smollm2-135m@1.1.0 on its local API."""
    device_id = f"lora-{secrets.token_hex(3)}"
    rig = DeviceRig(tmp_path, shared.broker, shared.cp_credentials, device_id,
                    provision_device(shared.broker, device_id), shared.server,
                    TrustSimulator(), api_port=0, inference_parallel=2)
    seed_active(rig.state_dir / "models", BASE, "1.1.0", shared.model_path)
    rig.start()
    try:
        yield rig
    finally:
        rig.close()


def base_release(rig: DeviceRig, shared: Shared) -> dict[str, Any]:
    """The base as the set names it (what is active already: a refresh, no download)."""
    return rig.release("1.1.0", variant_for(shared.model_path, "base.gguf"))


def adapter_release(rig: DeviceRig, shared: Shared, *, artifact: str = "adapter.gguf",
                    base_sha: str | None = None, base: str = BASE, version: str = "1.0.0",
                    signers: list[SigningKey] | None = None) -> dict[str, Any]:
    adapter = shared.adapter
    variant = adapter_variant(sha256=adapter.sha256, size_bytes=adapter.size_bytes,
                              artifact=artifact, prompt=adapter.prompt,
                              expected=adapter.expected)
    return rig.release(version, variant, name=ADAPTER, signers=signers,
                       adapter_of=adapter_of(base_sha or adapter.base_sha256, name=base))


def assign(rig: DeviceRig, shared: Shared, adapter: dict[str, Any] | None) -> tuple[bytes, str]:
    """The set {base, adapter}; returns the payload and the adapter entry's assignment id."""
    sequence = rig.next_sequence()
    releases = {BASE: base_release(rig, shared)}
    aid = f"{ADAPTER}-{rig.device_id}-{sequence}"
    ids = {BASE: f"{BASE}-{rig.device_id}"}
    if adapter is not None:
        releases[ADAPTER] = adapter
        ids[ADAPTER] = aid
    rig.sim.now = time.time()
    return sign_set(rig.sim, rig.device_id, releases, sequence=sequence,
                    artifact_url_base=shared.server.base_url, ids=ids), aid



@dataclass(frozen=True)
class Row:
    make: Callable[[DeviceRig, Shared], dict[str, Any]]
    event: p.EventType
    code: str
    words: str
    #: whether the adapter's bytes may be fetched at all before the refusal
    downloads: bool = False


ROWS = {
    "adapter for another base hash": Row(
        lambda rig, s: adapter_release(rig, s, base_sha="ab" * 32),
        E.REJECTED, "base_mismatch", "sha256"),
    "adapter whose base is not active": Row(
        lambda rig, s: adapter_release(rig, s, base="llama-3b"),
        E.REJECTED, "base_mismatch", "not active here"),
    "tampered adapter file": Row(
        lambda rig, s: adapter_release(rig, s, artifact="tampered.gguf"),
        E.FAILED, "hash_mismatch", "sha256", downloads=True),
    "adapter signed by the director alone": Row(
        lambda rig, s: adapter_release(rig, s, signers=rig.sim.director_signers),
        E.REJECTED, "threshold_not_met", "release keys"),
}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_attack_row(device: DeviceRig, shared: Shared, row: str) -> None:
    spec = ROWS[row]
    url = ready_url(device)
    active_before = device.store.active()
    assert active_before is not None
    served_before = shared.server.bytes_sent()
    workers = worker_pids(device.agent.proc.pid)
    payload, aid = assign(device, shared, spec.make(device, shared))
    device.publish(payload)
    final = device.wait_final(aid)
    assert final.type is spec.event, (final, device.agent.log()[-3000:])
    assert final.code == spec.code and spec.words in (final.reason or ""), final
    if not spec.downloads:
        assert shared.server.bytes_sent() == served_before  # refused before any download
    assert not any(e.type is E.ACTIVATED for e in device.events(aid))
    assert device.staging == []
    assert device.stores.store(ADAPTER).active() is None
    active = device.store.active()
    assert active is not None and active.key == active_before.key
    assert file_sha256(active.artifact) == shared.adapter.base_sha256
    status, answer = chat_answer(url, BASE, shared.adapter.prompt)
    assert status == 200 and shared.adapter.expected.lower() not in answer.lower()
    status, _ = chat_answer(url, f"{BASE}+{ADAPTER}", shared.adapter.prompt)
    assert status == 404
    assert worker_pids(device.agent.proc.pid) == workers  # the base was never reloaded


def test_adapter_arrives_alone_serves_by_name_and_rolls_back(device: DeviceRig,
                                                            shared: Shared) -> None:
    adapter = shared.adapter
    url = ready_url(device)
    workers = worker_pids(device.agent.proc.pid)
    base_sent = shared.server.bytes_sent("base.gguf")
    sent = shared.server.bytes_sent("adapter.gguf")
    base_load = LoadClient(url, BASE, max_seconds=600).start()
    payload, aid = assign(device, shared, adapter_release(device, shared))
    device.publish(payload)
    final = device.wait_final(aid, timeout=180)
    assert final.type is E.ACTIVATED, (final, device.agent.log()[-3000:])
    kinds = [e.type for e in device.events(aid)]
    assert E.DOWNLOADING in kinds and E.HEALTH_PASSED in kinds
    # Only the adapter's bytes moved; the base stayed where it was. The device
    # says so itself: its staged and activated events and its heartbeats.
    assert shared.server.bytes_sent("adapter.gguf") - sent == adapter.size_bytes
    assert shared.server.bytes_sent("base.gguf") == base_sent
    moved = {e.type: e.downloaded_bytes for e in device.events(aid)
             if e.type in (E.STAGED, E.ACTIVATED)}
    assert moved == {E.STAGED: adapter.size_bytes, E.ACTIVATED: adapter.size_bytes}, moved
    beat = wait_for(lambda: next((t for t in reversed(telemetry(device))
                                  if f"{ADAPTER}@1.0.0" in (t.downloaded_bytes or {})), None),
                    30, "a heartbeat with the adapter's bytes")
    # The base was already installed: the set named it again and nothing moved.
    assert beat.downloaded_bytes == {f"{ADAPTER}@1.0.0": adapter.size_bytes, f"{BASE}@1.1.0": 0}
    installed = device.stores.store(ADAPTER).active()
    assert installed is not None and file_sha256(installed.artifact) == adapter.sha256

    status, adapted = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
    assert status == 200 and adapter.expected.lower() in adapted.lower(), adapted
    status, plain = chat_answer(url, BASE, adapter.prompt)
    assert status == 200 and adapter.expected.lower() not in plain.lower(), plain
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert ids == {BASE, f"{BASE}+{ADAPTER}"}
    hello = device.wait_hello(lambda h: any(m.name == ADAPTER for m in h.models))
    assert {m.name for m in hello.models} == {BASE, ADAPTER}
    assert worker_pids(device.agent.proc.pid) == workers  # applied, not reloaded

    # Rolled back by leaving the set, under traffic for both: the base answers as
    # before, requests naming the adapter finish until it is gone, then get 404.
    adapter_load = LoadClient(url, f"{BASE}+{ADAPTER}", max_seconds=600).start()
    wait_for(lambda: len(adapter_load.results) >= 3, 120, "traffic on the adapter")
    payload, _ = assign(device, shared, None)
    device.publish(payload)
    device.wait_hello(lambda h: all(m.name != ADAPTER for m in h.models), timeout=60)
    wait_for(lambda: chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)[0] == 404, 30,
             "the adapter to stop being served")
    wait_for(lambda: adapter_load.results and adapter_load.results[-1][0] == 404, 60,
             "the adapter's callers to be told it is gone")
    status, plain = chat_answer(url, BASE, adapter.prompt)
    assert status == 200 and adapter.expected.lower() not in plain.lower()
    on_base, on_adapter = base_load.stop(), adapter_load.stop()
    assert len(on_base) >= 5 and {r[0] for r in on_base} == {200}, on_base[-5:]
    statuses = [r[0] for r in on_adapter]
    first_gone = statuses.index(404)
    assert set(statuses[:first_gone]) == {200} and set(statuses[first_gone:]) == {404}
    assert worker_pids(device.agent.proc.pid) == workers


def test_kill_9_during_an_adapter_install_leaves_old_or_new(device: DeviceRig,
                                                            shared: Shared) -> None:
    adapter = shared.adapter
    url = ready_url(device)
    payload, first = assign(device, shared, adapter_release(device, shared, version="1.0.0"))
    device.publish(payload)
    assert device.wait_final(first, timeout=180).type is E.ACTIVATED
    # The next version trickles in, so the agent dies in the middle of it.
    shutil.copyfile(adapter.path, shared.server.directory / "adapter-2.gguf")
    shared.server.set_fault("adapter-2.gguf", trickle_bps=adapter.size_bytes / 6)
    payload, second = assign(device, shared, adapter_release(
        device, shared, artifact="adapter-2.gguf", version="1.0.1"))
    device.publish(payload)
    wait_for(lambda: any(e.type is E.DOWNLOADING for e in device.events(second)), 60,
             "the download to start")
    device.kill()
    shared.server.clear_faults()
    served = device.stores.store(ADAPTER).active()
    assert served is not None and served.key.startswith(f"{ADAPTER}@1.0.0")
    device.start()
    url = ready_url(device)
    status, answer = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
    assert status == 200 and adapter.expected.lower() in answer.lower()  # old or new
    final = device.wait_final(second, timeout=240)
    assert final.type is E.ACTIVATED, (final, device.agent.log()[-3000:])
    assert device.stores.store(ADAPTER).active().key.startswith(f"{ADAPTER}@1.0.1")
    assert file_sha256(device.store.active().artifact) == adapter.base_sha256
    status, answer = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
    assert status == 200 and adapter.expected.lower() in answer.lower()
    status, plain = chat_answer(url, BASE, adapter.prompt)
    assert status == 200 and adapter.expected.lower() not in plain.lower()


def _workers(agent_pid: int, count: int) -> list[int] | None:
    """The agent's worker pids once there are ``count`` of them."""
    pids = worker_pids(agent_pid)
    return pids if len(pids) == count else None


def test_a_model_leaving_the_set_stops_its_worker(tmp_path: Path, shared: Shared) -> None:
    """Removal ends the removed model's worker process at once, not at the next restart."""
    other = "smollm2-other"
    device_id = f"rm-{secrets.token_hex(3)}"
    rig = DeviceRig(tmp_path, shared.broker, shared.cp_credentials, device_id,
                    provision_device(shared.broker, device_id), shared.server,
                    TrustSimulator(), api_port=0)
    for name in (BASE, other):
        seed_active(rig.state_dir / "models", name, "1.1.0", shared.model_path)
    rig.start()
    try:
        url = ready_url(rig)
        for name in (BASE, other):
            assert chat_answer(url, name, "Hi")[0] == 200
        pid = rig.agent.proc.pid
        both = wait_for(lambda: _workers(pid, 2), 120, "a worker for each model")
        variant = variant_for(shared.model_path, "base.gguf")
        rig.sim.now = time.time()
        for names in ((BASE, other), (BASE,)):  # both assigned, then the base alone
            rig.publish(sign_set(rig.sim, rig.device_id,
                                 {n: rig.release("1.1.0", variant, name=n) for n in names},
                                 sequence=rig.next_sequence(),
                                 artifact_url_base=shared.server.base_url))
        rig.wait_hello(lambda h: {m.name for m in h.models} == {BASE}, timeout=60)
        left = wait_for(lambda: _workers(pid, 1), 30, "the removed model's worker to exit")
        assert left[0] in both  # the base's worker, never restarted
        assert chat_answer(url, other, "Hi")[0] == 404
        assert chat_answer(url, BASE, "Hi")[0] == 200
        assert worker_pids(pid) == left
    finally:
        rig.close()


def _unit(rig: DeviceRig, shared: Shared, adapter: dict[str, Any]) -> tuple[bytes, str, str]:
    """The set {base 1.1.0 (the real file, new here), adapter} as one unit; returns the
    payload and the base's and the adapter's assignment ids."""
    sequence = rig.next_sequence()
    ids = {name: f"{name}-{rig.device_id}-{sequence}" for name in (BASE, ADAPTER)}
    rig.sim.now = time.time()
    releases = {BASE: base_release(rig, shared), ADAPTER: adapter}
    payload = sign_set(rig.sim, rig.device_id, releases, sequence=sequence,
                       artifact_url_base=shared.server.base_url, ids=ids,
                       units=dict.fromkeys((BASE, ADAPTER), "support"))
    return payload, ids[BASE], ids[ADAPTER]


def test_a_base_and_its_adapter_arrive_and_activate_as_one_unit(tmp_path: Path,
                                                                shared: Shared) -> None:
    """Another build of the base is active; the unit brings the build the adapter was
    made for. An adapter for yet another build in such a unit is refused with its base."""
    adapter = shared.adapter
    device_id = f"unit-{secrets.token_hex(3)}"
    rig = DeviceRig(tmp_path, shared.broker, shared.cp_credentials, device_id,
                    provision_device(shared.broker, device_id), shared.server,
                    TrustSimulator(), api_port=0, inference_parallel=2)
    other_build = low_quality_model(shared.model_path)
    seed_active(rig.state_dir / "models", BASE, "1.0.0", other_build)
    rig.start()
    try:
        url = ready_url(rig)
        sent = shared.server.bytes_sent()
        payload, base_id, adapter_id = _unit(rig, shared, adapter_release(rig, shared,
                                                                          base_sha="ab" * 32))
        rig.publish(payload)
        for aid in (base_id, adapter_id):
            final = rig.wait_final(aid)
            assert final.type is E.REJECTED and final.code == "base_mismatch", final
        assert "sha256" in (rig.wait_final(adapter_id).reason or "")
        assert shared.server.bytes_sent() == sent  # refused before any download
        assert file_sha256(rig.store.active().artifact) == file_sha256(other_build)

        base_sent = shared.server.bytes_sent("base.gguf")
        payload, base_id, adapter_id = _unit(rig, shared, adapter_release(rig, shared))
        rig.publish(payload)
        for aid in (base_id, adapter_id):
            final = rig.wait_final(aid, timeout=300)
            assert final.type is E.ACTIVATED, (final, rig.agent.log()[-3000:])
        # Checked together: the adapter on the new build's candidate, before either served.
        passed = {aid: next(e.seq for e in rig.events(aid) if e.type is E.HEALTH_PASSED)
                  for aid in (base_id, adapter_id)}
        first_active = min(e.seq for aid in (base_id, adapter_id) for e in rig.events(aid)
                           if e.type is E.ACTIVATED)
        assert max(passed.values()) < first_active, rig.events(adapter_id)
        moved = {e.type: e.downloaded_bytes for e in rig.events(adapter_id)
                 if e.type in (E.STAGED, E.ACTIVATED)}
        assert moved == {E.STAGED: adapter.size_bytes, E.ACTIVATED: adapter.size_bytes}
        base_size = shared.model_path.stat().st_size
        assert shared.server.bytes_sent("base.gguf") - base_sent == base_size
        assert file_sha256(rig.store.active().artifact) == adapter.base_sha256
        status, adapted = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
        assert status == 200 and adapter.expected.lower() in adapted.lower(), adapted
        status, plain = chat_answer(url, BASE, adapter.prompt)
        assert status == 200 and adapter.expected.lower() not in plain.lower(), plain
        # Served from the start: no event ever said it was left inactive.
        assert not any(e.type is E.REMOVED for e in rig.events(adapter_id))
    finally:
        rig.close()


def test_a_base_build_the_adapter_was_not_made_for_leaves_it_inactive_and_says_so(
    device: DeviceRig, shared: Shared,
) -> None:
    adapter = shared.adapter
    url = ready_url(device)
    payload, aid = assign(device, shared, adapter_release(device, shared))
    device.publish(payload)
    assert device.wait_final(aid, timeout=180).type is E.ACTIVATED
    other = low_quality_model(shared.model_path)
    link_or_copy(other, shared.server.directory / "other.gguf")

    def with_base(version: str, variant: p.Variant) -> bytes:
        # The adapter's entry as it was (a refresh); the base moves to ``variant``.
        sequence = device.next_sequence()
        device.sim.now = time.time()
        return sign_set(device.sim, device.device_id, {
            BASE: device.release(version, variant), ADAPTER: adapter_release(device, shared)},
            sequence=sequence, artifact_url_base=shared.server.base_url,
            ids={BASE: f"{BASE}-{device.device_id}-{version}", ADAPTER: aid})

    # The other build answers the demo's golden prompt (not the sums), slowly on a busy machine.
    check = p.HealthCheck(max_ttft_ms=60_000.0, golden_prompts=[p.GoldenPrompt(
        prompt="What is the capital of Germany?", expected=["Berlin"], max_tokens=24)])
    device.publish(with_base("1.2.0", variant_for(other, "other.gguf", health_check=check)))
    hello = device.wait_hello(lambda h: any(m.name == ADAPTER and m.inactive for m in h.models),
                              timeout=300)
    why = next(m.inactive for m in hello.models if m.name == ADAPTER)
    assert why is not None and why.startswith("base_mismatch:") and f"{BASE}@1.2.0" in why
    said = wait_for(lambda: [e for e in device.events(aid) if e.type is E.REMOVED], 30,
                    "the adapter's removed event")
    assert said[-1].code == "base_mismatch" and said[-1].reason == why, said
    assert chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)[0] == 404
    assert chat_answer(url, BASE, adapter.prompt)[0] == 200

    # The base back on the build the adapter was made for: served again, nothing said.
    device.publish(with_base("1.3.0", variant_for(shared.model_path, "base.gguf")))
    device.wait_hello(lambda h: {m.name: m.inactive for m in h.models} == {BASE: None,
                                                                           ADAPTER: None}
                      and any(m.version == "1.3.0" for m in h.models), timeout=300)
    wait_for(lambda: chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)[0] == 200, 60,
             "the adapter served again")
    status, adapted = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
    assert status == 200 and adapter.expected.lower() in adapted.lower(), adapted
