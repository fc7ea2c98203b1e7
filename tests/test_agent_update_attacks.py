"""Attacks on the update pipeline, table-driven like python-tuf's updater tests.

Each row gets a device of its own: a real agent (a simulated Raspberry Pi 4:
micro tier, 3.7 GiB RAM) serving a seeded model, so one row's failure cannot
spill into the next. The broker, the artifact server and the trust
simulator are shared. Each row hands the device something an attacker could
produce (a compromised control plane, broker or artifact server) and
asserts that the device refused it with the code and reason in its event,
that nothing is left in staging, and that the active model and its hash did
not change.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import protocol as p
from agent.gguf import tokenizer_sha256
from controlplane.devfleet.mosquitto import MosquittoBroker
from protocol import SigningKey
from tests.support.http_artifacts import ArtifactServer
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator, flip_byte
from tests.support.updates import DeviceRig, link_or_copy, seed_active, variant_for

pytestmark = pytest.mark.integration

E = p.EventType
TINY = 64 * 1024


def swap_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a GGUF with one byte of its first token changed: same size, other tokenizer."""
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        head = f.read(8 << 20)
        key = b"tokenizer.ggml.tokens"
        # key | value type u32 | item type u32 | count u64 | first string's length u64 | text
        at = head.index(key) + len(key) + 4 + 4 + 8 + 8
        f.seek(at)
        f.write(bytes([head[at] ^ 1]))
    return dst


@dataclass
class Shared:
    """What every row's device shares: the broker, the artifact server and its files."""

    broker: MosquittoBroker
    cp_credentials: tuple[str, str]
    server: ArtifactServer
    sim: TrustSimulator
    files: dict[str, Path]


@dataclass
class Env:
    """One row's device and what the row needs to build its payload."""

    rig: DeviceRig
    server: ArtifactServer
    seed_key: str
    seed_sha: str
    files: dict[str, Path] = field(default_factory=dict)

    def tiny_release(self, name: str, **variant: Any) -> tuple[dict[str, Any], p.Variant]:
        """A correctly signed release of tiny artifact ``name``, a fresh version each time."""
        v = variant_for(self.files[name], name, **variant)
        return self.rig.release(f"3.{secrets.randbelow(10**6)}.0", v), v


@pytest.fixture(scope="module")
def shared(tmp_path_factory, broker, cp_credentials, model_path) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("attack-artifacts")
    files = {}
    for name in ("seed.bin", "flip.bin", "long.bin", "ok.bin"):
        files[name] = root / name
        files[name].write_bytes(secrets.token_bytes(TINY))
    files["genuine.gguf"] = link_or_copy(model_path, root / "genuine.gguf")
    files["swapped.gguf"] = swap_tokenizer(model_path, root / "swapped.gguf")
    sim = TrustSimulator(release_threshold=2, n_release_keys=3)
    with ArtifactServer(root) as server:
        yield Shared(broker, cp_credentials, server, sim, files)


@pytest.fixture
def env(shared: Shared, tmp_path: Path) -> Iterator[Env]:
    """A fresh device serving the seed model, for one row."""
    device_id = f"atk-{secrets.token_hex(3)}"
    rig = DeviceRig(tmp_path / device_id, shared.broker, shared.cp_credentials, device_id,
                    provision_device(shared.broker, device_id), shared.server, shared.sim,
                    simulate={"preset": "raspberry-pi-4-4gb"})
    seed_key = seed_active(rig.state_dir / "models", "seed", "0.1.0", shared.files["seed.bin"])
    seed_sha = rig.store.active().manifest["sha256"]
    rig.start()
    try:
        yield Env(rig, shared.server, seed_key, seed_sha, shared.files)
    finally:
        rig.close()


# --- the rows: each builds a payload (and may set up the server) ----------------


def no_signature(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.rig.sim.tamper(env.rig.assign(release), lambda e: e.update(signatures=[]))


def wrong_director_key(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.rig.assign(release, signers=[SigningKey.generate()])


def release_threshold_not_met(env: Env) -> bytes:
    _, variant = env.tiny_release("ok.bin")
    one_of_two = env.rig.sim.release_signers[:1]
    release = env.rig.release("3.999.1", variant, signers=one_of_two)
    return env.rig.assign(release)


def manifest_byte_changed(env: Env) -> bytes:
    """A compromised control plane edits the embedded release and re-signs as director."""
    release, _ = env.tiny_release("ok.bin")
    payload = env.rig.assign(release)

    def edit(envelope: dict[str, Any]) -> None:
        v = envelope["signed"]["release"]["signed"]["variants"]["micro"]
        v["sha256"] = ("1" if v["sha256"][0] == "0" else "0") + v["sha256"][1:]

    return env.rig.sim.tamper(payload, edit, resign=True)


def assignment_byte_changed(env: Env) -> bytes:
    release, variant = env.tiny_release("ok.bin")
    return flip_byte(env.rig.assign(release), variant.sha256)


def artifact_byte_flipped(env: Env) -> bytes:
    env.server.set_fault("flip.bin", flip_at=TINY // 2)
    release, _ = env.tiny_release("flip.bin")
    return env.rig.assign(release)


def artifact_longer_than_signed(env: Env) -> bytes:
    env.server.set_fault("long.bin", extra_bytes=4096)
    release, _ = env.tiny_release("long.bin")
    return env.rig.assign(release)


def expired(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.rig.assign(release, issued_at=time.time() - 7200, expires_in=3600)


def for_another_device(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.rig.assign(release, device_id="someone-else")


def does_not_fit_ram(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin", min_ram_bytes=6 << 30)  # the Pi 4 has 3.7 GiB
    return env.rig.assign(release)


def tier_above_device(env: Env) -> bytes:
    _, variant = env.tiny_release("ok.bin")
    release = env.rig.sim.release("smollm2-135m", "3.999.2", variants={p.Tier.SMALL: variant})
    seq = env.rig.next_sequence()
    env.rig.sim.now = time.time()
    return env.rig.sim.assign(env.rig.device_id, release, p.Tier.SMALL, sequence=seq,
                              assignment_id=f"a-{env.rig.device_id}-{seq}",
                              artifact_url_base=env.server.base_url)


def tokenizer_swapped_artifact(env: Env) -> bytes:
    """The artifact's tokenizer was swapped before the release was signed.

    Its sha256 and size are the swapped file's, so the download verifies;
    only the release's stated ``tokenizer_sha256`` (the genuine one) tells.
    """
    genuine_tokenizer = tokenizer_sha256(env.files["genuine.gguf"])
    variant = variant_for(env.files["swapped.gguf"], "swapped.gguf",
                          tokenizer_sha256=genuine_tokenizer)
    return env.rig.assign(env.rig.release("3.999.3", variant))


def variant_stitched_from_another_release(env: Env) -> bytes:
    """The release states another release's tokenizer for this artifact."""
    other = tokenizer_sha256(env.files["swapped.gguf"])
    variant = variant_for(env.files["genuine.gguf"], "genuine.gguf", tokenizer_sha256=other)
    return env.rig.assign(env.rig.release("3.999.4", variant))


def _accept_seed_again(env: Env) -> int:
    """Have the device accept an assignment (of what it already runs); return its sequence."""
    rig = env.rig
    seed = variant_for(env.files["seed.bin"], "seed.bin")
    rig.next_sequence()  # skipped: a sequence below the accepted one must exist to replay
    sequence = rig.next_sequence()
    aid = f"a-{rig.device_id}-{sequence}"
    rig.publish(rig.assign(rig.release("0.1.0", seed, name="seed"), sequence=sequence))
    assert rig.wait_final(aid).type == E.ACTIVATED
    return sequence


def replayed_lower_sequence(env: Env) -> bytes:
    accepted = _accept_seed_again(env)
    release, _ = env.tiny_release("ok.bin")
    return env.rig.assign(release, sequence=accepted - 1,
                          assignment_id=f"a-{env.rig.device_id}-replay-{accepted}")


def replayed_after_restart(env: Env) -> bytes:
    accepted = _accept_seed_again(env)
    env.rig.restart()
    release, _ = env.tiny_release("ok.bin")
    # Equal counts as a replay too: the persisted floor is the highest accepted.
    return env.rig.assign(release, sequence=accepted,
                          assignment_id=f"a-{env.rig.device_id}-replay-{accepted}")


@dataclass(frozen=True)
class Row:
    build: Callable[[Env], bytes]
    outcome: p.EventType
    reason: str
    detail: str | None = None


ROWS = {
    "no signature": Row(no_signature, E.REJECTED, "threshold_not_met", "director keys"),
    "wrong key": Row(wrong_director_key, E.REJECTED, "threshold_not_met", "director keys"),
    "release threshold not met": Row(
        release_threshold_not_met, E.REJECTED, "threshold_not_met", "1 valid signature(s)"
    ),
    "one byte changed in the manifest": Row(
        manifest_byte_changed, E.REJECTED, "threshold_not_met", "release keys"
    ),
    "one byte changed in the assignment": Row(
        assignment_byte_changed, E.REJECTED, "threshold_not_met", "director keys"
    ),
    "artifact with one flipped byte": Row(artifact_byte_flipped, E.FAILED, "hash_mismatch"),
    "artifact longer than declared": Row(
        artifact_longer_than_signed, E.FAILED, "too_long", "more than the signed"
    ),
    "expired assignment": Row(expired, E.REJECTED, "expired"),
    "assignment for another device": Row(for_another_device, E.REJECTED, "wrong_device"),
    "variant does not fit the RAM": Row(does_not_fit_ram, E.REJECTED, "does_not_fit", "RAM"),
    "variant above the device tier": Row(
        tier_above_device, E.REJECTED, "does_not_fit", "small variant on a micro device"
    ),
    "tokenizer swapped in the artifact": Row(
        tokenizer_swapped_artifact, E.FAILED, "tokenizer_mismatch", "GGUF tokenizer sha256"
    ),
    "variant stitched from another release": Row(
        variant_stitched_from_another_release, E.FAILED, "tokenizer_mismatch",
        "GGUF tokenizer sha256",
    ),
    "replayed lower sequence": Row(replayed_lower_sequence, E.REJECTED, "replayed_sequence"),
    "replayed sequence after a restart": Row(
        replayed_after_restart, E.REJECTED, "replayed_sequence"
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_attack_is_refused(env: Env, row: Row) -> None:
    rig = env.rig
    installed_before = set(rig.store.installed())
    payload = row.build(env)
    aid = json.loads(payload)["signed"]["assignment_id"]
    rig.publish(payload)

    final = rig.wait_final(aid, timeout=30)
    assert final.type == row.outcome, final
    assert final.code == p.EventCode(row.reason), final
    assert final.reason.startswith(f"{row.reason}: "), final.reason
    if row.detail:
        assert row.detail in final.reason, final.reason
    assert rig.staging == [], "nothing may be left in staging"
    assert rig.active() == (env.seed_key, env.seed_sha), "the active model must not change"
    assert set(rig.store.installed()) <= installed_before, "nothing new may be installed"
    assert E.ACTIVATED not in {e.type for e in rig.events(aid)}
