"""How the rollout engine treats each event code: one row per EventCode member.

A code added to the protocol without a row here fails
:func:`test_every_event_code_has_an_expected_treatment`, and one the engine's
mapping leaves out fails :func:`test_the_engine_classifies_every_event_code`:
deciding whether a new code means "this device cannot run it" is never left
to a default.
"""

from __future__ import annotations

import pytest

from controlplane.db.statuses import MemberState
from controlplane.rollouts.outcome import TREATMENT, ReportedEvent, Treatment, outcome, treatment
from protocol import EventCode, EventType

INCOMPATIBLE, FAILED = Treatment.INCOMPATIBLE, Treatment.FAILED

#: code -> how the engine must treat a device's update that ended with it
EXPECTED: dict[EventCode, Treatment] = {
    # the remote data is bad: the release or its assignment is at fault
    EventCode.PROTOCOL_ERROR: FAILED,
    EventCode.TOO_LARGE: FAILED,
    EventCode.MALFORMED: FAILED,
    EventCode.WRONG_SCHEMA: FAILED,
    EventCode.BAD_TOPIC: FAILED,
    EventCode.BAD_SIGNATURE: FAILED,
    EventCode.THRESHOLD_NOT_MET: FAILED,
    EventCode.EXPIRED: FAILED,
    EventCode.KEYS_EXPIRED: FAILED,
    EventCode.NOT_YET_VALID: FAILED,
    EventCode.REPLAYED_SEQUENCE: FAILED,
    EventCode.WRONG_DEVICE: FAILED,
    EventCode.WRONG_ROLE: FAILED,
    EventCode.BAD_VERSION: FAILED,
    # the device cannot run this variant: it leaves the rollout, no gate counts it
    EventCode.NO_VARIANT: INCOMPATIBLE,
    EventCode.DOES_NOT_FIT: INCOMPATIBLE,
    EventCode.BASE_MISMATCH: INCOMPATIBLE,
    EventCode.INSUFFICIENT_RAM: INCOMPATIBLE,
    EventCode.INSUFFICIENT_DISK: INCOMPATIBLE,
    # transport: reported only once the agent's own retries gave up
    EventCode.TRANSPORT: FAILED,
    EventCode.HTTP_STATUS: FAILED,
    EventCode.RANGE_NOT_SATISFIABLE: FAILED,
    EventCode.BAD_RESPONSE: FAILED,
    EventCode.INTERRUPTED: FAILED,
    EventCode.TOO_SLOW: FAILED,
    EventCode.CANCELLED: FAILED,
    # the artifact is bad
    EventCode.BAD_ARTIFACT: FAILED,
    EventCode.TOO_LONG: FAILED,
    EventCode.SIZE_MISMATCH: FAILED,
    EventCode.HASH_MISMATCH: FAILED,
    EventCode.TOKENIZER_MISMATCH: FAILED,
    EventCode.NO_ARTIFACT_URL: FAILED,
    # the device's own state
    EventCode.STORE_CORRUPT: FAILED,
    EventCode.STORE_CONFLICT: FAILED,
    EventCode.DISK_ERROR: FAILED,
    EventCode.INTERNAL_ERROR: FAILED,
    EventCode.STATE_CORRUPT: FAILED,
    EventCode.KEYS_UNAVAILABLE: FAILED,
    EventCode.CRASH_LOOP: FAILED,
    # the model itself
    EventCode.HEALTH_FAILED: FAILED,
    EventCode.ACTIVE_BROKEN: FAILED,
    # replaced before it finished
    EventCode.SUPERSEDED: FAILED,
    # waiting codes ride on non-final events only (waiting, deferred, activated):
    # the engine never reads an outcome from them; a final one would be a bug
    EventCode.DOWNLOAD_WINDOW: FAILED,
    EventCode.ACTIVATION_WINDOW: FAILED,
    EventCode.METERED: FAILED,
    EventCode.LOCKED: FAILED,
    EventCode.LOCK_OVERRIDDEN: FAILED,
}

#: member state each treatment leads to
STATE = {INCOMPATIBLE: MemberState.INCOMPATIBLE, FAILED: MemberState.FAILED}


def test_every_event_code_has_an_expected_treatment() -> None:
    assert [code for code in EventCode if code not in EXPECTED] == []


def test_the_engine_classifies_every_event_code() -> None:
    assert [code for code in EventCode if code not in TREATMENT] == []
    assert set(TREATMENT) == set(EventCode)


@pytest.mark.parametrize("code", list(EventCode), ids=str)
def test_event_code_treatment(code: EventCode) -> None:
    expected = EXPECTED[code]
    assert treatment(code) is expected
    # ...and what that makes of a device whose update was rejected with it
    reason = f"{code.value}: detail"
    values = outcome([ReportedEvent("a-1", EventType.REJECTED, code, reason)])
    assert values["state"] is STATE[expected]
    assert values["reason"] == (reason if expected is INCOMPATIBLE else f"rejected: {reason}")


def test_the_code_decides_not_the_words_of_the_reason() -> None:
    """A reason that mentions an incompatibility code in passing is not one."""
    ev = ReportedEvent("a-1", EventType.FAILED, EventCode.HASH_MISMATCH,
                       "hash_mismatch: file named insufficient_ram.gguf")
    assert outcome([ev])["state"] is MemberState.FAILED
    # No code at all (an old agent's free-text reason): a failure.
    assert treatment(None) is FAILED
    assert outcome([ReportedEvent("a-1", EventType.REJECTED, None, "does not fit")])["state"] \
        is MemberState.FAILED


def test_the_last_final_event_decides_and_health_is_kept() -> None:
    events = [
        ReportedEvent("a-1", EventType.DOWNLOADING, None, None),
        ReportedEvent("a-1", EventType.HEALTH_PASSED, None, None),
        ReportedEvent("a-1", EventType.ACTIVATED, None, None),
    ]
    assert outcome(events) == {"health": "passed", "state": MemberState.SUCCEEDED,
                               "reason": None}
    assert outcome(events[:1]) == {}


@pytest.mark.parametrize("kind", [EventType.WAITING_WINDOW, EventType.WAITING_NETWORK,
                                  EventType.DEFERRED])
def test_a_waiting_device_waits_rather_than_fails(kind: EventType) -> None:
    """Waiting for a window, a link or a lock is neither failing nor succeeding."""
    code = {EventType.WAITING_WINDOW: EventCode.DOWNLOAD_WINDOW,
            EventType.WAITING_NETWORK: EventCode.METERED,
            EventType.DEFERRED: EventCode.LOCKED}[kind]
    waiting = ReportedEvent("a-1", kind, code, f"{code.value}: detail")
    values = outcome([ReportedEvent("a-1", EventType.DOWNLOADING, None, None), waiting])
    assert values["state"] is MemberState.WAITING
    overridden = ReportedEvent("a-1", EventType.ACTIVATED, EventCode.LOCK_OVERRIDDEN,
                               "lock_overridden: override o-1 (hotfix) skipped ...")
    assert outcome([waiting, overridden])["state"] is MemberState.SUCCEEDED
