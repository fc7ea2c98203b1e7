"""Attacks on the update pipeline, table-driven like python-tuf's updater tests.

Each row gets a device of its own: a real agent (a simulated Raspberry Pi 4:
micro tier, 3.7 GiB RAM) serving a seeded model, so one row's failure cannot
spill into the next. The broker, the artifact server and the trust
simulator are shared. Each row hands the device something an attacker could
produce (a compromised control plane, broker or artifact server) and
asserts that the device refused it with the code and reason in its event,
that nothing is left in staging, and that the active model and its hash did
not change.

The ``folder:`` rows attack a folder variant (an onnxruntime-genai model's
files, listed in the signed release): its list edited, files of another
release served in its place (directly, by a redirect, by a symlink on the
server), a path out of the folder, a listed size that lies.

Every row runs against both forms of the desired state: the single-model
assignment, and the set document naming the seeded model beside the
attacked one. Rows marked ``sets`` only make sense for sets (an entry moved
between two devices' documents, an entry dropped by a replayed older
document); one entry's tampered artifact, which must fail alone while the
other entries of its document activate, has a test of its own.
"""

from __future__ import annotations

import hashlib
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
from protocol import SigningKey, canonical_json
from tests.support.http_artifacts import ArtifactServer
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator, flip_byte
from tests.support.updates import (
    DeviceRig,
    file_sha256,
    folder_variant_for,
    link_or_copy,
    seed_active,
    sign_set,
    variant_for,
)

pytestmark = pytest.mark.integration

E = p.EventType
TINY = 64 * 1024
#: a folder variant's files (the names of an onnxruntime-genai model), in two releases
FOLDER_FILES = ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json")


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
    #: "single" (slmfleet.assignment/1) or "set" (slmfleet.assignment/2)
    form: str = "single"
    files: dict[str, Path] = field(default_factory=dict)

    def tiny_release(self, name: str, **variant: Any) -> tuple[dict[str, Any], p.Variant]:
        """A correctly signed release of tiny artifact ``name``, a fresh version each time."""
        v = variant_for(self.files[name], name, **variant)
        return self.rig.release(f"3.{secrets.randbelow(10**6)}.0", v), v

    def seed_release(self) -> dict[str, Any]:
        return self.rig.release("0.1.0", variant_for(self.files["seed.bin"], "seed.bin"),
                                name="seed")

    def assign(self, release: dict[str, Any], *, sequence: int | None = None,
               assignment_id: str | None = None, tier: p.Tier = p.Tier.MICRO,
               others: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> bytes:
        """``release`` assigned in this row's form; a set also names the seed (or ``others``).

        ``kwargs``: ``device_id``, ``signers``, ``issued_at``, ``expires_in``.
        """
        rig = self.rig
        sequence = rig.next_sequence() if sequence is None else sequence
        assignment_id = assignment_id or f"a-{rig.device_id}-{sequence}"
        rig.sim.now = time.time()
        if self.form == "single":
            return rig.sim.assign(kwargs.pop("device_id", rig.device_id), release, tier,
                                  sequence=sequence, assignment_id=assignment_id,
                                  artifact_url_base=self.server.base_url, **kwargs)
        name = release["signed"]["name"]
        releases = {"seed": self.seed_release()} if others is None else dict(others)
        releases[name] = release
        ids = {other: f"{other}-{rig.device_id}" for other in releases} | {name: assignment_id}
        return sign_set(rig.sim, kwargs.pop("device_id", rig.device_id), releases,
                        sequence=sequence, artifact_url_base=self.server.base_url, ids=ids,
                        tiers={name: tier}, **kwargs)

    def release_in(self, envelope: dict[str, Any], name: str = "smollm2-135m") -> dict[str, Any]:
        """Where the release of ``name`` sits in a payload of this row's form."""
        signed = envelope["signed"]
        return signed["release"] if self.form == "single" else signed["models"][name]["release"]

    def assignment_id(self, payload: bytes, name: str = "smollm2-135m") -> str:
        signed = json.loads(payload)["signed"]
        return (signed["assignment_id"] if self.form == "single"
                else signed["models"][name]["assignment_id"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory, broker, cp_credentials, model_path) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("attack-artifacts")
    files = {}
    for name in ("seed.bin", "flip.bin", "long.bin", "ok.bin"):
        files[name] = root / name
        files[name].write_bytes(secrets.token_bytes(TINY))
    files["genuine.gguf"] = link_or_copy(model_path, root / "genuine.gguf")
    files["swapped.gguf"] = swap_tokenizer(model_path, root / "swapped.gguf")
    for release in ("folder-a", "folder-b"):
        (root / release).mkdir()
        for name in FOLDER_FILES:
            (root / release / name).write_bytes(secrets.token_bytes(TINY))
        files[release] = root / release
    # folder-a with one file from folder-b: same names, one file of another release
    swapped = root / "folder-swapped"
    shutil.copytree(root / "folder-a", swapped)
    shutil.copyfile(root / "folder-b" / "tokenizer.json", swapped / "tokenizer.json")
    # folder-a with one file a symlink to folder-b's (the server follows it)
    linked = root / "folder-linked"
    shutil.copytree(root / "folder-a", linked)
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(root / "folder-b" / "model.onnx")
    sim = TrustSimulator(release_threshold=2, n_release_keys=3)
    with ArtifactServer(root) as server:
        yield Shared(broker, cp_credentials, server, sim, files)


@pytest.fixture(params=["single", "set"])
def env(shared: Shared, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    """A fresh device serving the seed model, for one row, in each form."""
    device_id = f"atk-{secrets.token_hex(3)}"
    rig = DeviceRig(tmp_path / device_id, shared.broker, shared.cp_credentials, device_id,
                    provision_device(shared.broker, device_id), shared.server, shared.sim,
                    simulate={"preset": "raspberry-pi-4-4gb"})
    seed_key = seed_active(rig.state_dir / "models", "seed", "0.1.0", shared.files["seed.bin"])
    seed_sha = rig.stores.store("seed").active().manifest["sha256"]
    rig.start()
    try:
        yield Env(rig, shared.server, seed_key, seed_sha, request.param, shared.files)
    finally:
        rig.close()


# --- the rows: each builds a payload (and may set up the server) ----------------


def no_signature(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.rig.sim.tamper(env.assign(release), lambda e: e.update(signatures=[]))


def wrong_director_key(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.assign(release, signers=[SigningKey.generate()])


def release_threshold_not_met(env: Env) -> bytes:
    _, variant = env.tiny_release("ok.bin")
    one_of_two = env.rig.sim.release_signers[:1]
    release = env.rig.release("3.999.1", variant, signers=one_of_two)
    return env.assign(release)


def manifest_byte_changed(env: Env) -> bytes:
    """A compromised control plane edits the embedded release and re-signs as director."""
    release, _ = env.tiny_release("ok.bin")
    payload = env.assign(release)

    def edit(envelope: dict[str, Any]) -> None:
        v = env.release_in(envelope)["signed"]["variants"]["micro"]
        v["sha256"] = ("1" if v["sha256"][0] == "0" else "0") + v["sha256"][1:]

    return env.rig.sim.tamper(payload, edit, resign=True)


def assignment_byte_changed(env: Env) -> bytes:
    release, variant = env.tiny_release("ok.bin")
    return flip_byte(env.assign(release), variant.sha256)


def artifact_byte_flipped(env: Env) -> bytes:
    env.server.set_fault("flip.bin", flip_at=TINY // 2)
    release, _ = env.tiny_release("flip.bin")
    return env.assign(release)


def artifact_longer_than_signed(env: Env) -> bytes:
    env.server.set_fault("long.bin", extra_bytes=4096)
    release, _ = env.tiny_release("long.bin")
    return env.assign(release)


def expired(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.assign(release, issued_at=time.time() - 7200, expires_in=3600)


def for_another_device(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin")
    return env.assign(release, device_id="someone-else")


def does_not_fit_ram(env: Env) -> bytes:
    release, _ = env.tiny_release("ok.bin", min_ram_bytes=6 << 30)  # the Pi 4 has 3.7 GiB
    return env.assign(release)


def tier_above_device(env: Env) -> bytes:
    _, variant = env.tiny_release("ok.bin")
    release = env.rig.sim.release("smollm2-135m", "3.999.2", variants={p.Tier.SMALL: variant})
    return env.assign(release, tier=p.Tier.SMALL)


def tokenizer_swapped_artifact(env: Env) -> bytes:
    """The artifact's tokenizer was swapped before the release was signed.

    Its sha256 and size are the swapped file's, so the download verifies;
    only the release's stated ``tokenizer_sha256`` (the genuine one) tells.
    """
    genuine_tokenizer = tokenizer_sha256(env.files["genuine.gguf"])
    variant = variant_for(env.files["swapped.gguf"], "swapped.gguf",
                          tokenizer_sha256=genuine_tokenizer)
    return env.assign(env.rig.release("3.999.3", variant))


def variant_stitched_from_another_release(env: Env) -> bytes:
    """The release states another release's tokenizer for this artifact."""
    other = tokenizer_sha256(env.files["swapped.gguf"])
    variant = variant_for(env.files["genuine.gguf"], "genuine.gguf", tokenizer_sha256=other)
    return env.assign(env.rig.release("3.999.4", variant))


def _accept_seed_again(env: Env) -> int:
    """Have the device accept an assignment (of what it already runs); return its sequence."""
    rig = env.rig
    seed = variant_for(env.files["seed.bin"], "seed.bin")
    rig.next_sequence()  # skipped: a sequence below the accepted one must exist to replay
    sequence = rig.next_sequence()
    aid = f"a-{rig.device_id}-{sequence}"
    rig.publish(env.assign(rig.release("0.1.0", seed, name="seed"), sequence=sequence,
                           assignment_id=aid, others={}))
    assert rig.wait_final(aid).type == E.ACTIVATED
    return sequence


def replayed_lower_sequence(env: Env) -> bytes:
    accepted = _accept_seed_again(env)
    release, _ = env.tiny_release("ok.bin")
    return env.assign(release, sequence=accepted - 1,
                      assignment_id=f"a-{env.rig.device_id}-replay-{accepted}")


def replayed_after_restart(env: Env) -> bytes:
    accepted = _accept_seed_again(env)
    env.rig.restart()
    release, _ = env.tiny_release("ok.bin")
    # Equal counts as a replay too: the persisted floor is the highest accepted.
    return env.assign(release, sequence=accepted,
                      assignment_id=f"a-{env.rig.device_id}-replay-{accepted}")


def entry_from_another_device(env: Env) -> bytes:
    """A broker or control plane moves an entry of device B's document into A's."""
    release, _ = env.tiny_release("ok.bin")
    mine = env.assign(env.tiny_release("seed.bin")[0])
    theirs = json.loads(env.assign(release, device_id="someone-else"))
    entry = theirs["signed"]["models"]["smollm2-135m"]

    def swap(envelope: dict[str, Any]) -> None:
        envelope["signed"]["models"]["smollm2-135m"] = entry

    return env.rig.sim.tamper(mine, swap)


def entry_dropped_by_replay(env: Env) -> bytes:
    """An older, genuine document that lacks the seed would take it out of service."""
    rig = env.rig
    older = env.assign(env.tiny_release("ok.bin")[0], others={})
    sequence = rig.next_sequence()
    aid = f"a-{rig.device_id}-{sequence}"
    rig.publish(env.assign(env.seed_release(), sequence=sequence, assignment_id=aid, others={}))
    assert rig.wait_final(aid).type == E.ACTIVATED
    return older


def _relist(variant: dict[str, Any], edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Edit a variant's file list in place; its digest and size follow the new list."""
    edit(variant["files"])
    entries = sorted(variant["files"], key=lambda f: f["path"])
    variant["sha256"] = hashlib.sha256(canonical_json(entries)).hexdigest()
    variant["size_bytes"] = sum(f["size_bytes"] for f in entries)


def _folder_release(env: Env, served: str, edit: Callable[[list[dict[str, Any]]], None]
                    | None = None) -> dict[str, Any]:
    """A release of folder-a's file list served from ``served``, signed by the release keys.

    ``edit`` changes the list first (its digest and size follow), as a
    release signer fooled into signing it would.
    """
    variant = folder_variant_for(env.files["folder-a"], served).model_dump(mode="json")
    if edit is not None:
        _relist(variant, edit)
    release = env.tiny_release("ok.bin")[0]
    release["signed"]["variants"]["micro"] = variant
    return env.rig.sim.resign_release(release)


def _folder_list_edited(env: Env, edit: Callable[[list[dict[str, Any]]], None]) -> bytes:
    """A compromised control plane edits the folder's signed list and re-signs as director."""
    payload = env.assign(_folder_release(env, "folder-a"))

    def tamper(envelope: dict[str, Any]) -> None:
        _relist(env.release_in(envelope)["signed"]["variants"]["micro"], edit)

    return env.rig.sim.tamper(payload, tamper, resign=True)


def folder_file_added(env: Env) -> bytes:
    extra = env.files["folder-b"] / "model.onnx"
    return _folder_list_edited(env, lambda files: files.append(
        {"path": "extra.onnx", "sha256": file_sha256(extra), "size_bytes": TINY}))


def folder_file_dropped(env: Env) -> bytes:
    return _folder_list_edited(env, lambda files: files.pop())


def folder_file_renamed(env: Env) -> bytes:
    return _folder_list_edited(env, lambda files: files[0].update(path="genai-config.json"))


def folder_file_from_another_release(env: Env) -> bytes:
    return env.assign(_folder_release(env, "folder-swapped"))


def folder_path_escapes(env: Env) -> bytes:
    """The signed list names ``../escape.bin``: the manifest itself is refused."""
    return env.assign(_folder_release(
        env, "folder-a", lambda files: files[0].update(path="../escape.bin")))


def folder_redirected_outside(env: Env) -> bytes:
    """The server redirects one file to another release's, through a path with ``..``."""
    env.server.set_fault("folder-a/model.onnx.data", times=1, redirect_to="/folder-a/../folder-b/"
                         "model.onnx.data")
    return env.assign(_folder_release(env, "folder-a"))


def folder_symlinked_on_the_server(env: Env) -> bytes:
    return env.assign(_folder_release(env, "folder-linked"))


def folder_size_that_lies(env: Env) -> bytes:
    """The signed list says one file is shorter than the server's: refused as it starts."""
    return env.assign(_folder_release(
        env, "folder-a", lambda files: files[-1].update(size_bytes=TINY - 1)))


@dataclass(frozen=True)
class Row:
    build: Callable[[Env], bytes]
    outcome: p.EventType
    reason: str
    detail: str | None = None
    #: only for set documents
    sets: bool = False


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
    "an entry moved from another device's document": Row(
        entry_from_another_device, E.REJECTED, "threshold_not_met", "director keys", sets=True
    ),
    "an entry dropped by a replayed older document": Row(
        entry_dropped_by_replay, E.REJECTED, "replayed_sequence", sets=True
    ),
    "folder: a file added to the signed list": Row(
        folder_file_added, E.REJECTED, "threshold_not_met", "release keys"
    ),
    "folder: a file dropped from the signed list": Row(
        folder_file_dropped, E.REJECTED, "threshold_not_met", "release keys"
    ),
    "folder: a file renamed in the signed list": Row(
        folder_file_renamed, E.REJECTED, "threshold_not_met", "release keys"
    ),
    "folder: a file swapped in from another release": Row(
        folder_file_from_another_release, E.FAILED, "hash_mismatch", "tokenizer.json"
    ),
    "folder: a path that escapes the folder": Row(
        folder_path_escapes, E.REJECTED, "malformed", "'..'"
    ),
    "folder: a redirect to another release's file": Row(
        folder_redirected_outside, E.FAILED, "hash_mismatch", "model.onnx.data"
    ),
    "folder: a symlinked path on the server": Row(
        folder_symlinked_on_the_server, E.FAILED, "hash_mismatch", "model.onnx"
    ),
    "folder: a listed size that lies": Row(
        folder_size_that_lies, E.FAILED, "too_long", "tokenizer.json: remote size 65536, signed "
        "size is 65535"
    ),
}


#: every row in both forms, except the rows only a set document can carry
FORM_ROWS = [
    pytest.param(form, row, id=f"{form}-{name}")
    for form in ("single", "set") for name, row in ROWS.items()
    if form == "set" or not row.sets
]


@pytest.mark.parametrize(("env", "row"), FORM_ROWS, indirect=["env"])
def test_attack_is_refused(env: Env, row: Row) -> None:
    rig = env.rig
    installed_before = installed(rig)
    payload = row.build(env)
    aid = env.assignment_id(payload)
    rig.publish(payload)

    final = rig.wait_final(aid, timeout=30)
    assert final.type == row.outcome, final
    assert final.code == p.EventCode(row.reason), final
    assert final.reason.startswith(f"{row.reason}: "), final.reason
    if row.detail:
        assert row.detail in final.reason, final.reason
    assert rig.staging == [], "nothing may be left in staging"
    assert rig.active("seed") == (env.seed_key, env.seed_sha), "the active model must not change"
    assert installed(rig) <= installed_before, "nothing new may be installed"
    assert E.ACTIVATED not in {e.type for e in rig.events(aid)}
    assert [m.name for m in rig.wait_hello(lambda h: True).active_models()] == ["seed"]
    assert not list(rig.work.parent.rglob("escape*")), "nothing lands outside the store"


def installed(rig: DeviceRig) -> set[str]:
    """Every version installed, whatever its name."""
    return {key for _, store in rig.stores.all() for key in store.installed()}


@pytest.mark.parametrize("env", ["set"], indirect=True)
def test_one_tampered_entry_fails_alone(env: Env) -> None:
    """Entries are independent: the other entries of the same document activate."""
    rig = env.rig
    env.server.set_fault("flip.bin", flip_at=TINY // 2)
    tampered, _ = env.tiny_release("flip.bin")
    # A model that loads and answers: the real SmolLM2 under another name.
    good_variant = variant_for(env.files["genuine.gguf"], "genuine.gguf")
    good = rig.release("1.0.0", good_variant, name="embedder")
    payload = env.assign(tampered, others={"seed": env.seed_release(), "embedder": good})
    rig.publish(payload)

    final = rig.wait_final(env.assignment_id(payload), timeout=30)
    assert (final.type, final.code) == (E.FAILED, p.EventCode.HASH_MISMATCH), final
    embedder = rig.wait_final(env.assignment_id(payload, "embedder"), timeout=120)
    assert embedder.type == E.ACTIVATED, embedder
    assert rig.active("embedder")[1] == good_variant.sha256
    assert rig.active("seed") == (env.seed_key, env.seed_sha)
    assert rig.active("smollm2-135m") is None, "the tampered entry never activates"
    rig.wait_clean()
    hello = rig.wait_hello(lambda h: h.update is not None and h.update.state.is_final)
    assert [m.name for m in hello.active_models()] == ["embedder", "seed"]
    assert hello.update.state == p.UpdateState.FAILED
    assert {(u.model, u.state) for u in hello.model_updates()} >= {
        ("smollm2-135m", p.UpdateState.FAILED), ("embedder", p.UpdateState.ACTIVATED)}
