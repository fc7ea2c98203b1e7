"""The agent's update pipeline end to end: real Mosquitto, real agent processes,
the real SmolLM2-135M GGUF over real HTTP, signed by an honest control-plane
simulator. Happy path, re-signing, rollback, resume, a trickling server, a
model that fails its health check, and a device without trust files."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import protocol as p
from agent.gguf import tokenizer_sha256
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support.http_artifacts import ArtifactServer
from tests.support.signer import TrustSimulator
from tests.support.updates import (
    FAILING_PROMPT,
    PASSING_PROMPTS,
    DeviceRig,
    file_sha256,
    link_or_copy,
    seed_active,
    variant_for,
    wait_for,
)

pytestmark = pytest.mark.integration

GGUF = "smollm2.gguf"
E = p.EventType


@pytest.fixture
def server(tmp_path: Path, model_path: Path) -> Iterator[ArtifactServer]:
    root = tmp_path / "artifacts"
    link_or_copy(model_path, root / GGUF)
    (root / "tiny.bin").write_bytes(secrets.token_bytes(64 * 1024))
    with ArtifactServer(root) as s:
        yield s


@pytest.fixture
def make_rig(
    tmp_path, broker, cp_credentials, new_device, server
) -> Iterator[Callable[..., DeviceRig]]:
    rigs: list[DeviceRig] = []

    def make(**agent_extra) -> DeviceRig:
        device_id = f"upd-{secrets.token_hex(3)}"
        rig = DeviceRig(tmp_path / device_id, broker, cp_credentials, device_id,
                        new_device(device_id), server, TrustSimulator(), **agent_extra)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def _types(events: list[p.Event]) -> list[p.EventType]:
    """Event types with consecutive `downloading` progress collapsed into one."""
    out: list[p.EventType] = []
    for e in events:
        if not (out and out[-1] == e.type == E.DOWNLOADING):
            out.append(e.type)
    return out


def test_assignment_activates_model_and_reports_every_step(make_rig, server, model_path) -> None:
    rig = make_rig()
    rig.start()
    variant = variant_for(server.directory / GGUF, GGUF,
                          tokenizer_sha256=tokenizer_sha256(model_path))
    release = rig.release("1.0.0", variant)
    payload = rig.assign(release)
    aid = f"a-{rig.device_id}-1"
    rig.publish(payload)

    final = rig.wait_final(aid)
    assert final.type == E.ACTIVATED, final
    events = rig.events(aid)
    assert _types(events) == [E.RECEIVED, E.VERIFIED, E.FIT_CHECKED, E.DOWNLOADING, E.STAGED,
                              E.HEALTH_PASSED, E.ACTIVATED]
    seqs = [e.seq for e in rig.events()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    progress = [e.progress_pct for e in events if e.type == E.DOWNLOADING]
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert len(progress) <= 11, "progress is rate-limited to one event per 10 %"

    hello = rig.wait_hello(lambda h: h.update is not None and h.update.state.is_final)
    assert hello.speaks_sets
    assert hello.active_models() == [p.ActiveModel(name="smollm2-135m", version="1.0.0",
                                                   tier=p.Tier.MICRO, sha256=variant.sha256)]
    [entry] = hello.model_updates()
    assert (entry.model, entry.assignment_id, entry.state) == (
        "smollm2-135m", aid, p.UpdateState.ACTIVATED)
    assert hello.update.state == p.UpdateState.ACTIVATED
    assert hello.update.sequence == 1 and hello.update.assignment_id == aid
    assert hello.update.ref == "smollm2-135m@1.0.0"
    assert rig.active() == ("smollm2-135m@1.0.0-micro", variant.sha256)
    assert rig.staging == []


def test_resign_refreshes_and_rollback_reuses_previous(make_rig, server) -> None:
    rig = make_rig()
    rig.start()
    v1 = rig.release("1.0.0", variant_for(server.directory / GGUF, GGUF))
    first = rig.assign(v1, sequence=1, assignment_id="roll-1")
    rig.publish(first)
    final = rig.wait_final("roll-1")
    assert final.type == E.ACTIVATED, (final, rig.agent.log()[-3000:])
    served, reported = len(server.requests(GGUF)), len(rig.events("roll-1"))

    # The director re-signs before expiry: same id, release and tier, higher sequence.
    rig.publish(rig.assign(v1, sequence=2, assignment_id="roll-1"))
    hello = rig.wait_hello(lambda h: h.update is not None and h.update.sequence == 2)
    assert hello.update.state == p.UpdateState.ACTIVATED
    assert len(rig.events("roll-1")) == reported, "a refresh reports no new steps"
    assert len(server.requests(GGUF)) == served, "a refresh downloads nothing"

    v2 = rig.release("1.1.0", variant_for(server.directory / GGUF, GGUF))
    rig.publish(rig.assign(v2, sequence=3, assignment_id="roll-2"))
    final = rig.wait_final("roll-2")
    assert final.type == E.ACTIVATED, (final, rig.agent.log()[-3000:])
    assert rig.store.previous().key == "smollm2-135m@1.0.0-micro"
    served = len(server.requests(GGUF))

    # Rolling back is a new assignment with a higher sequence; 1.0.0 is still `previous`.
    rig.publish(rig.assign(v1, sequence=4, assignment_id="roll-3"))
    final = rig.wait_final("roll-3")
    assert final.type == E.ACTIVATED, (final, rig.agent.log()[-3000:])
    assert _types(rig.events("roll-3")) == [E.RECEIVED, E.VERIFIED, E.FIT_CHECKED, E.STAGED,
                                            E.HEALTH_PASSED, E.ACTIVATED]
    assert len(server.requests(GGUF)) == served, "the previous version is reused, not fetched"
    assert rig.active()[0] == "smollm2-135m@1.0.0-micro"
    assert rig.store.previous().key == "smollm2-135m@1.1.0-micro"


def test_download_cut_at_half_resumes_with_range(make_rig, server) -> None:
    rig = make_rig()
    size = (server.directory / GGUF).stat().st_size
    cut = size // 2
    server.set_fault(GGUF, cut_after=cut, times=1)
    rig.start()
    rig.publish(rig.assign(rig.release("1.0.0", variant_for(server.directory / GGUF, GGUF))))
    assert rig.wait_final(f"a-{rig.device_id}-1").type == E.ACTIVATED

    requests = server.requests(GGUF)
    assert [r.range for r in requests] == [None, f"bytes={cut}-"]
    assert requests[0].sent == cut
    assert server.bytes_sent(GGUF) == size, "the second request fetched only the missing half"
    assert rig.staging == []


def test_trickling_server_is_abandoned_with_a_reason(make_rig, server) -> None:
    rig = make_rig(download_min_bytes_per_s=1000.0, download_stall_window_s=1.5,
                   download_attempts=2)
    old = seed_active(rig.state_dir / "models", "seed", "0.1.0", server.directory / "tiny.bin")
    server.set_fault("tiny.bin", trickle_bps=1)
    rig.start()
    variant = variant_for(server.directory / "tiny.bin", "tiny.bin")
    rig.publish(rig.assign(rig.release("2.0.0", variant)))

    final = rig.wait_final(f"a-{rig.device_id}-1", timeout=30)
    assert final.type == E.FAILED
    assert final.reason.startswith("too_slow: download too slow"), final.reason
    assert "need >= 1000 B/s" in final.reason
    assert len(server.requests("tiny.bin")) == 2, "retried once, then abandoned"
    assert rig.staging == []
    assert rig.active("seed")[0] == old


def test_failing_health_check_never_activates(make_rig, server) -> None:
    """...and a device upgraded from the single-store layout keeps serving its model."""
    rig = make_rig()
    old = seed_active(rig.state_dir / "models", "seed", "0.1.0", server.directory / "tiny.bin",
                      legacy=True)
    old_sha = file_sha256(server.directory / "tiny.bin")
    rig.start()
    assert rig.active("seed") == (old, old_sha), "moved into its name's store"
    assert not rig.stores.legacy()
    variant = variant_for(server.directory / GGUF, GGUF, prompts=[FAILING_PROMPT])
    rig.publish(rig.assign(rig.release("1.0.0", variant)))
    aid = f"a-{rig.device_id}-1"

    final = rig.wait_final(aid)
    assert final.type == E.FAILED
    events = rig.events(aid)
    assert _types(events)[-3:] == [E.STAGED, E.HEALTH_FAILED, E.FAILED]
    health = next(e for e in events if e.type == E.HEALTH_FAILED)
    assert "contains none of ['paris']" in health.reason, health.reason
    assert final.reason.startswith("health_failed: prompt 1: answer")
    assert E.ACTIVATED not in {e.type for e in events}
    assert rig.active("seed") == (old, old_sha), "the previous model keeps serving"

    hello = rig.wait_hello(lambda h: h.update is not None and h.update.state.is_final)
    assert hello.update.state == p.UpdateState.FAILED
    assert [(m.name, m.sha256) for m in hello.active_models()] == [("seed", old_sha)]
    assert rig.staging == []


def test_without_trust_files_the_agent_joins_but_refuses(make_rig, server) -> None:
    rig = make_rig()
    missing = rig.state_dir / "trust" / "director-keys.json"
    missing.unlink()
    rig.start()
    hello = rig.wait_hello(lambda h: True)
    assert hello.update is None and hello.active_models() == []
    rig.publish(rig.assign(rig.release("1.0.0", variant_for(server.directory / GGUF, GGUF))))

    final = rig.wait_final(f"a-{rig.device_id}-1", timeout=20)
    assert final.type == E.REJECTED
    assert final.reason.startswith("keys_unavailable: director key file")
    assert str(missing) in final.reason
    assert server.requests(GGUF) == []
    hello = rig.wait_hello(lambda h: h.update is not None)
    assert hello.update.state == p.UpdateState.REJECTED


def test_stop_mid_download_resumes_after_restart(make_rig, server) -> None:
    """A clean stop keeps the partial download; the next start resumes it with Range."""
    rig = make_rig()
    size = (server.directory / GGUF).stat().st_size
    server.set_fault(GGUF, trickle_bps=8 << 20, times=1)
    rig.start()
    rig.publish(rig.assign(rig.release("1.0.0", variant_for(server.directory / GGUF, GGUF))))
    aid = f"a-{rig.device_id}-1"
    wait_for(lambda: any(e.type == E.DOWNLOADING and e.progress_pct >= 10
                         for e in rig.events(aid)), 30, "the download to be under way")
    assert rig.agent.terminate() == 0
    partial = rig.store.staging_path("smollm2-135m@1.0.0-micro")
    held = partial.stat().st_size
    assert 0 < held < size

    rig.start()
    assert rig.wait_final(aid).type == E.ACTIVATED
    requests = server.requests(GGUF)
    assert requests[-1].range is not None
    resumed_at = int(requests[-1].range.removeprefix("bytes=").rstrip("-"))
    assert resumed_at >= held


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemd", "ctrl-c"])
def test_a_stop_that_reaches_the_workers_too_is_a_stop_not_a_failed_check(
    make_rig, server, model_path, sig: signal.Signals
) -> None:
    """systemd's stop (KillMode=control-group) and Ctrl-C signal the agent and its
    inference workers at once. A health check cut short that way must not count as
    failed: the model was never judged, and a canary gate would read it as a bad
    release. The update resumes at the next start instead."""
    rig = make_rig()
    rig.start()
    variant = variant_for(server.directory / GGUF, GGUF, prompts=PASSING_PROMPTS * 4,
                          tokenizer_sha256=tokenizer_sha256(model_path))
    rig.publish(rig.assign(rig.release("1.0.0", variant)))
    aid = f"a-{rig.device_id}-1"
    wait_for(lambda: E.STAGED in _types(rig.events(aid)), 60, "the model to be staged")
    wait_for(lambda: "serves smollm2-135m@1.0.0" in rig.agent.log(), 30,
             "the candidate worker to load")
    assert rig.agent.terminate_group(sig) == 0, rig.agent.log()[-3000:]
    assert not {E.HEALTH_FAILED, E.FAILED} & set(_types(rig.events(aid))), rig.agent.log()[-3000:]

    rig.start()
    final = rig.wait_final(aid)
    assert final.type == E.ACTIVATED, final
    assert _types(rig.events(aid)).count(E.HEALTH_PASSED) == 1


def test_offline_update_spools_events_and_flushes_them_on_reconnect(
    tmp_path, cp_credentials, server, model_path
) -> None:
    """The broker goes away mid-download: the update carries on, its events wait
    on disk, and reach the control plane in order once the broker is back."""
    device_id = f"upd-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(8)
    cp_user, cp_password = CONTROL_PLANE_USER, secrets.token_urlsafe(8)
    # A broker of its own (persistence off): stopping the shared one would disturb others.
    own = MosquittoBroker(tmp_path / "broker", users={cp_user: cp_password,
                                                      device_id: password}).start()
    rig = DeviceRig(tmp_path / device_id, own, (cp_user, cp_password), device_id, password,
                    server, TrustSimulator(), reconnect_min_s=0.2, reconnect_max_s=0.5)
    server.set_fault(GGUF, trickle_bps=40 << 20, times=1)  # ~2.5 s of download
    try:
        rig.start()
        rig.publish(rig.assign(rig.release("1.0.0", variant_for(server.directory / GGUF, GGUF))))
        aid = f"a-{device_id}-1"
        wait_for(lambda: any(e.type == E.DOWNLOADING for e in rig.events(aid)), 20,
                 "the download to start")
        online = {e.seq for e in rig.events()}
        own.stop()
        wait_for(lambda: f"activated {aid}" in rig.agent.log(), 60, "the update to finish offline")

        # Back, but the device is let in only once the control plane listens again.
        del own.users[device_id]
        own.start()
        rig.watch_again()
        own.add_users({device_id: password})
        wait_for(lambda: any(e.type == E.ACTIVATED for e in rig.events(aid)), 30,
                 "the spooled events")
        late = [e for e in rig.events(aid) if e.seq not in online]
        assert _types(late)[-3:] == [E.STAGED, E.HEALTH_PASSED, E.ACTIVATED]
        assert [e.seq for e in late] == sorted(e.seq for e in late)
        hello = rig.wait_hello(lambda h: h.update is not None)
        assert hello.update.state == p.UpdateState.ACTIVATED
        assert (rig.state_dir / "events" / "spool").exists()
        assert list((rig.state_dir / "events" / "spool").iterdir()) == []
    finally:
        rig.close()
        own.stop()
