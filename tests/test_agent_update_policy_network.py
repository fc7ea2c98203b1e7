"""Bandwidth caps and metered links on the device.

A cap of 1 MB/s on a real download from a real HTTP artifact server holds
for 20 s within 5 % (and second by second, smoothly); the pipeline applies
the lower of the agent's and the assignment's caps; a metered link holds
the download at ``waiting_network`` and, when it is unmetered again, the
download resumes with ``Range`` at the byte it stopped at.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import protocol as p
from agent.config import AgentConfig
from agent.update.clock import SystemClock
from agent.update.fetcher import HttpFetcher, download_artifact
from agent.update.locks import UpdateLocks
from agent.update.metered import MeteredLink, parse_busctl, parse_nmcli
from agent.update.policy_gate import PolicyGate
from agent.update.throttle import TokenBucket
from agent.update.throttled_fetcher import ThrottledFetcher
from protocol.update_policy import UpdatePolicy
from tests.support.http_artifacts import ArtifactServer
from tests.support.policy import PolicyDevice, policy_device
from tests.support.updates import file_sha256
from tests.test_agent_updater import run

E = p.EventType
MB = 1_000_000


@pytest.fixture
def device(tmp_path: Path) -> Iterator[PolicyDevice]:
    yield from policy_device(tmp_path, 600_000)


def test_a_1_mb_s_cap_holds_for_20_s_within_5_percent(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    artifact = root / "big.bin"
    # Cheap to make and to hash: what is measured is the pacing, not the bytes.
    artifact.write_bytes(secrets.token_bytes(1 << 20) * 20)
    size, digest = artifact.stat().st_size, file_sha256(artifact)
    samples: list[tuple[float, int]] = []
    with ArtifactServer(root) as server:
        fetcher = ThrottledFetcher(HttpFetcher(), MB)
        start = time.monotonic()
        try:
            download_artifact(fetcher, server.url("big.bin"), tmp_path / "partial",
                              expected_size=size, expected_sha256=digest,
                              min_bytes_per_s=10_000, stall_window_s=5,
                              progress=lambda done, total: samples.append(
                                  (time.monotonic(), done)))
        finally:
            fetcher.close()
    # From the first byte to the last: the connection's set-up and the final fsync
    # are not the cap's (on a loaded machine they take a good part of a second).
    (first_t, first_done), (last_t, last_done) = samples[0], samples[-1]
    elapsed = last_t - first_t
    rate = (last_done - first_done) / elapsed
    assert last_done == size and elapsed > 20, (last_done, elapsed)
    assert abs(rate - MB) / MB < 0.05, f"{rate:.0f} B/s over {elapsed:.1f} s"
    # Smooth: every whole second after the first carries about the cap, no burst and stall.
    per_second = []
    for second in range(1, int(elapsed) - 1):
        lo = next(d for t, d in samples if t - start >= second)
        hi = next(d for t, d in samples if t - start >= second + 1)
        per_second.append(hi - lo)
    assert max(abs(b - MB) for b in per_second) < 0.2 * MB, per_second


def test_the_token_bucket_pays_a_large_chunk_by_waiting() -> None:
    now = [0.0]
    bucket = TokenBucket(1000, burst=100, clock=lambda: now[0])
    assert bucket.take(100) == 0.0, "the burst passes at once"
    assert bucket.take(500) == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take(100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.mark.parametrize(("agent", "policy", "expected"), [
    (None, None, None), (500_000, None, 500_000), (None, 200_000, 200_000),
    (500_000, 200_000, 200_000), (100_000, 200_000, 100_000),
])
def test_the_lower_of_the_agent_and_policy_caps_applies(
    tmp_path: Path, agent: int | None, policy: int | None, expected: int | None
) -> None:
    config = AgentConfig(device_id="dev-1", state_dir=tmp_path, download_max_bytes_per_s=agent,
                         metered="no")
    gate = PolicyGate(config, SystemClock(), UpdateLocks(tmp_path / "l.json", SystemClock()))
    assert gate.rate(UpdatePolicy(max_bytes_per_s=policy)) == expected
    # The stall floor never trips a cap.
    floor = gate.download_config(UpdatePolicy(max_bytes_per_s=policy)).download_min_bytes_per_s
    assert floor <= (expected / 2 if expected else config.download_min_bytes_per_s)


def test_the_pipeline_downloads_at_the_assignment_cap(device: PolicyDevice) -> None:
    async def go() -> None:
        updater = await device.boot()
        payload, aid = device.offer("a.bin", "1.0.0", UpdatePolicy(max_bytes_per_s=200_000))
        await updater.offer(payload)
        await device.until(lambda: device.final(aid), "the activation", timeout=20)
        assert device.final(aid).type == E.ACTIVATED
        first = device.of_type(aid, E.DOWNLOADING)[0]
        staged = device.of_type(aid, E.STAGED)[0]
        # 600 kB at 200 kB/s, less the small burst: about 3 s.
        assert staged.ts - first.ts > 2.5, staged.ts - first.ts

    run(go)


def test_a_metered_link_holds_the_download_and_it_resumes_where_it_stopped(
    device: PolicyDevice
) -> None:
    server = device.server

    async def go() -> None:
        device.metered(True)
        updater = await device.boot()
        payload, aid = device.offer("a.bin", "1.0.0", UpdatePolicy(max_bytes_per_s=100_000))
        await updater.offer(payload)
        await device.until(lambda: device.of_type(aid, E.WAITING_NETWORK), "the wait")
        waiting = device.of_type(aid, E.WAITING_NETWORK)[0]
        assert waiting.code == p.EventCode.METERED
        assert device.record().state == p.UpdateState.WAITING_NETWORK
        assert server.requests("a.bin") == [], "nothing downloaded on a metered link"

        device.metered(False)
        partial = updater.stores.store("m").staging_path("m@1.0.0-micro")
        # (The partial file grows in large batches; progress events say what arrived.)
        await device.until(lambda: any((e.progress_pct or 0) > 20
                                       for e in device.of_type(aid, E.DOWNLOADING)),
                           "a part downloaded")
        device.metered(True)  # the link turns metered mid-download
        await device.until(lambda: len(device.of_type(aid, E.WAITING_NETWORK)) == 2,
                           "the pause")
        stopped_at = partial.stat().st_size
        assert 100_000 < stopped_at < 600_000
        await asyncio.sleep(1.5)
        assert partial.stat().st_size == stopped_at, "nothing more while metered"

        device.metered(False)
        await device.until(lambda: device.final(aid), "the activation", timeout=20)
        assert device.final(aid).type == E.ACTIVATED
        ranges = [r.range for r in server.requests("a.bin")]
        assert ranges == [None, f"bytes={stopped_at}-"], ranges
        assert updater.stores.store("m").verify_hash("m@1.0.0-micro")

    run(go)


def test_a_policy_that_allows_metered_links_downloads_on_one(device: PolicyDevice) -> None:
    async def go() -> None:
        device.metered(True)
        updater = await device.boot()
        payload, aid = device.offer("a.bin", "1.0.0", UpdatePolicy(allow_metered=True))
        await updater.offer(payload)
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED
        assert device.of_type(aid, E.WAITING_NETWORK) == []

    run(go)


@pytest.mark.parametrize(("out", "metered"), [
    ("u 1\n", True), ("u 3\n", True), ("u 2\n", False), ("u 4\n", False), ("u 0\n", None),
    ("garbage", None),
])
def test_network_manager_d_bus_answers(out: str, metered: bool | None) -> None:
    assert parse_busctl(out) is metered


def test_nmcli_answers_for_the_first_connected_device() -> None:
    out = ("GENERAL.STATE:30 (disconnected)\nGENERAL.METERED:yes\n"
           "GENERAL.STATE:100 (connected)\nGENERAL.METERED:no (guessed)\n")
    assert parse_nmcli(out) is False
    assert parse_nmcli("GENERAL.STATE:100 (connected)\nGENERAL.METERED:yes (guessed)\n")
    assert parse_nmcli("") is None


def test_the_metered_setting(tmp_path: Path) -> None:
    asked: list[int] = []

    def query() -> bool | None:
        asked.append(1)
        return None  # NetworkManager absent or undecided

    assert MeteredLink("auto", query=query).metered() is False, "unknown is not metered"
    link = MeteredLink("auto", query=lambda: True)
    assert link.metered() and link.metered()
    assert MeteredLink("yes").metered() and not MeteredLink("no").metered()
    flag = tmp_path / "flag"
    assert MeteredLink("yes", flag).metered() is False, "the flag file decides; absent: no"
    flag.write_text("yes\n")
    assert MeteredLink("no", flag).metered() is True
    with pytest.raises(ValueError):
        MeteredLink("sometimes")
