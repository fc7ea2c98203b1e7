"""A warm swap's candidate runs only between the serving worker's requests.

Real processes: a child that burns CPU stands in for the candidate worker;
its state in /proc shows whether the kernel really stopped it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.healthcheck.rules import judge
from agent.inference.candidate_freeze import CandidateFreeze


def _state(pid: int) -> str:
    # /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces, so split after ')'.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, wanted: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _state(pid) not in wanted:
        assert time.monotonic() < deadline, f"process {pid} never reached state {wanted}"
        time.sleep(0.01)


@pytest.fixture
def busy() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


def test_frozen_while_a_request_runs_thawed_between(busy: subprocess.Popen) -> None:
    async def scenario() -> None:
        sharing = CandidateFreeze(slice_s=0.05)
        attached = time.monotonic()
        sharing.attach(busy.pid)
        _wait_state(busy.pid, "R")

        claimed = time.monotonic()
        await sharing.claim()  # the candidate was just thawed: it keeps its slice first
        assert time.monotonic() - attached >= 0.05
        _wait_state(busy.pid, "T")
        await asyncio.sleep(0.3)
        sharing.release()
        _wait_state(busy.pid, "R")
        frozen = sharing.frozen_between(claimed, time.monotonic())
        assert 0.28 <= frozen <= 0.6, frozen

        # A candidate attached while a request runs is frozen at once.
        await sharing.claim()
        sharing.detach()
        _wait_state(busy.pid, "R")
        sharing.attach(busy.pid)
        _wait_state(busy.pid, "T")
        sharing.release()
        _wait_state(busy.pid, "R")

        # Detached: requests no longer touch it, and it is never left stopped.
        sharing.detach()
        await sharing.claim()
        time.sleep(0.05)
        assert _state(busy.pid) == "R"
        sharing.release()

    asyncio.run(scenario())


def test_frozen_until_the_last_of_several_running_requests_is_done(
        busy: subprocess.Popen) -> None:
    async def scenario() -> None:
        sharing = CandidateFreeze(slice_s=0.0, max_frozen_s=60)
        sharing.attach(busy.pid)
        await sharing.claim()
        await sharing.claim()  # a second slot of the serving worker
        _wait_state(busy.pid, "T")
        sharing.release()
        await asyncio.sleep(0.1)
        assert _state(busy.pid) == "T", "thawed while a request still runs"
        sharing.release()
        _wait_state(busy.pid, "R")
        sharing.detach()

    asyncio.run(scenario())


def test_requests_wait_for_the_candidate_once_it_was_frozen_too_long(
        busy: subprocess.Popen) -> None:
    """With several slots the serving worker may never be idle: past max_frozen_s a
    new request waits for the running ones, so the candidate gets its turn."""

    async def scenario() -> None:
        sharing = CandidateFreeze(slice_s=0.05, max_frozen_s=0.2)
        sharing.attach(busy.pid)
        await sharing.claim()
        _wait_state(busy.pid, "T")
        await asyncio.wait_for(sharing.claim(), 0.1)  # frozen only just now: runs at once
        sharing.release()
        await asyncio.sleep(0.25)
        late = asyncio.create_task(sharing.claim())
        await asyncio.sleep(0.1)
        assert not late.done(), "a request started beside a candidate frozen too long"
        sharing.release()  # the last running request ends: the candidate runs its slice
        _wait_state(busy.pid, "R")
        thawed = time.monotonic()
        await asyncio.wait_for(late, 1)
        assert time.monotonic() - thawed >= 0.04, "the candidate had its slice first"
        _wait_state(busy.pid, "T")

        # A request cancelled while held back is still counted until it releases.
        await asyncio.sleep(0.25)
        held = asyncio.create_task(sharing.claim())
        await asyncio.sleep(0.05)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        sharing.release()  # the cancelled caller's release, as in a lease's finally
        sharing.release()
        _wait_state(busy.pid, "R")
        sharing.detach()

    asyncio.run(scenario())


def test_a_dead_candidate_is_not_an_error(busy: subprocess.Popen) -> None:
    async def scenario() -> None:
        sharing = CandidateFreeze(slice_s=0.0)
        sharing.attach(busy.pid)
        busy.kill()
        busy.wait()
        await sharing.claim()
        assert not sharing.frozen
        sharing.release()
        sharing.detach()

    asyncio.run(scenario())


def test_judge_takes_frozen_time_out_of_ttft_and_decode() -> None:
    spec = {"golden_prompts": [{"prompt": "2+2?", "expected": ["4"]}],
            "max_ttft_ms": 500.0, "min_tokens_per_s": 20.0}
    # 0.9 s to the first token, of which 0.8 s frozen; 11 tokens over 1.0 s,
    # of which 0.6 s frozen: 100 ms TTFT and 25 tokens/s of the model's own time.
    outcome = {"answer": "It is 4.", "tokens": 11, "started": 10.0, "first": 10.9,
               "last": 11.9, "ended": 11.9}
    frozen = [(10.05, 10.85), (11.0, 11.6)]

    def frozen_between(a: float, b: float) -> float:
        return sum(max(0.0, min(y, b) - max(x, a)) for x, y in frozen)

    unadjusted = judge(spec, [outcome])
    assert not unadjusted["passed"]
    assert any("time to first token 900 ms" in r for r in unadjusted["reasons"])
    assert any("decode 10.0 tokens/s" in r for r in unadjusted["reasons"])

    adjusted = judge(spec, [outcome], frozen_between)
    assert adjusted["passed"], adjusted["reasons"]
    assert adjusted["ttft_ms_max"] == pytest.approx(100.0)
    assert adjusted["tokens_per_s"] == pytest.approx(25.0)
