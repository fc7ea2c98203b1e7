"""The intake decision on its own: rules I1-I8 of agent/update/intake.py, one row each.

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
from agent.update.intake import Action, Decision, DeviceFacts, accepted, decide, refreshed
from agent.update.state import UpdateFile
from tests.support.signer import TrustSimulator, capabilities

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


def holding(payload: bytes) -> UpdateFile:
    """The update file after ``payload`` was accepted."""
    return accepted(payload, run(payload), update_id="u-1", now=SIM.now)


@dataclass(frozen=True)
class Row:
    decide: Callable[[], Decision]
    action: Action
    code: p.EventCode | None = None
    replay: bool = False


FIRST = assign(1)
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
    "I6 re-signed with a higher sequence": Row(
        lambda: run(assign(2), holding(FIRST)), Action.REFRESH
    ),
    "I7 version unusable as a store key": Row(
        lambda: run(assign(release=SIM.release("m..x", "1.0.0"))),  # ".." is never a path
        Action.REJECT, p.EventCode.MALFORMED,
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


def test_rejection_is_labelled_with_the_claimed_id_and_sequence() -> None:
    decision = run(assign(7, assignment_id="a-7"), trust=None)
    assert (decision.assignment_id, decision.sequence) == ("a-7", 7)
    assert (run(b"not json").assignment_id, run(b"not json").sequence) == (None, 0)


def test_accept_then_refresh_records() -> None:
    state = holding(FIRST)
    assert state.highest_sequence == 1
    assert state.current is not None
    assert (state.current.key, state.current.state) == ("m@1.0.0-micro", p.UpdateState.VERIFIED)
    assert state.status == state.current.status()

    later = SIM.now + 60
    again = assign(5)
    after = refreshed(state, again, run(again, state), now=later)
    assert after.highest_sequence == 5
    assert after.current.update_id == "u-1", "a refresh continues the same update"
    assert (after.current.sequence, after.current.accepted_at) == (5, later)
    assert after.current.payload_sha256 == hashlib.sha256(again).hexdigest()
    assert after.status.sequence == 5


def test_record_builders_refuse_the_wrong_decision() -> None:
    with pytest.raises(ValueError):
        accepted(FIRST, run(b""), update_id="u", now=0)
    with pytest.raises(ValueError):
        refreshed(UpdateFile(), FIRST, run(FIRST), now=0)


def test_same_variant_with_another_assignment_id_is_a_new_update() -> None:
    decision = run(assign(2, assignment_id="a-2"), holding(FIRST))
    assert (decision.action, decision.assignment_id, decision.key) == (
        Action.ACCEPT, "a-2", "m@1.0.0-micro"
    )
