"""Rule E2a of agent.update.intake: a new adapter's base must be the build active here."""

from __future__ import annotations

import hashlib

import protocol as p
from agent.trust import TrustRoots
from agent.update.intake import Action, Change, Decision, DeviceFacts, accepted, decide
from agent.update.state import UpdateFile
from tests.support.adapters import adapter_of, adapter_variant
from tests.support.signer import TrustSimulator, capabilities, fake_sha256
from tests.support.updates import sign_set

DEVICE = "dev-1"
SIM = TrustSimulator()
TRUST = TrustRoots(release=SIM.release_keys, director=SIM.director_keys)
FACTS = DeviceFacts(DEVICE, capabilities(), p.Tier.MICRO)
BASE_SHA = fake_sha256("smollm2-135m", "micro")
BASE = SIM.release("smollm2-135m", "1.1.0")
ADAPTER = SIM.release("support-formal", "1.0.0",
                      variants={p.Tier.MICRO: adapter_variant()}, adapter_of=adapter_of(BASE_SHA))
MATCHING = {"smollm2-135m": p.ActiveBase("smollm2-135m", "1.1.0", BASE_SHA)}


def payload(sequence: int) -> bytes:
    return sign_set(SIM, DEVICE, {"smollm2-135m": BASE, "support-formal": ADAPTER},
                    sequence=sequence, artifact_url_base="https://cp.example/artifacts",
                    ids={"smollm2-135m": "a-base", "support-formal": "a-adapter"})


def run(data: bytes, active: dict[str, p.ActiveBase], record: UpdateFile | None = None
        ) -> Decision:
    return decide(data, hashlib.sha256(data).hexdigest(), device=FACTS, trust=TRUST,
                  trust_problem=None, record=record or UpdateFile(), last_rejected=None,
                  disabled=None, now=SIM.now, active=active)


def plan_of(decision: Decision, name: str):
    return next(plan for plan in decision.plans if plan.name == name)


def test_an_adapter_for_the_active_build_is_a_new_update() -> None:
    decision = run(payload(1), MATCHING)
    assert decision.action is Action.ACCEPT
    assert plan_of(decision, "support-formal").change is Change.NEW


def test_an_adapter_for_another_build_is_refused_and_its_base_stands() -> None:
    other = {"smollm2-135m": p.ActiveBase("smollm2-135m", "1.1.0", "cd" * 32)}
    decision = run(payload(1), other)
    assert decision.action is Action.ACCEPT  # the base's entry stands
    plan = plan_of(decision, "support-formal")
    assert plan.change is Change.REJECTED and plan.code is p.EventCode.BASE_MISMATCH
    assert plan.reason.startswith("base_mismatch: ") and "sha256" in plan.reason
    assert plan_of(decision, "smollm2-135m").change is Change.NEW


def test_an_adapter_alone_without_its_base_is_refused_as_a_document() -> None:
    data = sign_set(SIM, DEVICE, {"support-formal": ADAPTER}, sequence=1,
                    artifact_url_base="https://cp.example/artifacts")
    decision = run(data, {})
    assert decision.action is Action.REJECT and decision.code is p.EventCode.BASE_MISMATCH
    assert "not active here" in (decision.reason or "")


def test_a_re_signed_adapter_is_a_refresh_even_after_its_base_changed() -> None:
    """Rule E2a looks at new updates only: a re-signed set must not report it again."""
    first = payload(1)
    record = accepted(UpdateFile(), first, run(first, MATCHING), update_ids=lambda: "u",
                      now=SIM.now)
    other = {"smollm2-135m": p.ActiveBase("smollm2-135m", "1.2.0", "cd" * 32)}
    decision = run(payload(2), other, record)
    assert decision.action is Action.REFRESH


def unit_payload(adapter: dict, sequence: int = 1) -> bytes:
    """The base and ``adapter`` as one unit."""
    return sign_set(SIM, DEVICE, {"smollm2-135m": BASE, "support-formal": adapter},
                    sequence=sequence, artifact_url_base="https://cp.example/artifacts",
                    ids={"smollm2-135m": "a-base", "support-formal": "a-adapter"},
                    units={"smollm2-135m": "formal", "support-formal": "formal"})


def test_in_a_unit_the_adapter_is_checked_against_the_build_its_unit_brings() -> None:
    other = {"smollm2-135m": p.ActiveBase("smollm2-135m", "1.0.0", "cd" * 32)}
    for active in (other, {}):  # another build active, or no base at all yet
        decision = run(unit_payload(ADAPTER), active)
        assert decision.action is Action.ACCEPT
        assert {plan.name: plan.change for plan in decision.plans} == {
            "smollm2-135m": Change.NEW, "support-formal": Change.NEW}


def test_in_a_unit_an_adapter_for_another_build_is_refused_with_its_base() -> None:
    wrong = SIM.release("support-formal", "1.0.0", variants={p.Tier.MICRO: adapter_variant()},
                        adapter_of=adapter_of("ab" * 32))
    decision = run(unit_payload(wrong), {})
    assert decision.action is Action.REJECT and decision.code is p.EventCode.BASE_MISMATCH
    # The names match; the hash does not, and the whole unit goes with it.
    assert "sha256" in (decision.reason or "")
    not_in_unit = sign_set(SIM, DEVICE, {"smollm2-135m": BASE, "support-formal": ADAPTER},
                           sequence=1, artifact_url_base="https://cp.example/artifacts")
    decision = run(not_in_unit, {})  # outside a unit the base must be active already
    plan = plan_of(decision, "support-formal")
    assert plan.change is Change.REJECTED and "not active here" in (plan.reason or "")
    assert plan_of(decision, "smollm2-135m").change is Change.NEW
