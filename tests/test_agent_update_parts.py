"""The update pipeline's parts on their own: pinned keys and rotation, the GGUF
tokenizer fingerprint, the event spool, the persisted record, runtime
settings, and the health-check subprocess boundary."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import protocol as p
from agent.atomic import write_bytes_atomic
from agent.config import AgentConfig
from agent.events import EventLog
from agent.gguf import GgufError, read_metadata_entries, tokenizer_sha256
from agent.healthcheck import HealthAborted, HealthRequest, SubprocessHealthChecker
from agent.profiles import RuntimeSettings
from agent.runtime_settings import EffectiveRuntime, effective_runtime
from agent.trust import TrustUnavailable, load_pinned, load_trust, rotation_path
from agent.update.state import (
    DocumentRecord,
    EntryRecord,
    StateCorrupt,
    UpdateFile,
    UpdateStateStore,
)
from protocol import HealthCheck, RuntimeDefaults
from tests.support.signer import TrustSimulator, make_variant
from tests.support.updates import pinned_file, write_trust

# --- pinned keys and rotation ------------------------------------------------


def _config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(device_id="dev-1", state_dir=tmp_path / "state")


def test_missing_or_invalid_key_file_names_the_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with pytest.raises(TrustUnavailable, match=r"release key file .*release-keys\.json is missing"):
        load_trust(config)
    sim = TrustSimulator()
    write_trust(config.state_dir, sim)
    config.director_keys_path.write_text("{not json")
    with pytest.raises(TrustUnavailable, match=r"director key file .*-keys\.json is invalid"):
        load_trust(config)
    # A release list pinned as the director list is the wrong role.
    config.director_keys_path.write_bytes(pinned_file(sim.release_keys, sim.release_signers))
    with pytest.raises(TrustUnavailable, match="invalid"):
        load_trust(config)


def test_lists_sharing_a_key_are_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sim = TrustSimulator()
    write_trust(config.state_dir, sim)
    shared = p.KeyList.of("director", [sim.release_signers[0].public])
    config.director_keys_path.write_bytes(pinned_file(shared, sim.release_signers))
    with pytest.raises(TrustUnavailable, match="share a key"):
        load_trust(config)


def test_rotations_are_adopted_in_order_and_persisted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    sim = TrustSimulator(release_threshold=2, n_release_keys=3)
    write_trust(config.state_dir, sim)
    pinned = config.release_keys_path
    for _ in range(2):
        rotation = sim.rotate("release", n_keys=2, threshold=2)
        rotation_path(pinned, rotation.key_list.version).write_bytes(rotation.payload)
        sim.adopt(rotation)

    trust = load_trust(config)
    assert trust.release == sim.release_keys and trust.release.version == 3
    # The pinned file now holds v3 itself: a later start begins there.
    assert p.verify_pinned_key_list(pinned.read_bytes(), "release").version == 3
    assert load_pinned(pinned, "release").version == 3


def test_a_bad_rotation_is_skipped_and_the_pinned_list_kept(tmp_path: Path, caplog) -> None:
    config = _config(tmp_path)
    sim = TrustSimulator()
    write_trust(config.state_dir, sim)
    before = config.director_keys_path.read_bytes()
    # Signed by the new keys only: whoever made it does not hold the old ones.
    forged = sim.rotate("director", sign_with_old=0)
    rotation_path(config.director_keys_path, 2).write_bytes(forged.payload)

    trust = load_trust(config)
    assert trust.director.version == 1 and trust.director == sim.director_keys
    assert config.director_keys_path.read_bytes() == before
    assert "ignoring director key rotation" in caplog.text


# --- GGUF tokenizer fingerprint --------------------------------------------------


def test_tokenizer_fingerprint_of_the_real_model(model_path: Path, tmp_path: Path) -> None:
    entries = read_metadata_entries(model_path)
    assert "tokenizer.ggml.tokens" in entries and "general.architecture" in entries
    digest = tokenizer_sha256(model_path)
    assert digest is not None and len(digest) == 64

    # Same tokenizer, other weights: same fingerprint. One token changed: another.
    data = bytearray(model_path.read_bytes())
    tail = tmp_path / "other-weights.gguf"
    tail.write_bytes(bytes(data[:-16]) + bytes(b ^ 0xFF for b in data[-16:]))
    assert tokenizer_sha256(tail) == digest
    at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 24
    data[at] ^= 1
    swapped = tmp_path / "swapped.gguf"
    swapped.write_bytes(bytes(data))
    assert tokenizer_sha256(swapped) != digest


def test_gguf_reader_refuses_what_it_does_not_understand(tmp_path: Path, model_path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(GgufError, match="not a GGUF"):
        read_metadata_entries(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:4096])
    with pytest.raises(GgufError, match="ends inside"):
        read_metadata_entries(cut)
    huge = tmp_path / "huge.gguf"
    counts = bytes(8) + (1 << 40).to_bytes(8, "little")  # no tensors, 2**40 metadata entries
    huge.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + counts)
    with pytest.raises(GgufError, match="metadata entries"):
        read_metadata_entries(huge)


# --- event spool -------------------------------------------------------------------


def test_event_seq_survives_restarts_and_delivery_is_in_order(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events", "dev-1")
    for _ in range(3):
        log.emit(p.EventType.RECEIVED, "a-1")
    assert log.pending == 3
    # A restart: the numbers go on, the undelivered events are still there.
    log = EventLog(tmp_path / "events", "dev-1")
    assert log.next_seq == 4 and log.pending == 3
    log.emit(p.EventType.FAILED, "a-1", reason="why")

    sent: list[p.Event] = []
    online = False

    async def publish(payload: bytes) -> bool:
        if not online:
            return False
        sent.append(p.decode(p.TopicKind.EVENTS, payload))
        return True

    async def deliver() -> None:
        nonlocal online
        task = asyncio.create_task(log.run(publish))
        assert not await log.wait_delivered(0.2)  # offline: nothing goes
        online = True
        log.kick()  # what the link does on connect
        assert await log.wait_delivered(2)
        task.cancel()

    asyncio.run(deliver())
    assert [e.seq for e in sent] == [1, 2, 3, 4]
    assert sent[-1].reason == "why" and sent[-1].type == p.EventType.FAILED
    assert EventLog(tmp_path / "events", "dev-1").pending == 0


def test_full_spool_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events", "dev-1", max_spooled=10)
    for i in range(25):
        log.emit(p.EventType.DOWNLOADING, "a-1", progress_pct=float(i))
    assert log.pending == 10 and log.dropped == 15
    spooled = sorted((tmp_path / "events" / "spool").iterdir())
    assert [int(f.stem) for f in spooled] == list(range(16, 26))
    again = EventLog(tmp_path / "events", "dev-1", max_spooled=10)
    assert again.dropped == 15 and again.next_seq == 26


def test_event_counter_lost_in_a_crash_continues_from_the_spool(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events", "dev-1")
    log.emit(p.EventType.RECEIVED, "a-1")
    log.emit(p.EventType.VERIFIED, "a-1")
    # Killed between spooling event 2 and writing the counter.
    write_bytes_atomic(tmp_path / "events" / "meta.json", b'{"next_seq": 2, "dropped": 0}')
    assert EventLog(tmp_path / "events", "dev-1").next_seq == 3


# --- the persisted record ------------------------------------------------------------


def _record(**overrides) -> EntryRecord:
    fields = {
        "name": "m", "update_id": "u1", "assignment_id": "a-1", "sequence": 7,
        "ref": "m@1.0.0", "tier": p.Tier.MICRO, "key": "m@1.0.0-micro", "sha256": "0" * 64,
        "state": p.UpdateState.DOWNLOADING, "ts": 1.0,
    }
    fields.update(overrides)
    return EntryRecord(**fields)


def test_update_record_round_trips_and_corruption_is_not_papered_over(tmp_path: Path) -> None:
    store = UpdateStateStore(tmp_path / "update" / "state.json")
    assert store.load() == UpdateFile()
    document = DocumentRecord(sequence=7, payload="{}", payload_sha256="1" * 64, accepted_at=1.0)
    state = UpdateFile(highest_sequence=7, document=document, models={
        "m": _record(), "e": _record(name="e", key="e@1.0.0-micro", ref="e@1.0.0",
                                     state=p.UpdateState.ACTIVATED)})
    store.save(state)
    assert store.load() == state
    assert json.loads(store.path.read_text())["schema"] == "slmfleet.agent-update/2"
    assert [r.name for r in store.load().pending()] == ["m"]

    store.path.write_text('{"highest_sequence": "lots"}')
    with pytest.raises(StateCorrupt, match="invalid"):
        store.load()
    store.path.write_bytes(b"\x00garbage")
    with pytest.raises(StateCorrupt, match="unreadable"):
        store.load()


# --- runtime settings ----------------------------------------------------------------


def test_profile_settings_override_variant_defaults() -> None:
    variant = make_variant(runtime_defaults=RuntimeDefaults(threads=1, context=4096, batch=64,
                                                            gpu_layers=10, mmap=False))
    merged = effective_runtime(RuntimeSettings(), variant)
    assert merged == EffectiveRuntime(threads=1, gpu_layers=10, batch=64, context=4096,
                                      mmap=False, embeddings=False)
    pi = RuntimeSettings(threads=4, gpu_layers=0, context_cap=2048, batch=256, mmap=True)
    merged = effective_runtime(pi, variant)
    assert merged.gpu_layers == 0 and merged.batch == 256 and merged.mmap is True
    assert merged.context == 2048
    # Never more threads than this machine has, whatever a (simulated) profile says.
    assert merged.threads == min(4, len(os.sched_getaffinity(0)))


# --- the health-check subprocess boundary ------------------------------------------------


def _request(tmp_path: Path) -> HealthRequest:
    return HealthRequest(
        model=tmp_path / "model", format="gguf",
        runtime=EffectiveRuntime(1, 0, None, 512, True, False),
        spec=HealthCheck(golden_prompts=[], max_ttft_ms=100.0),
    )


def _run(checker: SubprocessHealthChecker, request: HealthRequest, abort_after: float | None):
    async def go():
        abort = asyncio.Event()
        if abort_after is not None:
            asyncio.get_running_loop().call_later(abort_after, abort.set)
        return await checker.check(request, abort)

    return asyncio.run(go())


def test_health_check_verdicts_timeouts_and_crashes(tmp_path: Path) -> None:
    request = _request(tmp_path)
    ok = SubprocessHealthChecker(10, ["sh", "-c", 'cat >/dev/null; echo \'{"passed": true, '
                                      '"reasons": [], "load_ms": 5}\''])
    result = _run(ok, request, None)
    assert result.passed and result.details == {"load_ms": 5}

    slow = SubprocessHealthChecker(0.3, ["sh", "-c", "exec sleep 30"])
    result = _run(slow, request, None)
    assert not result.passed and result.reasons == ["health check timed out after 0.3 s"]

    with pytest.raises(HealthAborted):
        _run(SubprocessHealthChecker(10, ["sh", "-c", "exec sleep 30"]), request, 0.2)

    crash = SubprocessHealthChecker(10, ["sh", "-c", "echo 'ggml: out of memory' >&2; kill -9 $$"])
    result = _run(crash, request, None)
    assert not result.passed
    assert result.reasons[0].startswith("health check crashed (exit -9): ggml: out of memory")

    garbage = SubprocessHealthChecker(10, ["sh", "-c", "echo hello"])
    assert "no readable result" in _run(garbage, request, None).reason


def test_real_health_check_of_a_missing_model_fails_cleanly(tmp_path: Path) -> None:
    result = _run(SubprocessHealthChecker(60), _request(tmp_path), None)
    assert not result.passed
    assert result.reason.startswith("model does not load"), result.reason
