"""download_artifact against a real HTTP server on loopback, faults switched on per test."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import (
    ArtifactError,
    Cancelled,
    DownloadError,
    HttpStatusError,
)
from agent.update.fetcher import Body, Fetcher, HttpFetcher, download_artifact
from tests.support.http_artifacts import ArtifactServer

SIZE = 3 * 1024 * 1024 + 12_345  # a few MiB, not a multiple of any chunk size
NAME = "model.gguf"


@dataclass(frozen=True)
class Artifact:
    path: Path
    data: bytes
    sha256: str


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    directory = tmp_path_factory.mktemp("served")
    data = os.urandom(SIZE)
    (directory / NAME).write_bytes(data)
    return Artifact(directory / NAME, data, hashlib.sha256(data).hexdigest())


@pytest.fixture
def server(artifact: Artifact) -> Iterator[ArtifactServer]:
    with ArtifactServer(artifact.path.parent, fault_limit_s=5) as s:
        yield s


@pytest.fixture
def fetcher() -> Iterator[HttpFetcher]:
    with HttpFetcher() as f:
        yield f


def download(fetcher: Fetcher, server: ArtifactServer, dest: Path, artifact: Artifact, **kw):
    args = {
        "expected_size": SIZE,
        "expected_sha256": artifact.sha256,
        "min_bytes_per_s": 1024,
        "stall_window_s": 1.0,
    }
    args.update(kw)
    return download_artifact(fetcher, server.url(NAME), dest, **args)


def test_full_download_verifies(fetcher, server, artifact, tmp_path):
    calls: list[tuple[int, int]] = []
    started = time.monotonic()
    path = download(
        fetcher,
        server,
        tmp_path / "a.partial",
        artifact,
        progress=lambda d, t: calls.append((d, t)),
    )
    elapsed = time.monotonic() - started

    assert path == tmp_path / "a.partial"
    assert path.read_bytes() == artifact.data
    assert path.stat().st_mode & 0o777 == 0o600
    assert calls[-1] == (SIZE, SIZE)
    assert all(t == SIZE for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) <= 10 * elapsed + 2  # rate-limited, plus the first and last
    [req] = server.requests(NAME)
    assert (req.range, req.status) == (None, 200)


def test_cut_download_resumes_with_range(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    half = SIZE // 2
    server.set_fault(NAME, cut_after=half, times=1)

    with pytest.raises(DownloadError) as info:
        download(fetcher, server, dest, artifact)
    assert info.value.reason == "interrupted"
    assert dest.stat().st_size == half  # every byte that arrived was kept

    download(fetcher, server, dest, artifact)

    assert dest.read_bytes() == artifact.data
    first, second = server.requests(NAME)
    assert (first.range, first.status) == (None, 200)
    assert (second.range, second.status) == (f"bytes={half}-", 206)
    assert server.bytes_sent(NAME) == SIZE  # ~1x the file, not 1.5x


def test_complete_partial_is_verified_without_a_request(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    dest.write_bytes(artifact.data)

    download(fetcher, server, dest, artifact)

    assert server.requests() == []


def test_trickling_server_is_abandoned_as_too_slow(fetcher, server, artifact, tmp_path):
    server.set_fault(NAME, trickle_bps=1)
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(fetcher, server, tmp_path / "a.partial", artifact)
    elapsed = time.monotonic() - started

    assert info.value.reason == "too_slow"
    assert "download too slow" in str(info.value) and "need >= 1024 B/s" in str(info.value)
    assert elapsed < 3  # one window (1 s) plus slack, not the server's 5 s trickle


def test_trickle_in_fast_bursts_is_caught_by_the_window(fetcher, server, artifact, tmp_path):
    # 600 B/s arrives in ~30 B pieces every 50 ms: reads never time out,
    # so only the per-window byte count can catch it.
    server.set_fault(NAME, trickle_bps=600)
    with pytest.raises(DownloadError) as info:
        download(fetcher, server, tmp_path / "a.partial", artifact)
    assert info.value.reason == "too_slow"
    assert info.value.__cause__ is None  # judged by the window, not by a read timeout


def test_silent_server_is_caught_by_the_read_timeout(fetcher, server, artifact, tmp_path):
    server.set_fault(NAME, trickle_bps=0.1)  # headers, then nothing for 10 s
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(fetcher, server, tmp_path / "a.partial", artifact)
    assert info.value.reason == "too_slow"
    assert "0 B in 1." in str(info.value)
    assert time.monotonic() - started < 3


class SizeWatcher(Fetcher):
    """Wraps a real fetcher; records the size of ``watched`` at every chunk and at close."""

    def __init__(self, inner: Fetcher, watched: Path) -> None:
        self.inner, self.watched, self.sizes = inner, watched, []

    def _size(self) -> None:
        self.sizes.append(self.watched.stat().st_size if self.watched.exists() else 0)

    def open(self, url: str, *, offset: int, timeout: float) -> Body:
        body = self.inner.open(url, offset=offset, timeout=timeout)

        def chunks() -> Iterator[bytes]:
            for chunk in body:
                self._size()
                yield chunk

        def close() -> None:
            body.close()
            self._size()

        return Body(body.start, body.size, chunks(), close)


def test_server_sending_too_much_is_cut_at_the_cap(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    server.set_fault(NAME, extra_bytes=256 * 1024)  # no Content-Length: only the cap can tell
    watcher = SizeWatcher(fetcher, dest)

    with pytest.raises(ArtifactError) as info:
        download(watcher, server, dest, artifact)

    assert info.value.reason == "too_long"
    assert watcher.sizes and max(watcher.sizes) <= SIZE
    assert not dest.exists()


def test_declared_size_above_the_cap_fails_before_the_body(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    with pytest.raises(ArtifactError) as info:
        download(fetcher, server, dest, artifact, expected_size=SIZE - 1)
    assert info.value.reason == "too_long"
    assert not dest.exists()


def test_flipped_byte_is_a_hash_mismatch_and_leaves_nothing(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    server.set_fault(NAME, flip_at=SIZE // 3)

    with pytest.raises(ArtifactError) as info:
        download(fetcher, server, dest, artifact)

    assert info.value.reason == "hash_mismatch"
    assert not dest.exists()


def test_server_ignoring_range_restarts_cleanly(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    server.set_fault(NAME, cut_after=SIZE // 2, times=1)
    with pytest.raises(DownloadError):
        download(fetcher, server, dest, artifact)
    server.set_fault(NAME, ignore_range=True)

    download(fetcher, server, dest, artifact)

    assert dest.read_bytes() == artifact.data
    second = server.requests(NAME)[1]
    assert (second.range, second.status) == (f"bytes={SIZE // 2}-", 200)


def test_remote_shorter_than_signed_is_a_size_mismatch(fetcher, server, artifact, tmp_path):
    # We hold the whole remote file but the manifest promises one more byte:
    # the resume asks for bytes past the end and gets 416.
    dest = tmp_path / "a.partial"
    dest.write_bytes(artifact.data)

    with pytest.raises(ArtifactError) as info:
        download(fetcher, server, dest, artifact, expected_size=SIZE + 1)

    assert info.value.reason == "size_mismatch"
    assert isinstance(info.value.__cause__, HttpStatusError)
    assert server.requests(NAME)[0].status == 416
    assert not dest.exists()


def test_http_500_is_a_resumable_download_error(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    dest.write_bytes(artifact.data[:1000])
    server.set_fault(NAME, status=500)

    with pytest.raises(DownloadError) as info:
        download(fetcher, server, dest, artifact)

    assert info.value.reason == "http_status"
    assert isinstance(info.value, HttpStatusError) and info.value.status == 500
    assert dest.read_bytes() == artifact.data[:1000]  # kept for the next attempt


def test_connection_refused_is_a_download_error_with_its_cause(fetcher, artifact, tmp_path):
    with ArtifactServer(artifact.path.parent) as gone:
        url = gone.url(NAME)
    with pytest.raises(DownloadError) as info:
        download_artifact(
            fetcher,
            url,
            tmp_path / "a.partial",
            expected_size=SIZE,
            expected_sha256=artifact.sha256,
            min_bytes_per_s=1024,
            stall_window_s=1.0,
        )
    assert info.value.reason == "transport"
    assert info.value.__cause__ is not None


def test_cancel_stops_and_keeps_the_partial(fetcher, server, artifact, tmp_path):
    dest = tmp_path / "a.partial"
    server.set_fault(NAME, trickle_bps=200_000)
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done > 0:
            cancel.set()

    with pytest.raises(Cancelled) as info:
        download(fetcher, server, dest, artifact, progress=progress, cancel=cancel)

    assert info.value.reason == "cancelled"
    assert 0 < dest.stat().st_size < SIZE
    assert dest.read_bytes() == artifact.data[: dest.stat().st_size]


def test_bad_arguments_are_value_errors(fetcher, server, artifact, tmp_path):
    with pytest.raises(ValueError):
        download(fetcher, server, tmp_path / "a", artifact, expected_sha256="ABC")
    with pytest.raises(ValueError):
        download(fetcher, server, tmp_path / "a", artifact, stall_window_s=0)


def test_writeback_is_started_as_bytes_arrive(tmp_path) -> None:
    """On Linux the sink starts writeback as it goes, so the install's fsync is short."""
    from agent.update.sink import writeback_starter

    start = writeback_starter()
    assert start is not None, "sync_file_range not found in libc"
    path = tmp_path / "f"
    with path.open("wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        start(f.fileno(), 0, 1 << 20)  # a hint: must not raise or change the file
    assert path.read_bytes() == b"x" * (1 << 20)
