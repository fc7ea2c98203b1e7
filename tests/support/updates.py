"""Drive a real agent's update pipeline from the outside.

An honest control-plane stand-in: :class:`~tests.support.signer.TrustSimulator`
signs releases and assignments with real Ed25519 keys, they are published
retained on the device's ``desired`` topic with the control plane's broker
credentials, artifacts come from a real :class:`ArtifactServer`, and the
test reads what the device reports (``events``, ``hello``) and what is on
its disk (the model store), never the agent's insides.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import protocol as p
from agent.update.store import ModelStore, model_key
from agent.update.stores import ModelStores
from controlplane.devfleet.mosquitto import MosquittoBroker
from protocol import (
    GoldenPrompt,
    HealthCheck,
    KeyList,
    RuntimeDefaults,
    SigningKey,
    Variant,
    VariantFile,
    canonical_json,
    files_digest,
    sign_key_list,
)
from tests.support.agents import AgentProcess, write_agent_config
from tests.support.controlplane import wait_until
from tests.support.http_artifacts import ArtifactServer
from tests.support.mqtt import RawClient
from tests.support.signer import TrustSimulator

#: SmolLM2-135M-Instruct answers these correctly at temperature 0, with any
#: thread count and context (checked: "The answer to this classic math problem
#: is 4.", "The chemical symbol for water is H2O.")
PASSING_PROMPTS = (
    GoldenPrompt(prompt="What is 2 + 2?", expected=["4", "four"], max_tokens=24),
    GoldenPrompt(prompt="What is the chemical symbol for water?", expected=["h2o"], max_tokens=24),
)
#: ...and reliably gets this one wrong ("L'Étoile, la Marseillaise, la femme, ...")
FAILING_PROMPT = GoldenPrompt(
    prompt="What is the capital of France?", expected=["paris"], max_tokens=32
)
FINAL_EVENTS = frozenset({
    p.EventType.ACTIVATED, p.EventType.REJECTED, p.EventType.FAILED, p.EventType.ROLLED_BACK,
})


#: the name these helpers' users know it by
wait_for = wait_until


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy(src: Path, dst: Path) -> Path:
    """Put ``src`` at ``dst`` without copying 93 MB when a hard link will do."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def pinned_file(key_list: KeyList, signers: Iterable[SigningKey]) -> bytes:
    """A key list as an operator installs it: signed by a threshold of its own keys."""
    return canonical_json(sign_key_list(key_list, list(signers)[: key_list.threshold]))


def write_trust(state_dir: Path, sim: TrustSimulator) -> None:
    """Install the simulator's public keys as the agent's pinned trust files."""
    trust = state_dir / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    (trust / "release-keys.json").write_bytes(pinned_file(sim.release_keys, sim.release_signers))
    (trust / "director-keys.json").write_bytes(
        pinned_file(sim.director_keys, sim.director_signers)
    )


def variant_for(
    path: Path,
    artifact: str,
    *,
    prompts: Iterable[GoldenPrompt] = PASSING_PROMPTS,
    **overrides: Any,
) -> Variant:
    """A micro GGUF variant describing the real file at ``path`` served as ``artifact``."""
    fields: dict[str, Any] = {
        "format": "gguf",
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "artifact": artifact,
        "quantization": "Q4_1",
        "parameters": 135_000_000,
        "context_length": 8192,
        "runtime_defaults": RuntimeDefaults(context=2048),
        # Generous: the 2-core test machine runs agents and checks side by side
        # (and sometimes other suites); tests of the gates set their own.
        "health_check": HealthCheck(
            golden_prompts=list(prompts), max_ttft_ms=30_000.0, min_tokens_per_s=1.0
        ),
    }
    fields.update(overrides)
    return Variant(**fields)


def built_onnx_folder() -> Path:
    """The ONNX SmolLM2 folder the set-up built; fails the test (not skips) when it is missing."""
    import pytest

    from tests.support.genai import onnx_genai_path

    folder = onnx_genai_path()
    if folder is None:
        pytest.fail("ONNX test model missing: run scripts/bootstrap.sh (it runs "
                    "scripts/build-onnx-genai.sh)", pytrace=False)
    return folder


def folder_files(folder: Path) -> list[VariantFile]:
    """Every file under ``folder`` as a folder variant lists it, by path."""
    return [VariantFile(path=f.relative_to(folder).as_posix(), sha256=file_sha256(f),
                        size_bytes=f.stat().st_size)
            for f in sorted(folder.rglob("*")) if f.is_file()]


#: the ONNX build answers this right at temperature 0 (tests/support/genai.py)
ONNX_PROMPTS = (
    GoldenPrompt(prompt="What is the chemical symbol for water?", expected=["h2o"],
                 max_tokens=24),
)


def folder_variant_for(
    folder: Path | None, artifact: str, *, files: list[VariantFile] | None = None,
    prompts: Iterable[GoldenPrompt] = ONNX_PROMPTS, **overrides: Any,
) -> Variant:
    """A micro ONNX folder variant listing the files of ``folder`` (or ``files``)."""
    listed = folder_files(folder) if files is None else files
    fields: dict[str, Any] = {
        "format": "onnx",
        "sha256": files_digest(listed),
        "size_bytes": sum(f.size_bytes for f in listed),
        "artifact": artifact,
        "files": listed,
        "quantization": "int4",
        "parameters": 135_000_000,
        "context_length": 8192,
        "runtime_defaults": RuntimeDefaults(context=2048, threads=1),
        "health_check": HealthCheck(
            golden_prompts=list(prompts), max_ttft_ms=30_000.0, min_tokens_per_s=1.0
        ),
    }
    fields.update(overrides)
    return Variant(**fields)


def seed_active(store_root: Path, name: str, version: str, artifact: Path, *,
                legacy: bool = False) -> str:
    """Install ``artifact`` as ``name``'s active version before the agent first starts.

    ``legacy``: in the single-store layout of agents from before model sets.
    """
    store = ModelStore(store_root) if legacy else ModelStores(store_root).store(name)
    key = model_key(name, version, "micro")
    staged = store.staging_path(key)
    shutil.copyfile(artifact, staged)
    manifest = {
        "sha256": file_sha256(artifact), "size": artifact.stat().st_size,
        "name": name, "version": version, "tier": "micro", "format": "gguf",
    }
    store.install(key, staged, manifest)
    store.activate(key)
    return key


def sign_set(
    sim: TrustSimulator, device_id: str, releases: dict[str, dict[str, Any]], *,
    sequence: int, artifact_url_base: str, ids: dict[str, str] | None = None,
    units: dict[str, str] | None = None, tiers: dict[str, p.Tier] | None = None,
    issued_at: float | None = None, expires_in: float = 3600.0,
    signers: list[SigningKey] | None = None, policies: dict[str, p.UpdatePolicy] | None = None,
) -> bytes:
    """A director-signed set document of ``releases`` (name -> release; micro by default).

    Unlike :meth:`TrustSimulator.assign_set` the caller chooses each entry's
    assignment id (an entry kept unchanged keeps its id) and where the
    artifacts come from.
    """
    entries = {
        name: p.ModelEntry(
            assignment_id=(ids or {}).get(name, f"a-{device_id}-{name}-{sequence}"),
            rollout_id="r-1", tier=(tiers or {}).get(name, p.Tier.MICRO), release=dict(release),
            unit=(units or {}).get(name), policy=(policies or {}).get(name),
        )
        for name, release in releases.items()
    }
    issued = sim.now if issued_at is None else issued_at
    document = p.AssignmentSet(
        device_id=device_id, sequence=sequence, issued_at=issued,
        expires_at=issued + expires_in, models=entries, artifact_url_base=artifact_url_base,
    )
    keys = sim.director_signers[: sim.director_keys.threshold] if signers is None else signers
    return p.sign_assignment_set(document, keys)[1]


class DeviceRig:
    """One device: its agent process, its broker traffic, its disk."""

    def __init__(
        self,
        work: Path,
        broker: MosquittoBroker,
        cp_credentials: tuple[str, str],
        device_id: str,
        password: str,
        server: ArtifactServer,
        sim: TrustSimulator,
        **agent_extra: Any,
    ) -> None:
        self.work, self.device_id, self.server, self.sim = work, device_id, server, sim
        self.state_dir = work / "state"
        write_trust(self.state_dir, sim)
        config: dict[str, Any] = {
            "heartbeat_interval_s": 5.0,
            "download_retry_s": 0.2,
            "download_stall_window_s": 5.0,
            "health_check_timeout_s": 120.0,
        }
        config.update(agent_extra)
        self.config_path = write_agent_config(work, device_id, broker.url, password, **config)
        self._broker, self._cp_credentials = broker, cp_credentials
        self.cp = self._watch()
        self.agent: AgentProcess | None = None
        self._sequence = 0
        self._decoded_upto = 0
        self._events: list[p.Event] = []
        self._event_seqs: set[int] = set()
        self._hellos: list[p.Hello] = []

    def _watch(self) -> RawClient:
        client = RawClient(self._broker.url, *self._cp_credentials)
        client.connect()
        client.subscribe(f"{p.TOPIC_ROOT}/{self.device_id}/#")
        return client

    def watch_again(self) -> None:
        """A fresh control-plane client (after a broker restart); what was seen is kept."""
        self.cp.close()
        self.cp = self._watch()
        self._decoded_upto = 0
        self._hellos.clear()

    # -- the agent process ---------------------------------------------------

    @property
    def stores(self) -> ModelStores:
        return ModelStores(self.state_dir / "models")

    @property
    def store(self) -> ModelStore:
        """The store of the model most tests assign (smollm2-135m)."""
        return self.stores.store("smollm2-135m")

    @property
    def staging(self) -> list[str]:
        """What every name's staging holds."""
        return sorted(entry.name for _, store in self.stores.all()
                      for entry in (store.root / "staging").iterdir())

    def start(self, *, wait: bool = True) -> AgentProcess:
        self.agent = AgentProcess(self.config_path)
        if wait:
            wait_for(lambda: "connected to" in self.agent.log() or self.agent.proc.poll(),
                     20, "the agent to connect")
            assert self.agent.proc.poll() is None, self.agent.log()[-3000:]
        return self.agent

    def kill(self) -> None:
        assert self.agent is not None
        self.agent.kill()
        # The next process's "connected" must not be read from this one's log.
        self.agent.log_path.rename(self.agent.log_path.with_name(f"agent.log.{time.monotonic_ns()}"))

    def restart(self) -> AgentProcess:
        self.kill()
        return self.start()

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        # Leave no assignment behind on the shared broker.
        self.cp.publish(p.device_topic(self.device_id, p.TopicKind.DESIRED), b"", retain=True)
        self.cp.close()

    # -- the control plane's side --------------------------------------------------

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def release(self, version: str, variant: Variant, name: str = "smollm2-135m",
                **kwargs: Any) -> dict[str, Any]:
        return self.sim.release(name, version, variants={p.Tier.MICRO: variant}, **kwargs)

    def assign(self, release: dict[str, Any], *, sequence: int | None = None,
               device_id: str | None = None, **kwargs: Any) -> bytes:
        """A signed assignment of ``release`` (micro) to this device, served by our server."""
        sequence = self.next_sequence() if sequence is None else sequence
        kwargs.setdefault("artifact_url_base", self.server.base_url)
        kwargs.setdefault("assignment_id", f"a-{self.device_id}-{sequence}")
        self.sim.now = time.time()
        return self.sim.assign(device_id or self.device_id, release, p.Tier.MICRO,
                               sequence=sequence, **kwargs)

    def publish(self, payload: bytes) -> None:
        rc = self.cp.publish(p.device_topic(self.device_id, p.TopicKind.DESIRED), payload,
                             retain=True)
        assert not rc.is_failure, rc

    # -- what the device says ------------------------------------------------------

    def _decode_new(self) -> None:
        # Each message is decoded once: tests poll these lists in tight loops.
        messages = self.cp.messages[self._decoded_upto:]
        self._decoded_upto += len(messages)
        for msg in messages:
            _, kind = p.parse_topic(msg.topic)
            if not msg.payload:
                continue
            if kind == p.TopicKind.EVENTS:
                event = p.decode(kind, msg.payload)
                if event.seq not in self._event_seqs:  # a crash may resend one
                    self._event_seqs.add(event.seq)
                    self._events.append(event)
            elif kind == p.TopicKind.HELLO:
                self._hellos.append(p.decode(kind, msg.payload))

    def events(self, assignment_id: str | None = None) -> list[p.Event]:
        """Events in arrival order, without duplicates."""
        self._decode_new()
        return [e for e in self._events if assignment_id in (None, e.assignment_id)]

    def hellos(self) -> list[p.Hello]:
        self._decode_new()
        return list(self._hellos)

    def wait_final(self, assignment_id: str, timeout: float = 60.0) -> p.Event:
        """The event that ended ``assignment_id``'s update."""
        def final() -> p.Event | None:
            return next((e for e in self.events(assignment_id) if e.type in FINAL_EVENTS), None)

        try:
            return wait_for(final, timeout, f"a final event for {assignment_id}")
        except AssertionError:
            tail = self.agent.log()[-4000:] if self.agent else ""
            raise AssertionError(
                f"no final event for {assignment_id}; agent log:\n{tail}"
            ) from None

    def wait_hello(self, predicate: Callable[[p.Hello], bool], timeout: float = 30.0) -> p.Hello:
        return wait_for(lambda: next((h for h in reversed(self.hellos()) if predicate(h)), None),
                        timeout, "a matching hello")

    def wait_clean(self, keep: int = 2, timeout: float = 10.0) -> None:
        """Wait for the clean-up after an activation: old versions deleted, staging empty."""
        # Versions first: gc renames one into staging/ in one step, so reading
        # staging first could miss it in both places.
        wait_for(lambda: all(len(s.installed()) <= keep for _, s in self.stores.all())
                 and not self.staging, timeout, "old versions deleted and staging empty")

    def active(self, name: str = "smollm2-135m") -> tuple[str, str] | None:
        """``(key, sha256)`` of ``name``'s active version on disk, after re-hashing it."""
        store = self.stores.store(name)
        version = store.active()
        if version is None:
            return None
        assert store.verify_hash(version.key), f"active {version.key} fails its hash"
        return version.key, version.manifest["sha256"]

    def assign_set(self, releases: dict[str, dict[str, Any]], *, sequence: int | None = None,
                   device_id: str | None = None, ids: dict[str, str] | None = None,
                   units: dict[str, str] | None = None) -> bytes:
        """A signed set document (``slmfleet.assignment/2``) of ``releases`` (name -> release).

        Each entry's assignment id is ``ids[name]``, or ``a-<device>-<name>-<sequence>``.
        """
        sequence = self.next_sequence() if sequence is None else sequence
        self.sim.now = time.time()
        return sign_set(self.sim, device_id or self.device_id, releases, sequence=sequence,
                        artifact_url_base=self.server.base_url, ids=ids, units=units)
