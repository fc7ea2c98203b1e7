"""Console sessions and sign-in codes against a clock the test turns."""

from __future__ import annotations

import pytest

from controlplane.ui.sessions import CODE_MAX_TTL_S, SessionStore, normalise_code


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_session_ends_when_idle_too_long(clock: Clock) -> None:
    store = SessionStore(clock, max_s=3600, idle_s=60)
    session = store.open("tok-1", None)
    clock.now += 59
    assert store.get(session.id) is session  # and its idle clock restarts
    clock.now += 59
    assert store.get(session.id) is session
    clock.now += 61
    assert store.get(session.id) is None
    assert store.get(session.id) is None  # gone for good, not just late


def test_a_session_ends_at_its_absolute_expiry_however_busy(clock: Clock) -> None:
    store = SessionStore(clock, max_s=120, idle_s=60)
    session = store.open("tok-1", None)
    for step in (40, 40, 39):
        clock.now += step
        assert store.get(session.id) is not None
    clock.now += 1
    assert store.get(session.id) is None


def test_a_session_never_outlives_its_token(clock: Clock) -> None:
    store = SessionStore(clock, max_s=3600, idle_s=3600)
    session = store.open("tok-1", token_expires_at=clock.now + 30)
    assert session.expires_at == clock.now + 30
    clock.now += 31
    assert store.get(session.id) is None


def test_sign_out_ends_the_session_and_csrf_is_checked_exactly(clock: Clock) -> None:
    store = SessionStore(clock)
    session = store.open("tok-1", None)
    assert session.check_csrf(session.csrf)
    assert not session.check_csrf(session.csrf[:-1])
    assert not session.check_csrf("") and not session.check_csrf(None)
    store.close(session.id)
    assert store.get(session.id) is None
    store.close("never-existed")  # harmless


def test_a_code_works_once_and_not_after_it_expires(clock: Clock) -> None:
    store = SessionStore(clock)
    code, expires = store.issue_code("tok-1", ttl_s=60)
    assert expires == clock.now + 60
    assert store.redeem_code(normalise_code(code.lower().replace("-", " "))) == "tok-1"
    assert store.redeem_code(code) is None
    late, _ = store.issue_code("tok-2", ttl_s=60)
    clock.now += 61
    assert store.redeem_code(late) is None
    assert store.redeem_code("") is None
    with pytest.raises(ValueError, match="between 0 and"):
        store.issue_code("tok-3", ttl_s=CODE_MAX_TTL_S + 1)
