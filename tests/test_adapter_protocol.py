"""Adapter releases in the protocol: the schema's refusals, the signatures, rules B1-B4."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from protocol import (
    ActiveBase,
    AdapterBase,
    BaseMismatch,
    EventCode,
    MalformedPayload,
    ReleaseManifest,
    ThresholdError,
    Tier,
    canonical_json,
    check_base,
    in_range,
    split_model,
    verify_release,
)
from protocol.adapter import parse_range
from tests.support.adapters import adapter_of, adapter_variant
from tests.support.signer import TrustSimulator, fake_sha256, flip_byte, make_variant

BASE_SHA = fake_sha256("smollm2-135m", "micro")
OTHER_SHA = fake_sha256("smollm2-135m", "micro", "requantized")


@pytest.fixture(scope="module")
def sim() -> TrustSimulator:
    return TrustSimulator()


def adapter_manifest(sim: TrustSimulator, **overrides: Any) -> ReleaseManifest:
    fields: dict[str, Any] = {"variants": {Tier.MICRO: adapter_variant()},
                              "adapter_of": adapter_of(BASE_SHA)}
    fields.update(overrides)
    return sim.manifest("support-formal", "1.0.0", **fields)


def test_adapter_release_signs_and_verifies_like_any_release(sim: TrustSimulator) -> None:
    envelope = sim.release("support-formal", "1.0.0", variants={Tier.MICRO: adapter_variant()},
                           adapter_of=adapter_of(BASE_SHA, scale=0.5))
    manifest = verify_release(envelope, sim.release_keys, now=sim.now)
    assert manifest.adapter_of is not None
    assert manifest.adapter_of.name == "smollm2-135m"
    assert manifest.adapter_of.sha256[Tier.MICRO] == BASE_SHA
    assert manifest.adapter_of.scale == 0.5
    assert manifest.variants[Tier.MICRO].format == "gguf-lora"


def test_a_changed_base_hash_breaks_the_release_signature(sim: TrustSimulator) -> None:
    envelope = sim.release("support-formal", "1.0.0", variants={Tier.MICRO: adapter_variant()},
                           adapter_of=adapter_of(BASE_SHA))
    tampered = flip_byte(canonical_json(envelope), BASE_SHA)
    with pytest.raises(ThresholdError) as err:
        verify_release(tampered, sim.release_keys, now=sim.now)
    assert err.value.reason == "threshold_not_met"


SCHEMA_REFUSALS = [
    ("lora variant without adapter_of",
     {"adapter_of": None}, "needs adapter_of"),
    ("adapter_of on a plain model",
     {"variants": {Tier.MICRO: make_variant()}}, "only gguf-lora variants"),
    ("mixed variants",
     {"variants": {Tier.MICRO: adapter_variant(), Tier.SMALL: make_variant(Tier.SMALL)}},
     "only gguf-lora variants"),
    ("no base hash for a variant's tier",
     {"variants": {Tier.MICRO: adapter_variant(),
                   Tier.SMALL: adapter_variant(tier=Tier.SMALL)}},
     r"names no base for tier\(s\) small"),
    ("its own base",
     {"adapter_of": adapter_of(BASE_SHA, name="support-formal")}, "its own base"),
]


@pytest.mark.parametrize(("row", "overrides", "message"), SCHEMA_REFUSALS,
                         ids=[row[0] for row in SCHEMA_REFUSALS])
def test_schema_refuses(sim: TrustSimulator, row: str, overrides: dict[str, Any],
                        message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        adapter_manifest(sim, **overrides)


BINDING_REFUSALS = [
    ("bad range", {"versions": "1.1.0"}, "not a comparator"),
    ("range bound not semver", {"versions": ">=1.1"}, "not a semantic version"),
    ("too many comparators", {"versions": ">=1.0.0,<2.0.0,>0.1.0,<3.0.0,==1.0.0"}, "1 to 4"),
    ("short base hash", {"sha256": {"micro": "abc"}}, "pattern"),
    ("no base hash", {"sha256": {}}, "at least 1"),
    ("unknown tier", {"sha256": {"huge": BASE_SHA}}, "micro"),
    ("zero scale", {"scale": 0.0}, "greater than 0"),
    ("unknown field", {"base_url": "x"}, "Extra inputs"),
]


@pytest.mark.parametrize(("row", "overrides", "message"), BINDING_REFUSALS,
                         ids=[row[0] for row in BINDING_REFUSALS])
def test_binding_refuses(row: str, overrides: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"name": "smollm2-135m", "versions": ">=1.1.0",
                              "sha256": {"micro": BASE_SHA}}
    fields.update(overrides)
    with pytest.raises(ValidationError, match=message):
        AdapterBase.model_validate(fields)


def test_a_tampered_unsigned_field_is_refused_as_malformed(sim: TrustSimulator) -> None:
    envelope = sim.release("support-formal", "1.0.0", variants={Tier.MICRO: adapter_variant()},
                           adapter_of=adapter_of(BASE_SHA))
    envelope["signed"]["adapter_of"]["scale"] = 9.0  # re-signed: the schema still says no
    resigned = sim.resign_release(envelope)
    with pytest.raises(MalformedPayload):
        verify_release(resigned, sim.release_keys, now=sim.now)


@pytest.mark.parametrize(("version", "text", "inside"), [
    ("1.1.0", ">=1.1.0,<2.0.0", True),
    ("1.9.9", ">=1.1.0,<2.0.0", True),
    ("2.0.0", ">=1.1.0,<2.0.0", False),
    ("1.0.9", ">=1.1.0,<2.0.0", False),
    ("2.0.0-rc.1", "<2.0.0", True),
    ("1.1.0", "==1.1.0", True),
    ("1.1.1", "==1.1.0", False),
    ("1.1.0", ">1.1.0", False),
    ("1.1.0", "<=1.1.0", True),
])
def test_version_ranges(version: str, text: str, inside: bool) -> None:
    assert in_range(version, text) is inside


def test_parse_range_reads_comparators() -> None:
    assert parse_range(">=1.1.0, <2.0.0") == [(">=", "1.1.0"), ("<", "2.0.0")]


ACTIVE = {"smollm2-135m": ActiveBase("smollm2-135m", "1.1.0", BASE_SHA)}

BASE_ROWS = [
    ("base not active", {}, "not active here"),
    ("another base name", {"other": ActiveBase("other", "1.1.0", BASE_SHA)}, "not active here"),
    ("base version out of range",
     {"smollm2-135m": ActiveBase("smollm2-135m", "2.0.0", BASE_SHA)}, "active is 2.0.0"),
    ("same name and version, other hash",
     {"smollm2-135m": ActiveBase("smollm2-135m", "1.1.0", OTHER_SHA)}, "sha256"),
]


@pytest.mark.parametrize(("row", "active", "message"), BASE_ROWS,
                         ids=[row[0] for row in BASE_ROWS])
def test_check_base_refuses(sim: TrustSimulator, row: str, active: dict[str, ActiveBase],
                            message: str) -> None:
    with pytest.raises(BaseMismatch, match=message) as err:
        check_base(adapter_manifest(sim), Tier.MICRO, active)
    assert err.value.reason == "base_mismatch" == EventCode.BASE_MISMATCH.value


def test_check_base_refuses_a_tier_the_adapter_names_no_base_for(sim: TrustSimulator) -> None:
    manifest = adapter_manifest(sim)
    with pytest.raises(BaseMismatch):
        check_base(manifest, Tier.SMALL, ACTIVE)


def test_check_base_accepts_the_matching_base(sim: TrustSimulator) -> None:
    binding = check_base(adapter_manifest(sim), Tier.MICRO, ACTIVE)
    assert binding is not None and binding.name == "smollm2-135m"
    assert check_base(sim.manifest(), Tier.MICRO, ACTIVE) is None  # B1: not an adapter


@pytest.mark.parametrize(("requested", "split"), [
    ("smollm2-135m+support-formal", ("smollm2-135m", "support-formal")),
    ("smollm2-135m", ("smollm2-135m", None)),
    ("smollm2-135m+", ("smollm2-135m", None)),
])
def test_split_model(requested: str, split: tuple[str, str | None]) -> None:
    assert split_model(requested) == split
