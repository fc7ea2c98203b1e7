"""The pure trust layer: key lists, release manifests, assignments, fit check.

Table-driven in the style of python-tuf's ``test_trusted_metadata_set.py``:
every rejection asserts the exception class *and* its machine ``reason``,
which is what the agent reports in ``rejected(reason)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from protocol import (
    CLOCK_SKEW_S,
    MAX_ASSIGNMENT_BYTES,
    MAX_RELEASE_BYTES,
    BadVersionError,
    DoesNotFit,
    ExpiredError,
    GoldenPrompt,
    HealthCheck,
    KeyList,
    KeyListExpired,
    MalformedPayload,
    NotYetValidError,
    PayloadTooLarge,
    ProtocolError,
    ReleaseManifest,
    ReplayError,
    SchemaMismatch,
    SigningKey,
    ThresholdError,
    Tier,
    VariantMismatch,
    WrongDeviceError,
    WrongRoleError,
    canonical_json,
    disk_needed_bytes,
    fit_check,
    make_envelope,
    ram_needed_bytes,
    semver_key,
    sign_assignment,
    sign_assignment_bytes,
    sign_release,
    trusted_keys,
    verify_assignment,
    verify_key_rotation,
    verify_release,
)
from protocol.canonical import canonical_object
from protocol.fit import KV_BYTES_PER_TOKEN_PER_SQRT_PARAM, kv_cache_allowance_bytes
from protocol.keys import make_envelope_bytes
from tests.support.semver import SPEC_PRECEDENCE_CHAIN
from tests.support.signer import TrustSimulator, capabilities, flip_byte, make_variant

DEVICE = "pi-1"

# --- assignments: the acceptance table -------------------------------------------

# Each case builds a payload (and extra verify_assignment kwargs) from a fresh
# simulator with 2-of-3 release keys; the expected error class and reason follow.
Case = Callable[[TrustSimulator], tuple[bytes, dict[str, Any]]]


def _ok(sim: TrustSimulator, **kwargs: Any) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), **kwargs), {}


def _no_signatures(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    payload, _ = _ok(sim)
    return sim.tamper(payload, lambda env: env["signatures"].clear()), {}


def _wrong_director_key(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), signers=[SigningKey.generate()]), {}


def _release_one_of_two(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    release = sim.release(signers=sim.release_signers[:1])
    return sim.assign(DEVICE, release), {}


def _release_same_key_twice(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    release = sim.release(signers=sim.release_signers[:1])
    release["signatures"] = release["signatures"] * 2  # one key counts once
    return sim.assign(DEVICE, release), {}


def _director_forges_release(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    # The Uptane property: the online key alone cannot vouch for a model.
    release = sim.release(signers=sim.director_signers)
    return sim.assign(DEVICE, release), {}


def _byte_flipped_in_manifest(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    release = sim.release()
    sha = release["signed"]["variants"]["micro"]["sha256"]
    return flip_byte(sim.assign(DEVICE, release), sha), {}


def _byte_flipped_in_manifest_director_resigned(
    sim: TrustSimulator,
) -> tuple[bytes, dict[str, Any]]:
    # A compromised control plane edits the artifact hash and re-signs the
    # assignment: the release signatures still catch it.
    release = sim.release()
    sha = release["signed"]["variants"]["micro"]["sha256"]
    return sim.resign(flip_byte(sim.assign(DEVICE, release), sha)), {}


def _signed_part_set(sim: TrustSimulator, *, resign: bool, **fields: Any) -> bytes:
    """A valid assignment with ``fields`` set in its signed part, re-signed if ``resign``."""
    payload, _ = _ok(sim)
    return sim.tamper(payload, lambda env: env["signed"].update(fields), resign=resign)


def _extra_field_unsigned(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return _signed_part_set(sim, resign=False, priority="high"), {}


def _extra_field_in_assignment(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return _signed_part_set(sim, resign=True, priority="high"), {}


def _extra_field_in_release(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    release = sim.release()
    release["signed"]["variants"]["micro"]["license"] = "anything"
    return sim.assign(DEVICE, sim.resign_release(release)), {}


def _wrong_schema(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return _signed_part_set(sim, resign=True, schema="slmfleet.assignment/2"), {}


def _release_as_assignment(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    # A signature over one kind of document is not one over another.
    manifest = sim.manifest()
    envelope = sign_release(manifest, sim.director_signers)
    return canonical_json(envelope), {}


def _expired(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), issued_at=sim.now - 7200, expires_in=3600), {}


def _expires_exactly_now(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), issued_at=sim.now - 60, expires_in=60), {}


def _issued_in_future(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), issued_at=sim.now + CLOCK_SKEW_S + 1), {}


def _other_device(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign("pi-2", sim.release()), {}


def _replay_equal(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), sequence=5), {"highest_sequence": 5}


def _replay_lower(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return sim.assign(DEVICE, sim.release(), sequence=4), {"highest_sequence": 5}


def _tier_absent(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    release = sim.release(variants=[Tier.MICRO])
    return sim.assign(DEVICE, release, Tier.SMALL), {}


def _tier_above_device(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    release = sim.release(variants=[Tier.MICRO, Tier.SMALL])
    return sim.assign(DEVICE, release, Tier.SMALL), {"device_tier": Tier.MICRO}


def _too_little_ram(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    variant = make_variant(Tier.MICRO, min_ram_bytes=2 << 30)
    release = sim.release(variants={Tier.MICRO: variant})
    return sim.assign(DEVICE, release), {"hardware": capabilities(ram_bytes=1 << 30)}


def _too_large(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    payload, _ = _ok(sim)
    return payload + b" " * (MAX_ASSIGNMENT_BYTES - len(payload) + 1), {}


def _not_json(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return b'{"signed": {', {}


def _duplicate_key(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    payload, _ = _ok(sim)
    return b'{"signatures": [], ' + payload[1:], {}


def _nan(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return b'{"signed": {"sequence": NaN}, "signatures": []}', {}


def _huge_number(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return b'{"signed": {"issued_at": 1e999}, "signatures": []}', {}


def _not_an_envelope(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    return b'{"signed": {}, "signatures": [], "note": "x"}', {}


def _director_keys_expired(sim: TrustSimulator) -> tuple[bytes, dict[str, Any]]:
    sim.director_keys = sim.director_keys.model_copy(update={"expires_at": sim.now})
    return _ok(sim)


REJECTED: list[tuple[str, Case, type[ProtocolError], str]] = [
    ("no_signatures", _no_signatures, ThresholdError, "threshold_not_met"),
    ("wrong_director_key", _wrong_director_key, ThresholdError, "threshold_not_met"),
    ("release_1_of_2", _release_one_of_two, ThresholdError, "threshold_not_met"),
    ("release_same_key_twice", _release_same_key_twice, ThresholdError, "threshold_not_met"),
    ("director_forges_release", _director_forges_release, ThresholdError, "threshold_not_met"),
    ("byte_flipped_in_manifest", _byte_flipped_in_manifest, ThresholdError, "threshold_not_met"),
    (
        "byte_flipped_in_manifest_director_resigned",
        _byte_flipped_in_manifest_director_resigned,
        ThresholdError,
        "threshold_not_met",
    ),
    ("extra_field_unsigned", _extra_field_unsigned, ThresholdError, "threshold_not_met"),
    ("extra_field_in_assignment", _extra_field_in_assignment, MalformedPayload, "malformed"),
    ("extra_field_in_release", _extra_field_in_release, MalformedPayload, "malformed"),
    ("wrong_schema", _wrong_schema, SchemaMismatch, "wrong_schema"),
    ("release_as_assignment", _release_as_assignment, SchemaMismatch, "wrong_schema"),
    ("expired", _expired, ExpiredError, "expired"),
    ("expires_exactly_now", _expires_exactly_now, ExpiredError, "expired"),
    ("issued_in_future", _issued_in_future, NotYetValidError, "not_yet_valid"),
    ("other_device", _other_device, WrongDeviceError, "wrong_device"),
    ("replay_equal_sequence", _replay_equal, ReplayError, "replayed_sequence"),
    ("replay_lower_sequence", _replay_lower, ReplayError, "replayed_sequence"),
    ("tier_absent", _tier_absent, VariantMismatch, "no_variant"),
    ("tier_above_device", _tier_above_device, DoesNotFit, "does_not_fit"),
    ("too_little_ram", _too_little_ram, DoesNotFit, "does_not_fit"),
    ("too_large", _too_large, PayloadTooLarge, "too_large"),
    ("not_json", _not_json, MalformedPayload, "malformed"),
    ("duplicate_key", _duplicate_key, MalformedPayload, "malformed"),
    ("nan", _nan, MalformedPayload, "malformed"),
    ("huge_number", _huge_number, MalformedPayload, "malformed"),
    ("not_an_envelope", _not_an_envelope, MalformedPayload, "malformed"),
    ("director_keys_expired", _director_keys_expired, KeyListExpired, "keys_expired"),
]


@pytest.fixture
def sim() -> TrustSimulator:
    return TrustSimulator(release_threshold=2, n_release_keys=3)


def test_valid_assignment_is_accepted(sim: TrustSimulator) -> None:
    release = sim.release(version="1.2.0", variants=[Tier.MICRO, Tier.SMALL])
    payload = sim.assign(DEVICE, release, Tier.MICRO, sequence=7)

    verified = sim.verify(
        payload,
        device_id=DEVICE,
        highest_sequence=6,
        hardware=capabilities(ram_bytes=4 << 30),
        device_tier=Tier.SMALL,  # a bigger device may run a smaller variant
    )

    assert verified.assignment.sequence == 7
    assert verified.tier is Tier.MICRO
    assert verified.manifest.ref == "smollm2-135m@1.2.0"
    assert verified.variant == verified.manifest.variants[Tier.MICRO]
    assert verified.variant.sha256 == release["signed"]["variants"]["micro"]["sha256"]


def test_signed_assignment_bytes_are_the_canonical_envelope(sim: TrustSimulator) -> None:
    """The director stores and publishes these bytes without re-encoding the envelope:
    they must be exactly the canonical JSON a verifier computes, non-ASCII included."""
    release = sim.release(version="1.2.0", variants=[Tier.MICRO, Tier.SMALL])
    assignment = sim.assignment(DEVICE, release, Tier.SMALL, sequence=3)
    envelope, data = sign_assignment_bytes(assignment, sim._director_quorum())
    assert data == canonical_json(envelope)
    assert envelope == sign_assignment(assignment, sim._director_quorum())
    verified = sim.verify(data, device_id=DEVICE, highest_sequence=2)
    assert verified.assignment.sequence == 3

    # The release encoded once by the caller (a director signing a whole stage):
    # the same bytes, and a release that is not the assignment's is not hidden.
    again = sign_assignment_bytes(assignment, sim._director_quorum(),
                                  release_json=canonical_json(release))
    assert again == (envelope, data)

    signed = {"note": "grüße, 東京", "n": [1, 2.5, None], "z": {"b": 1, "a": 2}}
    envelope, data = make_envelope_bytes(signed, sim._director_quorum())
    assert data == canonical_json(envelope)


def test_canonical_object_splices_encoded_values_in_key_order() -> None:
    inner = {"é": [1, {"y": 2, "x": None}], "a": "東京"}
    fields = {"zeta": 1.5, "alpha": "x", "mid": {"b": 1, "a": 2}}
    assert canonical_object(fields, {"m": canonical_json(inner)}) == canonical_json(
        {**fields, "m": inner}
    )
    assert canonical_object({}, {}) == b"{}"
    with pytest.raises(ValueError, match="both"):
        canonical_object({"a": 1}, {"a": b"1"})


def test_release_cache_verifies_each_release_once_and_still_refuses_tampering(
    sim: TrustSimulator,
) -> None:
    release = sim.release(version="1.2.0", variants=[Tier.MICRO, Tier.SMALL])
    cache: dict = {}
    for i in range(3):
        device = f"dev-cache-{i}"
        verified = sim.verify(sim.assign(device, release, Tier.MICRO, sequence=2),
                              device_id=device, highest_sequence=1, release_cache=cache)
        assert verified.manifest.ref == "smollm2-135m@1.2.0"
    assert len(cache) == 1

    # The director re-signs a release whose manifest was altered: other bytes,
    # so the cache cannot vouch for it, and the release signature fails.
    def swap_sha(envelope: dict) -> None:
        envelope["signed"]["release"]["signed"]["variants"]["micro"]["sha256"] = "0" * 64

    forged = sim.tamper(sim.assign("dev-cache-0", release, Tier.MICRO, sequence=3),
                        swap_sha, resign=True)
    with pytest.raises(ThresholdError):
        sim.verify(forged, device_id="dev-cache-0", highest_sequence=2, release_cache=cache)
    # Checks of the device's own assignment still run with a warm cache.
    with pytest.raises(ReplayError):
        sim.verify(sim.assign("dev-cache-1", release, Tier.MICRO, sequence=2),
                   device_id="dev-cache-1", highest_sequence=2, release_cache=cache)


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [case[1:] for case in REJECTED],
    ids=[case[0] for case in REJECTED],
)
def test_assignment_rejected(
    sim: TrustSimulator, make: Case, error: type[ProtocolError], reason: str
) -> None:
    payload, kwargs = make(sim)
    with pytest.raises(error) as caught:
        sim.verify(payload, device_id=DEVICE, **kwargs)
    assert type(caught.value) is error
    assert caught.value.reason == reason


def test_threshold_error_names_the_role(sim: TrustSimulator) -> None:
    for make, role in (
        (_wrong_director_key, "director"),
        (_byte_flipped_in_manifest_director_resigned, "release"),
    ):
        payload, _ = make(sim)
        with pytest.raises(ThresholdError, match=f"by the {role} keys"):
            sim.verify(payload, device_id=DEVICE)


def test_director_threshold_above_one() -> None:
    sim = TrustSimulator(director_threshold=2, n_director_keys=2)
    release = sim.release()
    assert sim.verify(sim.assign(DEVICE, release), device_id=DEVICE).assignment.sequence == 1
    lone = sim.assign(DEVICE, release, signers=sim.director_signers[:1])
    with pytest.raises(ThresholdError):
        sim.verify(lone, device_id=DEVICE)


def test_wire_formatting_does_not_matter_but_content_does(sim: TrustSimulator) -> None:
    # Signatures cover the parsed value, so a relay that re-indents or
    # reorders keys breaks nothing; changing a value does.
    payload = sim.assign(DEVICE, sim.release())
    value = json.loads(payload)
    pretty = json.dumps(value, indent=2, ensure_ascii=True).encode()
    assert sim.verify(pretty, device_id=DEVICE).assignment.device_id == DEVICE

    value["signed"]["sequence"] = 2
    with pytest.raises(ThresholdError):
        sim.verify(json.dumps(value).encode(), device_id=DEVICE)


def test_release_signed_by_foreign_tooling_survives_embedding(sim: TrustSimulator) -> None:
    # A signer that writes released_at as an integer and omits optional
    # fields: the model would re-serialise both differently, so the embedded
    # release must be carried and verified raw.
    signed = sim.manifest().model_dump(mode="json", by_alias=True, exclude_none=True)
    signed["released_at"] = int(signed["released_at"])
    release = make_envelope(signed, sim.release_signers[:2])

    verified = sim.verify(sim.assign(DEVICE, release), device_id=DEVICE)

    assert verified.manifest.released_at == signed["released_at"]
    assert verified.assignment.release == release


def test_caller_misuse_is_value_error(sim: TrustSimulator) -> None:
    payload = sim.assign(DEVICE, sim.release())
    common = {"device_id": DEVICE, "now": sim.now, "highest_sequence": 0}
    with pytest.raises(ValueError, match="release key list"):
        verify_assignment(
            payload, release_keys=sim.director_keys, director_keys=sim.release_keys, **common
        )
    shared = KeyList.of("director", [sim.release_signers[0].public])
    with pytest.raises(ValueError, match="share a key"):
        verify_assignment(payload, release_keys=sim.release_keys, director_keys=shared, **common)
    with pytest.raises(ValueError, match="negative"):
        sim.verify(payload, device_id=DEVICE, highest_sequence=-1)


def test_reasons_are_distinct() -> None:
    classes = {case[2] for case in REJECTED} | {WrongRoleError, BadVersionError}
    reasons = [cls.reason for cls in classes]
    assert len(set(reasons)) == len(reasons)


# --- release manifests ------------------------------------------------------------


def test_verify_release_from_bytes(sim: TrustSimulator) -> None:
    release = sim.release(version="2.0.0-rc.1")
    manifest = verify_release(canonical_json(release), sim.release_keys, now=sim.now)
    assert isinstance(manifest, ReleaseManifest)
    assert manifest.version == "2.0.0-rc.1"

    with pytest.raises(ThresholdError):
        verify_release(flip_byte(canonical_json(release), "2.0.0-rc.1"), sim.release_keys)
    expired = sim.release_keys.model_copy(update={"expires_at": sim.now - 1})
    with pytest.raises(KeyListExpired):
        verify_release(release, expired, now=sim.now)
    with pytest.raises(ValueError, match="release keys"):
        verify_release(release, sim.director_keys)


def test_sign_release_refuses_what_devices_would_refuse(sim: TrustSimulator) -> None:
    # Every field within its own cap, but four-byte characters everywhere:
    # signing must fail loudly rather than ship a release no device accepts.
    prompt = GoldenPrompt(prompt="\U0001f600" * 1024, expected=["\U0001f600" * 128] * 8)
    health = HealthCheck(golden_prompts=[prompt] * 8, max_ttft_ms=1000.0)
    variants = {tier: make_variant(tier, health_check=health) for tier in Tier}
    manifest = sim.manifest(variants=variants)
    with pytest.raises(ValueError, match=f"limit {MAX_RELEASE_BYTES}"):
        sign_release(manifest, sim.release_signers[:2])
    with pytest.raises(ValueError, match="same key"):
        sign_release(sim.manifest(), [sim.release_signers[0]] * 2)


@pytest.mark.parametrize(
    "artifact",
    ["../model.gguf", "/abs/model.gguf", "a//b.gguf", "a/./b.gguf", "a/%2e%2e/b", "a\\b", ""],
)
def test_artifact_must_be_a_plain_relative_path(artifact: str) -> None:
    with pytest.raises(ValueError):
        make_variant(artifact=artifact)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"runtime_defaults": {"context": 99_999}}, "exceeds context_length"),
        ({"runtime_defaults": {"onnx_providers": ["CPUExecutionProvider"]}}, "onnx variants"),
        ({"health_check": {"max_ttft_ms": 100.0}}, "golden prompt"),
        ({"sha256": "A" * 64}, "sha256"),
        ({"size_bytes": True}, "size_bytes"),
    ],
)
def test_variant_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_variant(**overrides)


def test_embedding_variant_needs_no_golden_prompt() -> None:
    variant = make_variant(
        format="onnx",
        runtime_defaults={"embeddings": True, "onnx_providers": ["CPUExecutionProvider"]},
        health_check={"max_ttft_ms": 500.0},
    )
    assert variant.health_check.golden_prompts == []


# --- key lists and rotation ---------------------------------------------------------


@pytest.mark.parametrize("role", ["release", "director"])
def test_key_rotation_valid(sim: TrustSimulator, role: str) -> None:
    rotation = sim.rotate(role, n_keys=3, threshold=2)  # type: ignore[arg-type]
    current = sim.release_keys if role == "release" else sim.director_keys

    new = verify_key_rotation(current, rotation.payload)

    assert new == rotation.key_list
    assert new.version == current.version + 1
    assert set(trusted_keys(new)) == {k.key_id for k in rotation.signers}


def test_key_rotation_chain_then_old_keys_stop_working(sim: TrustSimulator) -> None:
    old_signers = sim.release_signers
    for _ in range(2):
        rotation = sim.rotate("release")
        verify_key_rotation(sim.release_keys, rotation.payload)
        sim.adopt(rotation)
    assert sim.release_keys.version == 3

    assert sim.verify(sim.assign(DEVICE, sim.release()), device_id=DEVICE)
    stale = sim.assign(DEVICE, sim.release(signers=old_signers[:2]))
    with pytest.raises(ThresholdError):
        sim.verify(stale, device_id=DEVICE)


ROTATION_REJECTED: list[tuple[str, dict[str, Any], type[ProtocolError], str]] = [
    ("old_threshold_not_met", {"sign_with_old": 1}, ThresholdError, "threshold_not_met"),
    ("not_signed_by_old", {"sign_with_old": 0}, ThresholdError, "threshold_not_met"),
    ("not_signed_by_new", {"sign_with_new": False}, ThresholdError, "threshold_not_met"),
    ("version_skip", {"version": 3}, BadVersionError, "bad_version"),
    ("version_replay", {"version": 1}, BadVersionError, "bad_version"),
    ("wrong_role", {"new_role": "director"}, WrongRoleError, "wrong_role"),
]


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [case[1:] for case in ROTATION_REJECTED],
    ids=[case[0] for case in ROTATION_REJECTED],
)
def test_key_rotation_rejected(
    sim: TrustSimulator, overrides: dict[str, Any], error: type[ProtocolError], reason: str
) -> None:
    rotation = sim.rotate("release", **overrides)
    with pytest.raises(error) as caught:
        verify_key_rotation(sim.release_keys, rotation.payload)
    assert type(caught.value) is error
    assert caught.value.reason == reason


def test_key_rotation_rejects_a_signed_release(sim: TrustSimulator) -> None:
    # Same signers, other document: the schema keeps them apart.
    with pytest.raises(SchemaMismatch):
        verify_key_rotation(sim.release_keys, canonical_json(sim.release()))


def test_key_list_validation() -> None:
    a, b = SigningKey.generate().public, SigningKey.generate().public
    with pytest.raises(ValueError, match="threshold 2 exceeds"):
        KeyList.of("release", [a], threshold=2)
    with pytest.raises(ValueError, match="does not match"):
        KeyList(role="release", version=1, threshold=1, keys={a.key_id: b.to_b64()})
    with pytest.raises(ValueError):
        KeyList(role="release", version=1, threshold=1, keys={a.key_id: "not base64!"})
    with pytest.raises(ValueError):
        KeyList.of("admin", [a])  # type: ignore[arg-type]
    kl = KeyList.of("director", [a, b], threshold=2, expires_at=100.0)
    assert not kl.is_expired(99.9)
    assert kl.is_expired(100.0)


# --- canonical JSON and semver ----------------------------------------------------------


def test_canonical_json_is_stable() -> None:
    one = {"b": 1, "a": {"y": [1, 2], "x": "é✓"}, "c": None}
    two = {"c": None, "a": {"x": "é✓", "y": [1, 2]}, "b": 1}
    assert canonical_json(one) == canonical_json(two)
    assert canonical_json(one) == '{"a":{"x":"é✓","y":[1,2]},"b":1,"c":null}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_semver_ordering() -> None:
    ordered = [*SPEC_PRECEDENCE_CHAIN, "1.0.1", "1.2.0", "1.10.0", "2.0.0"]
    assert sorted(reversed(ordered), key=semver_key) == ordered
    assert semver_key("1.0.0+build.5") == semver_key("1.0.0")


@pytest.mark.parametrize(
    "version", ["1.0", "01.0.0", "1.0.0-", "1.0.0-01", "v1.0.0", "1.0.0\n", "\uff11.0.0", "1.0.0+"]
)
def test_semver_rejects(sim: TrustSimulator, version: str) -> None:
    with pytest.raises(ValueError):
        semver_key(version)
    with pytest.raises(ValueError):
        sim.manifest(version=version)


# --- fit check ------------------------------------------------------------------------


def test_fit_check_ok() -> None:
    variant = make_variant(Tier.MICRO)  # 100 MB, 135M params, runtime context 2048
    result = fit_check(variant, ram_bytes=4 << 30, disk_free_bytes=1 << 30)
    assert result.ok
    assert result.reason == "ok"
    assert result.disk_needed_bytes == 200_000_000
    assert result.ram_needed_bytes == 120_000_000 + kv_cache_allowance_bytes(135_000_000, 2048)


def test_fit_check_too_little_disk() -> None:
    variant = make_variant(Tier.MICRO)
    result = fit_check(variant, ram_bytes=4 << 30, disk_free_bytes=150_000_000)
    assert (result.ok, result.reason) == (False, "insufficient_disk")
    # a larger stated figure wins over size * staging_factor
    assert disk_needed_bytes(make_variant(min_disk_bytes=500_000_000)) == 500_000_000


def test_fit_check_too_little_ram() -> None:
    variant = make_variant(Tier.MICRO, min_ram_bytes=1 << 30)
    assert ram_needed_bytes(variant) == 1 << 30  # the stated figure is taken as is
    result = fit_check(variant, ram_bytes=(1 << 30) - 1, disk_free_bytes=0)
    assert result.ok is False
    assert result.reason == "insufficient_ram"  # RAM first: cleanup cannot fix it
    reserved = fit_check(
        variant, ram_bytes=2 << 30, disk_free_bytes=1 << 30, os_reserved_bytes=(1 << 30) + 1
    )
    assert reserved.reason == "insufficient_ram"


def test_kv_allowance_is_conservative() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads x 64 dims, f16 -> 2*30*192*2 bytes/token.
    assert kv_cache_allowance_bytes(135_000_000, 1) >= 2 * 30 * 192 * 2
    # Llama-2-7B: 32 layers, 4096 dims, no GQA -> 2*32*4096*2 bytes/token.
    assert kv_cache_allowance_bytes(6_740_000_000, 1) >= 2 * 32 * 4096 * 2
    assert KV_BYTES_PER_TOKEN_PER_SQRT_PARAM == 8
    with pytest.raises(ValueError):
        fit_check(make_variant(), ram_bytes=1, disk_free_bytes=1, staging_factor=0.5)


def test_pinned_key_list_needs_its_own_threshold_and_role() -> None:
    from protocol import SigningKey, sign_key_list, verify_pinned_key_list
    from protocol.canonical import canonical_json
    from protocol.errors import ThresholdError, WrongRoleError

    a, b, stranger = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    keys = KeyList.of("release", [a.public, b.public], threshold=2)
    pinned = verify_pinned_key_list(canonical_json(sign_key_list(keys, [a, b])), "release")
    assert pinned == keys
    with pytest.raises(ThresholdError):
        verify_pinned_key_list(canonical_json(sign_key_list(keys, [a, stranger])), "release")
    with pytest.raises(WrongRoleError):
        verify_pinned_key_list(canonical_json(sign_key_list(keys, [a, b])), "director")
