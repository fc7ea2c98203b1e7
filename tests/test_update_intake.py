"""The intake decision on its own: rules I1-I8 and E1-E5 of agent/update/intake.py.

No agent, no broker, no disk: real signed payloads from the trust simulator,
an update record built in memory, and the clock passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import protocol as p
from agent.trust import TrustRoots
from agent.update.intake import Action, Change, Decision, DeviceFacts, accepted, decide, refreshed
from agent.update.state import UpdateFile
from tests.support.signer import TrustSimulator, capabilities
from tests.support.updates import sign_set

DEVICE = "dev-1"
SIM = TrustSimulator()
TRUST = TrustRoots(release=SIM.release_keys, director=SIM.director_keys)
FACTS = DeviceFacts(DEVICE, capabilities(), p.Tier.MICRO)
RELEASE = SIM.release("m", "1.0.0")


def assign(sequence: int = 1, *, release: dict | None = None, **kwargs) -> bytes:
    kwargs.setdefault("assignment_id", "a-1")
    return SIM.assign(DEVICE, RELEASE if release is None else release, sequence=sequence,
                      **kwargs)


def run(payload: bytes, record: UpdateFile | None = None, *, trust: TrustRoots | None = TRUST,
        last_rejected: str | None = None, disabled: str | None = None) -> Decision:
    return decide(
        payload, hashlib.sha256(payload).hexdigest(),
        device=FACTS, trust=trust, trust_problem=None if trust else "key file missing",
        record=record or UpdateFile(), last_rejected=last_rejected, disabled=disabled,
        now=SIM.now,
    )


def holding(payload: bytes, record: UpdateFile | None = None) -> UpdateFile:
    """The update file after ``payload`` was accepted."""
    record = record or UpdateFile()
    return accepted(record, payload, run(payload, record), update_ids=lambda: "u-1", now=SIM.now)


def assign_set(sequence: int, releases: dict, **kwargs) -> bytes:
    kwargs.setdefault("ids", {name: f"a-{name}" for name in releases})
    return sign_set(SIM, DEVICE, releases, sequence=sequence,
                    artifact_url_base="https://cp.example/artifacts", **kwargs)


@dataclass(frozen=True)
class Row:
    decide: Callable[[], Decision]
    action: Action
    code: p.EventCode | None = None
    replay: bool = False


def unsigned(release: dict) -> dict:
    """A release whose signatures were stripped: refused on its own."""
    return {**release, "signatures": []}


FIRST = assign(1)
EMBED = SIM.release("e", "1.0.0")
ROWS = {
    "I1 empty payload": Row(lambda: run(b""), Action.IGNORE),
    "I2 the accepted payload again": Row(lambda: run(FIRST, holding(FIRST)), Action.IGNORE),
    "I2 the refused payload again": Row(
        lambda: run(FIRST, last_rejected=hashlib.sha256(FIRST).hexdigest()), Action.IGNORE
    ),
    "I3 unreadable record": Row(
        lambda: run(FIRST, disabled="torn file"), Action.REJECT, p.EventCode.STATE_CORRUPT
    ),
    "I4 no pinned keys": Row(
        lambda: run(FIRST, trust=None), Action.REJECT, p.EventCode.KEYS_UNAVAILABLE
    ),
    "I5 bad signature": Row(
        lambda: run(SIM.tamper(FIRST, lambda e: e.update(signatures=[]))),
        Action.REJECT, p.EventCode.THRESHOLD_NOT_MET,
    ),
    "I5 expired": Row(
        lambda: run(assign(issued_at=SIM.now - 7200, expires_in=3600)),
        Action.REJECT, p.EventCode.EXPIRED,
    ),
    "I5 replayed sequence": Row(
        lambda: run(assign(1, assignment_id="a-old"), holding(assign(2, assignment_id="a-2"))),
        Action.REJECT, p.EventCode.REPLAYED_SEQUENCE, replay=True,
    ),
    "I6 the one entry unusable as a store key (E2)": Row(
        lambda: run(assign(release=SIM.release("m..x", "1.0.0"))),  # ".." is never a path
        Action.REJECT, p.EventCode.MALFORMED,
    ),
    "I6 every entry of a set refused (E1)": Row(
        lambda: run(assign_set(1, {"m": unsigned(RELEASE)})),
        Action.REJECT, p.EventCode.THRESHOLD_NOT_MET,
    ),
    "I7 re-signed with a higher sequence": Row(
        lambda: run(assign(2), holding(FIRST)), Action.REFRESH
    ),
    "I7 a set re-signed": Row(
        lambda: run(assign_set(2, {"m": RELEASE, "e": EMBED}),
                    holding(assign_set(1, {"m": RELEASE, "e": EMBED}))), Action.REFRESH
    ),
    "I8 new assignment": Row(lambda: run(FIRST), Action.ACCEPT),
    "I8 another release under the same id": Row(
        lambda: run(assign(2, release=SIM.release("m", "2.0.0")), holding(FIRST)), Action.ACCEPT
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_intake_rule(row: Row) -> None:
    decision = row.decide()
    assert (decision.action, decision.code, decision.replay) == (row.action, row.code, row.replay)
    if row.action is Action.REJECT:
        assert decision.reason is not None and decision.reason.startswith(f"{row.code}: ")
        assert decision.verified is None
    if row.action in (Action.REFRESH, Action.ACCEPT):
        assert decision.verified is not None and decision.reason is None


def _changes(decision: Decision) -> dict[str, Change]:
    return {plan.name: plan.change for plan in decision.plans}


def test_set_entries_each_get_their_own_change() -> None:
    held = holding(assign_set(1, {"m": RELEASE, "e": EMBED, "old": SIM.release("old", "1.0.0")}))
    later = assign_set(2, {
        "m": RELEASE,                                  # E3: unchanged
        "e": SIM.release("e", "2.0.0"),                # E4: a new release
        "bad": unsigned(SIM.release("bad", "1.0.0")),  # E1: refused on its own
    }, ids={"m": "a-m", "e": "a-e2", "bad": "a-bad"})
    decision = run(later, held)
    assert decision.action is Action.ACCEPT
    assert _changes(decision) == {"m": Change.REFRESH, "e": Change.NEW, "bad": Change.REJECTED,
                                  "old": Change.REMOVE}
    plans = {plan.name: plan for plan in decision.plans}
    assert (plans["bad"].code, plans["bad"].assignment_id) == (
        p.EventCode.THRESHOLD_NOT_MET, "a-bad")
    assert plans["old"].assignment_id == "a-old", "a removal names the entry it ends"

    after = accepted(held, later, decision, update_ids=iter(["u-e", "u-bad", "u-old"]).__next__,
                     now=SIM.now)
    models = after.models
    assert models["m"].update_id == "u-1" and models["m"].sequence == 2, "a refresh goes on"
    assert (models["e"].state, models["e"].key) == (p.UpdateState.FIT_CHECKED, "e@2.0.0-micro")
    assert models["bad"].state is p.UpdateState.REJECTED
    assert models["old"].remove and models["old"].state is p.UpdateState.VERIFIED
    assert after.highest_sequence == 2 and after.document.sequence == 2
    # "m" was never installed here: its refreshed update is still pending too.
    assert [r.name for r in after.pending()] == ["e", "m", "old"]
    # A later document without "old" again does not remove it twice.
    assert "old" not in _changes(run(assign_set(3, {"m": RELEASE}, ids={"m": "a-m"}), after))


def test_an_old_single_model_record_reads_as_its_name() -> None:
    v1 = {"schema": "slmfleet.agent-update/1", "highest_sequence": 4, "status": None,
          "current": {"update_id": "u", "assignment_id": "a-4", "sequence": 4,
                      "ref": "m@1.0.0", "tier": "micro", "key": "m@1.0.0-micro",
                      "sha256": "0" * 64, "state": "downloading", "reason": None, "ts": 1.0,
                      "accepted_at": 1.0, "payload": "{}", "payload_sha256": "f" * 64,
                      "resumes": 1}}
    import json
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from agent.update.state import UpdateStateStore
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_text(json.dumps(v1))
        file = UpdateStateStore(path).load()
    assert file.highest_sequence == 4 and file.document.legacy
    assert file.document.payload_sha256 == "f" * 64
    record = file.models["m"]
    assert (record.state, record.resumes, record.assignment_id) == (
        p.UpdateState.DOWNLOADING, 1, "a-4")


def test_rejection_is_labelled_with_the_claimed_id_and_sequence() -> None:
    decision = run(assign(7, assignment_id="a-7"), trust=None)
    assert (decision.assignment_id, decision.sequence) == ("a-7", 7)
    assert (run(b"not json").assignment_id, run(b"not json").sequence) == (None, 0)


def test_accept_then_refresh_records() -> None:
    state = holding(FIRST)
    assert state.highest_sequence == 1
    record = state.models["m"]
    assert (record.key, record.state) == ("m@1.0.0-micro", p.UpdateState.FIT_CHECKED)
    assert state.document.legacy and state.status is None

    later = SIM.now + 60
    again = assign(5)
    after = refreshed(state, again, run(again, state), now=later)
    assert after.highest_sequence == 5
    assert after.models["m"].update_id == "u-1", "a refresh continues the same update"
    assert (after.models["m"].sequence, after.document.accepted_at) == (5, later)
    assert after.document.payload_sha256 == hashlib.sha256(again).hexdigest()


def test_record_builders_refuse_the_wrong_decision() -> None:
    with pytest.raises(ValueError):
        accepted(UpdateFile(), FIRST, run(b""), update_ids=lambda: "u", now=0)
    with pytest.raises(ValueError):
        refreshed(UpdateFile(), FIRST, run(FIRST), now=0)


def test_same_variant_with_another_assignment_id_is_a_new_update() -> None:
    decision = run(assign(2, assignment_id="a-2"), holding(FIRST))
    assert (decision.action, decision.assignment_id, decision.plans[0].key) == (
        Action.ACCEPT, "a-2", "m@1.0.0-micro"
    )
    assert decision.plans[0].change is Change.NEW
