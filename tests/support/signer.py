"""An honest in-memory signer for trust-layer tests.

After python-tuf's ``tests/repository_simulator.py``: real Ed25519 keys, real
envelopes, real bytes, and one-liners to flip a version, an expiry, a key or
a byte. Agent update tests reuse it::

    sim = TrustSimulator(release_threshold=2, n_release_keys=3)
    rel = sim.release("smollm2-135m", "1.1.0", variants=[Tier.MICRO, Tier.SMALL])
    payload = sim.assign("pi-1", rel, Tier.MICRO, sequence=7)
    verified = sim.verify(payload, device_id="pi-1", highest_sequence=6)

Nothing here reads the clock: ``sim.now`` is the time every assignment is
issued at and verified against; move it with ``sim.now += ...``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import (
    Assignment,
    AssignmentSet,
    Capabilities,
    CpuInfo,
    GoldenPrompt,
    HealthCheck,
    KeyList,
    ModelEntry,
    OsInfo,
    ReleaseManifest,
    Role,
    RuntimeDefaults,
    SigningKey,
    Tier,
    Variant,
    VerifiedAssignment,
    VerifiedDesired,
    canonical_json,
    make_envelope,
    sign_assignment,
    sign_assignment_set,
    sign_key_list,
    sign_release,
    verify_assignment,
    verify_desired,
)

#: 2023-11-14T22:13:20Z; a fixed clock keeps tests deterministic
NOW = 1_700_000_000.0

#: plausible defaults per tier: (artifact size, parameters, context_length)
_TIER_SHAPE: dict[Tier, tuple[int, int, int]] = {
    Tier.MICRO: (100_000_000, 135_000_000, 8192),
    Tier.SMALL: (1_100_000_000, 1_700_000_000, 8192),
    Tier.MEDIUM: (9_000_000_000, 14_000_000_000, 32768),
}


def fake_sha256(*parts: str) -> str:
    """A deterministic, well-formed sha256 hex digest for test artifacts."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def make_variant(
    tier: Tier = Tier.MICRO, *, name: str = "smollm2-135m", **overrides: Any
) -> Variant:
    """A valid GGUF variant for ``tier``; any field can be overridden."""
    size, parameters, context_length = _TIER_SHAPE[tier]
    fields: dict[str, Any] = {
        "format": "gguf",
        "sha256": fake_sha256(name, tier.value),
        "size_bytes": size,
        "artifact": f"{name}/{tier.value}/model.gguf",
        "quantization": "Q4_1",
        "parameters": parameters,
        "context_length": context_length,
        "runtime_defaults": RuntimeDefaults(threads=4, context=2048, mmap=True),
        "health_check": HealthCheck(
            golden_prompts=[
                GoldenPrompt(prompt="What is the capital of France?", expected=["paris"]),
            ],
            max_ttft_ms=2000.0,
            min_tokens_per_s=5.0,
        ),
    }
    fields.update(overrides)
    return Variant(**fields)


def capabilities(*, ram_bytes: int = 4 << 30, disk_free_bytes: int = 32 << 30) -> Capabilities:
    """Measured hardware of a Raspberry-Pi-like device, with RAM and disk to taste."""
    return Capabilities(
        cpu=CpuInfo(model="Cortex-A72", arch="aarch64", cores=4, threads=4),
        ram_bytes=ram_bytes,
        disk_free_bytes=disk_free_bytes,
        os=OsInfo(system="Linux", release="6.1"),
    )


def flip_byte(payload: bytes, needle: str | bytes) -> bytes:
    """Change one character of the first occurrence of ``needle`` in ``payload``.

    The result is still valid JSON when ``needle`` sits inside a string (a hex
    digest, a name): exactly the one-byte tamper a signature must catch.
    """
    needle_b = needle.encode() if isinstance(needle, str) else needle
    at = payload.find(needle_b)
    if at < 0:
        raise ValueError(f"{needle_b!r} does not occur in the payload")
    replacement = b"1" if payload[at : at + 1] == b"0" else b"0"
    return payload[:at] + replacement + payload[at + 1 :]


@dataclass(frozen=True)
class Rotation:
    """A proposed key list: its envelope bytes, the list and its private keys."""

    payload: bytes
    key_list: KeyList
    signers: list[SigningKey]


class TrustSimulator:
    """Release keys, director keys and a clock, all in memory."""

    def __init__(
        self,
        *,
        release_threshold: int = 1,
        n_release_keys: int | None = None,
        director_threshold: int = 1,
        n_director_keys: int | None = None,
        now: float = NOW,
    ) -> None:
        self.now = now
        self.release_signers = [
            SigningKey.generate() for _ in range(n_release_keys or release_threshold)
        ]
        self.director_signers = [
            SigningKey.generate() for _ in range(n_director_keys or director_threshold)
        ]
        self.release_keys = KeyList.of(
            "release", [k.public for k in self.release_signers], threshold=release_threshold
        )
        self.director_keys = KeyList.of(
            "director", [k.public for k in self.director_signers], threshold=director_threshold
        )

    # --- releases -------------------------------------------------------------

    def manifest(
        self,
        name: str = "smollm2-135m",
        version: str = "1.0.0",
        *,
        variants: Iterable[Tier] | Mapping[Tier, Variant] = (Tier.MICRO,),
        **overrides: Any,
    ) -> ReleaseManifest:
        """A valid manifest; ``variants`` is a list of tiers (default variants) or a dict."""
        if not isinstance(variants, Mapping):
            variants = {tier: make_variant(tier, name=name) for tier in variants}
        fields: dict[str, Any] = {
            "name": name,
            "version": version,
            "released_at": self.now - 86_400,
            "description": f"{name} {version}",
            "variants": dict(variants),
        }
        fields.update(overrides)
        return ReleaseManifest(**fields)

    def release(
        self,
        name: str = "smollm2-135m",
        version: str = "1.0.0",
        *,
        variants: Iterable[Tier] | Mapping[Tier, Variant] = (Tier.MICRO,),
        signers: Sequence[SigningKey] | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """A signed release envelope; by default signed by exactly a threshold of release keys."""
        manifest = self.manifest(name, version, variants=variants, **overrides)
        return sign_release(manifest, self._release_quorum() if signers is None else signers)

    def resign_release(
        self, envelope: Mapping[str, Any], signers: Sequence[SigningKey] | None = None
    ) -> dict[str, Any]:
        """Re-sign a (possibly edited) release envelope's raw ``signed`` part."""
        return make_envelope(
            dict(envelope["signed"]), self._release_quorum() if signers is None else signers
        )

    # --- assignments ----------------------------------------------------------

    def assignment(
        self,
        device_id: str,
        release: Mapping[str, Any],
        tier: Tier = Tier.MICRO,
        *,
        sequence: int = 1,
        expires_in: float = 3600.0,
        issued_at: float | None = None,
        **overrides: Any,
    ) -> Assignment:
        """An unsigned assignment of ``release``'s ``tier`` variant to ``device_id``."""
        issued = self.now if issued_at is None else issued_at
        fields: dict[str, Any] = {
            "assignment_id": f"a-{device_id}-{sequence}",
            "device_id": device_id,
            "rollout_id": "r-1",
            "sequence": sequence,
            "issued_at": issued,
            "expires_at": issued + expires_in,
            "tier": tier,
            "release": dict(release),
            "artifact_url_base": "https://cp.example/artifacts",
        }
        fields.update(overrides)
        return Assignment(**fields)

    def assign(
        self,
        device_id: str,
        release: Mapping[str, Any],
        tier: Tier = Tier.MICRO,
        *,
        signers: Sequence[SigningKey] | None = None,
        **fields: Any,
    ) -> bytes:
        """The ``desired`` payload: a director-signed assignment as wire bytes.

        ``fields`` are :meth:`assignment`'s (``sequence``, ``expires_in``,
        ``issued_at``, or any assignment field to override).
        """
        assignment = self.assignment(device_id, release, tier, **fields)
        keys = self._director_quorum() if signers is None else signers
        return canonical_json(sign_assignment(assignment, keys))

    def assign_set(
        self,
        device_id: str,
        models: Mapping[str, Mapping[str, Any]],
        *,
        tier: Tier = Tier.MICRO,
        sequence: int = 1,
        expires_in: float = 3600.0,
        signers: Sequence[SigningKey] | None = None,
        units: Mapping[str, str] | None = None,
    ) -> bytes:
        """A director-signed set document (``slmfleet.assignment/2``) as wire bytes.

        ``models`` maps a model name to the release envelope it should run;
        each entry's assignment id is ``a-<device>-<name>-<sequence>``.
        """
        entries = {
            name: ModelEntry(
                assignment_id=f"a-{device_id}-{name}-{sequence}", rollout_id="r-1", tier=tier,
                release=dict(release), unit=(units or {}).get(name),
            )
            for name, release in models.items()
        }
        document = AssignmentSet(
            device_id=device_id, sequence=sequence, issued_at=self.now,
            expires_at=self.now + expires_in, models=entries,
            artifact_url_base="https://cp.example/artifacts",
        )
        keys = self._director_quorum() if signers is None else signers
        return sign_assignment_set(document, keys)[1]

    def verify_set(
        self, payload: bytes, *, device_id: str, highest_sequence: int = 0, **kwargs: Any
    ) -> VerifiedDesired:
        """Run ``verify_desired`` with this simulator's keys and clock."""
        return verify_desired(
            payload,
            device_id=device_id,
            release_keys=self.release_keys,
            director_keys=self.director_keys,
            now=self.now,
            highest_sequence=highest_sequence,
            **kwargs,
        )

    def verify(
        self, payload: bytes, *, device_id: str, highest_sequence: int = 0, **kwargs: Any
    ) -> VerifiedAssignment:
        """Run ``verify_assignment`` with this simulator's keys and clock."""
        return verify_assignment(
            payload,
            device_id=device_id,
            release_keys=self.release_keys,
            director_keys=self.director_keys,
            now=self.now,
            highest_sequence=highest_sequence,
            **kwargs,
        )

    def tamper(
        self,
        payload: bytes,
        mutate: Callable[[dict[str, Any]], object],
        *,
        resign: bool = False,
    ) -> bytes:
        """Edit a wire envelope in place with ``mutate``; re-sign as the director if asked.

        ``resign=True`` plays a compromised control plane: the director key is
        honest about what it signs, but what it signs is the attacker's.
        """
        envelope = json.loads(payload)
        mutate(envelope)
        if resign:
            envelope = make_envelope(envelope["signed"], self._director_quorum())
        return canonical_json(envelope)

    def resign(self, payload: bytes) -> bytes:
        """Re-sign an edited assignment payload with the director key (see ``tamper``)."""
        return self.tamper(payload, lambda envelope: None, resign=True)

    # --- key rotation ---------------------------------------------------------

    def rotate(
        self,
        role: Role,
        *,
        n_keys: int = 1,
        threshold: int = 1,
        version: int | None = None,
        new_role: Role | None = None,
        sign_with_old: int | None = None,
        sign_with_new: bool = True,
    ) -> Rotation:
        """Propose the next key list for ``role`` (does not adopt it; see ``adopt``).

        ``sign_with_old`` is how many current keys sign (default: the threshold);
        ``version`` defaults to current + 1 and ``new_role`` to ``role``, so a
        test can flip either.
        """
        current, current_signers = self._keys_of(role)
        signers = [SigningKey.generate() for _ in range(n_keys)]
        key_list = KeyList.of(
            new_role or role,
            [k.public for k in signers],
            threshold=threshold,
            version=current.version + 1 if version is None else version,
        )
        old = current_signers[: current.threshold if sign_with_old is None else sign_with_old]
        envelope = sign_key_list(key_list, [*old, *(signers if sign_with_new else [])])
        return Rotation(canonical_json(envelope), key_list, signers)

    def adopt(self, rotation: Rotation) -> None:
        """Make a verified rotation the simulator's current keys for its role."""
        if rotation.key_list.role == "release":
            self.release_keys, self.release_signers = rotation.key_list, rotation.signers
        else:
            self.director_keys, self.director_signers = rotation.key_list, rotation.signers

    # --- internals --------------------------------------------------------------

    def _keys_of(self, role: Role) -> tuple[KeyList, list[SigningKey]]:
        if role == "release":
            return self.release_keys, self.release_signers
        return self.director_keys, self.director_signers

    def _release_quorum(self) -> list[SigningKey]:
        return self.release_signers[: self.release_keys.threshold]

    def _director_quorum(self) -> list[SigningKey]:
        return self.director_signers[: self.director_keys.threshold]
