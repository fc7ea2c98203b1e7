"""The desired-state set (``slmfleet.assignment/2``): document checks refuse the whole,
entry checks refuse one entry, units fall together, the old form reads as a set of one;
and the set's fit check, hello/2 and telemetry/2."""

from __future__ import annotations

import json

import pytest

from protocol import (
    ActiveModel,
    ExpiredError,
    Hello,
    MalformedPayload,
    ReplayError,
    SetMember,
    SigningKey,
    Telemetry,
    ThresholdError,
    Tier,
    VariantMismatch,
    WrongDeviceError,
    decode,
    encode,
    set_fit_check,
)
from protocol.fit import ram_needed_bytes
from tests.support.signer import TrustSimulator, capabilities, make_variant

DEVICE = "kiosk-1"


@pytest.fixture()
def sim() -> TrustSimulator:
    return TrustSimulator()


def _two(sim: TrustSimulator, **kwargs: object) -> bytes:
    return sim.assign_set(DEVICE, {
        "smollm2-135m": sim.release("smollm2-135m", "1.0.0"),
        "embedder": sim.release("embedder", "2.0.0"),
    }, **kwargs)  # type: ignore[arg-type]


def test_a_set_of_two_verifies_with_each_entry_its_own(sim: TrustSimulator) -> None:
    verified = sim.verify_set(_two(sim), device_id=DEVICE)
    assert set(verified.entries) == {"smollm2-135m", "embedder"}
    assert not verified.refused and not verified.legacy
    chat = verified.entries["smollm2-135m"]
    assert chat.manifest.ref == "smollm2-135m@1.0.0"
    assert chat.assignment_id == f"a-{DEVICE}-smollm2-135m-1"
    assert verified.entries["embedder"].variant.sha256 != chat.variant.sha256


@pytest.mark.parametrize("attack,error", [
    # the whole document: one signature covers every entry
    ("entry_swapped_from_another_device", ThresholdError),
    ("wrong_device", WrongDeviceError),
    ("replayed_older", ReplayError),
    ("expired", ExpiredError),
    ("unsigned_by_director", ThresholdError),
])
def test_document_level_attacks_refuse_the_whole_set(
    sim: TrustSimulator, attack: str, error: type[Exception],
) -> None:
    highest = 0
    if attack == "entry_swapped_from_another_device":
        other = json.loads(sim.assign_set("kiosk-2", {
            "embedder": sim.release("embedder", "9.0.0")}))
        payload = sim.tamper(_two(sim), lambda env: env["signed"]["models"].update(
            embedder=other["signed"]["models"]["embedder"]))
    elif attack == "wrong_device":
        payload = sim.assign_set("kiosk-2", {"embedder": sim.release("embedder")})
    elif attack == "replayed_older":
        payload, highest = _two(sim, sequence=3), 3
    elif attack == "expired":
        payload = _two(sim, expires_in=60.0)
        sim.now += 61.0
    else:
        payload = _two(sim, signers=[SigningKey.generate()])
    with pytest.raises(error):
        sim.verify_set(payload, device_id=DEVICE, highest_sequence=highest)


def test_an_entry_dropped_by_a_replayed_older_document_is_refused(sim: TrustSimulator) -> None:
    older = sim.assign_set(DEVICE, {"smollm2-135m": sim.release()}, sequence=1)
    newer = _two(sim, sequence=2)
    assert len(sim.verify_set(newer, device_id=DEVICE, highest_sequence=1).entries) == 2
    with pytest.raises(ReplayError):
        sim.verify_set(older, device_id=DEVICE, highest_sequence=2)


def test_a_bad_entry_is_refused_alone(sim: TrustSimulator) -> None:
    forged = sim.release("embedder", "2.0.0", signers=[SigningKey.generate()])
    payload = sim.assign_set(DEVICE, {"smollm2-135m": sim.release(), "embedder": forged})
    verified = sim.verify_set(payload, device_id=DEVICE)
    assert set(verified.entries) == {"smollm2-135m"}
    refused = verified.refused["embedder"]
    assert isinstance(refused.error, ThresholdError)
    assert refused.assignment_id == f"a-{DEVICE}-embedder-1"


def test_an_entry_named_after_another_release_is_refused(sim: TrustSimulator) -> None:
    payload = sim.assign_set(DEVICE, {"embedder": sim.release("smollm2-135m")})
    verified = sim.verify_set(payload, device_id=DEVICE)
    assert not verified.entries
    assert isinstance(verified.refused["embedder"].error, MalformedPayload)
    assert "smollm2-135m@1.0.0" in str(verified.refused["embedder"].error)


def test_a_unit_falls_together(sim: TrustSimulator) -> None:
    small_only = sim.release("adapter", "1.0.0", variants=(Tier.SMALL,))
    payload = sim.assign_set(
        DEVICE, {"smollm2-135m": sim.release(), "adapter": small_only,
                 "embedder": sim.release("embedder")},
        units={"smollm2-135m": "tuned", "adapter": "tuned"},
    )
    verified = sim.verify_set(payload, device_id=DEVICE)
    assert set(verified.entries) == {"embedder"}
    assert isinstance(verified.refused["adapter"].error, VariantMismatch)
    assert "unit 'tuned'" in str(verified.refused["smollm2-135m"].error)


def test_the_old_single_form_reads_as_a_set_of_one(sim: TrustSimulator) -> None:
    verified = sim.verify_set(sim.assign(DEVICE, sim.release()), device_id=DEVICE)
    assert verified.legacy
    assert list(verified.entries) == ["smollm2-135m"]
    assert verified.entries["smollm2-135m"].assignment_id == f"a-{DEVICE}-1"


def test_a_variant_too_big_for_the_device_refuses_that_entry(sim: TrustSimulator) -> None:
    big = make_variant(size_bytes=3 << 30)
    payload = sim.assign_set(DEVICE, {
        "smollm2-135m": sim.release(),
        "big": sim.release("big", variants={Tier.MICRO: big}),
    })
    verified = sim.verify_set(payload, device_id=DEVICE,
                              hardware=capabilities(ram_bytes=2 << 30))
    assert set(verified.entries) == {"smollm2-135m"}
    assert "needs" in str(verified.refused["big"].error)


def test_the_set_fit_check_sums_what_is_loaded_together() -> None:
    a, b = make_variant(size_bytes=600 << 20), make_variant(size_bytes=500 << 20)
    ram = ram_needed_bytes(a) + ram_needed_bytes(b) + ram_needed_bytes(a) // 2
    members = [SetMember("a", a), SetMember("b", b)]
    # each alone fits, with its own warm-swap room
    for member in members:
        assert set_fit_check([member], ram_bytes=ram, disk_free_bytes=10 << 30).ok
    together = set_fit_check(members, ram_bytes=ram, disk_free_bytes=10 << 30)
    assert not together.ok and together.reason == "insufficient_ram"
    assert "2 loaded together" in together.detail and "a " in together.detail
    # with a cap of one loaded model, only the largest counts (plus its candidate)
    capped = set_fit_check(members, ram_bytes=ram, disk_free_bytes=10 << 30, max_loaded=1)
    assert capped.ok, capped.detail
    # installed models need no disk
    disk = set_fit_check([SetMember("a", a, download=False), SetMember("b", b)],
                         ram_bytes=16 << 30, disk_free_bytes=(500 << 20) * 2)
    assert disk.ok and disk.disk_needed_bytes == (500 << 20) * 2


def test_hello_two_lists_models_and_the_old_form_still_reads() -> None:
    model = ActiveModel(name="embedder", version="2.0.0", tier=Tier.MICRO, sha256="a" * 64)
    base = {"device_id": DEVICE, "ts": 1.0, "agent_version": "1", "profile": "p",
            "tier": "micro", "capabilities": capabilities().model_dump(mode="json")}
    new = Hello.model_validate({**base, "schema": "slmfleet.hello/2", "models": [
        model.model_dump(mode="json")]})
    assert new.speaks_sets and new.active_models() == [model]
    again = decode("hello", encode(new))
    assert again.active_models() == [model]
    old = Hello.model_validate({**base, "active_model": model.model_dump(mode="json")})
    assert not old.speaks_sets and old.active_models() == [model]
    with pytest.raises(ValueError, match="hello/2"):
        Hello.model_validate({**base, "models": [model.model_dump(mode="json")]})


def test_telemetry_two_carries_loads_and_the_old_form_refuses_them() -> None:
    base = {"device_id": DEVICE, "ts": 1.0, "seq": 1, "uptime_s": 1.0, "cpu_percent": 1.0,
            "ram_used_bytes": 1}
    stats = [{"model": "a", "version": "1", "loads": 2, "load_ms": 310.0}]
    new = Telemetry.model_validate({**base, "schema": "slmfleet.telemetry/2",
                                    "models": ["a@1", "b@2"], "inference": stats})
    assert new.active_refs() == ["a@1", "b@2"] and new.inference[0].loads == 2
    with pytest.raises(ValueError, match="telemetry/2"):
        Telemetry.model_validate({**base, "inference": stats})
