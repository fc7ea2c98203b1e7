"""``/metrics``' evaluation scores: computed again only when what they read moved.

A rollout with members is written to a real database (SQLite and
PostgreSQL), ``evaluated`` events arrive through the ingest's batch writer,
and at every step the cached tables must equal a fresh
:func:`recent_eval_scores` while the number of computations says when the
cache was (and was not) refreshed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, update

import protocol as p
from controlplane.db.models import Rollout, RolloutDevice
from controlplane.db.writes import BatchStore, IngestItem
from controlplane.metrics import EvalScoreCache
from controlplane.rollouts.eval_scores import recent_eval_scores
from tests.support.controlplane import hello
from tests.support.migrated import KINDS, add_release, add_rollout, migrated_engine

MEMBERS = ("e1", "e2", "e3")


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database of each kind with one rollout of three members."""
    for engine in migrated_engine(request, tmp_path):
        now = time.time()
        BatchStore(engine).write([IngestItem(p.TopicKind.HELLO, hello(d), now, False)
                                  for d in MEMBERS])
        with engine.begin() as conn:
            add_rollout(conn, "r1", add_release(conn))
            conn.execute(insert(RolloutDevice), [{
                "rollout_id": "r1", "device_id": d, "device_tier": "micro",
                "variant_tier": "micro", "cohort_key": d, "state": "assigned",
                "stage_index": 0, "assignment_id": f"a-{d}", "previous_ref": "m@1.0.0",
                "updated_at": now} for d in MEMBERS])
        yield engine


def _evaluated(device: str, seq: int, new: float, old: float) -> IngestItem:
    def side(score: float) -> dict:
        return {"score": score, "passed": int(score * 10), "run": 10, "total": 10,
                "by_category": {"facts": {"passed": int(score * 10), "run": 10}}}

    outcome = p.EvalOutcome.model_validate({
        "eval_sha256": "e" * 64, "candidate": side(new), "active_sha256": "a" * 64,
        "active": side(old)})
    event = p.Event(device_id=device, ts=time.time(), seq=seq, type=p.EventType.EVALUATED,
                    assignment_id=f"a-{device}", eval=outcome)
    return IngestItem(p.TopicKind.EVENTS, event, time.time(), False)


def test_scores_are_recomputed_only_when_an_input_moved(engine: Engine) -> None:
    clock = [0.0]
    cache = EvalScoreCache(clock=lambda: clock[0], max_age_s=60.0)
    store = BatchStore(engine)

    def read() -> list:
        with engine.connect() as conn:
            cached = cache.read(conn)
            assert cached == recent_eval_scores(conn)
        return cached

    assert read() == []
    assert read() == [] and cache.computed == 1
    store.write([_evaluated("e1", 1, 0.8, 0.6)])
    rows = read()
    assert cache.computed == 2
    assert [(r[0], r[2]["role"], r[2]["score"]) for r in rows] == [
        ("r1", "new", 0.8), ("r1", "old", 0.6)]
    for _ in range(3):
        read()
    assert cache.computed == 2
    # an event of another type moves nothing the tables read
    store.write([IngestItem(p.TopicKind.EVENTS, p.Event(
        device_id="e2", ts=time.time(), seq=1, type=p.EventType.DOWNLOADING,
        assignment_id="a-e2"), time.time(), False)])
    read()
    assert cache.computed == 2
    store.write([_evaluated("e2", 2, 0.4, 0.6)])
    rows = read()
    assert cache.computed == 3 and rows[0][2]["score"] == 0.6  # (0.8 + 0.4) / 2
    # the rollout moving to its next stage is a new key
    with engine.begin() as conn:
        conn.execute(update(Rollout).where(Rollout.id == "r1").values(stage_index=1))
    read()
    assert cache.computed == 4
    # a member's assignment moving is not in the key: caught up within max_age_s
    with engine.begin() as conn:
        conn.execute(update(RolloutDevice).where(RolloutDevice.device_id == "e2")
                     .values(assignment_id="a-e2-next"))
    with engine.connect() as conn:
        assert cache.read(conn) != recent_eval_scores(conn)
    clock[0] = 61.0
    read()
    assert cache.computed == 5
