"""Artifact downloads: a small transport interface and the verifying downloader.

Transport sits behind :class:`Fetcher` (after python-tuf's
``FetcherInterface``): one method that opens a URL at a byte offset and
returns a :class:`Body` of chunks. :class:`HttpFetcher` implements it with
httpx; a test or a future transport (a local mirror, a USB stick) implements
it without touching :func:`download_artifact`, which holds every rule that
matters for safety: resume, the size cap, the throughput floor, sha256.

The downloader is synchronous and uses two threads. The caller's thread
reads the network and enforces the caps; a :class:`~agent.update.sink.Sink`
thread hashes and writes what arrived, so sha256 and disk writes overlap
with the GIL-bound network loop. The update pipeline calls it from a daemon
thread of its own (:mod:`agent.update.download`), so a download stuck on a
silent server never holds up the agent's exit, and stops it early through
the ``cancel`` event (checked on every chunk; a silent server is bounded by
the stall window). A :class:`Fetcher` is closed by whoever made it, after
the download (:meth:`Fetcher.close`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    # httpx is imported only once there is something to download: with its
    # optional CLI extras installed it pulls in click, rich and pygments,
    # about a fifth of an idle agent's memory.
    import httpx

from agent.errors import (
    ArtifactError,
    BadResponse,
    Cancelled,
    DownloadError,
    HashMismatch,
    HttpStatusError,
    Interrupted,
    RangeNotSatisfiable,
    SizeMismatch,
    TooLong,
    TooSlow,
)

from .sink import Sink

__all__ = ["Body", "Fetcher", "HttpFetcher", "download_artifact"]

#: disk I/O unit: reads when re-hashing a partial, batches handed to the writer
CHUNK_SIZE = 1 << 20
#: at most this many progress callbacks per second
PROGRESS_HZ = 10
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


@dataclass(slots=True)
class Body:
    """An open response body: the bytes of a resource from ``start`` on.

    Iterating yields the chunks; ``close`` releases the connection and is
    safe to call twice. A fetcher raises :class:`DownloadError` subclasses
    from ``open`` and from the iteration, never its transport's own errors.
    """

    #: offset in the resource of the first byte yielded: the requested
    #: offset, or 0 when the server ignored the range and sends everything
    start: int
    #: the full size of the resource if the server declared it, else ``None``
    size: int | None
    chunks: Iterator[bytes]
    close: Callable[[], None]

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fetcher(ABC):
    """Transport for artifact downloads."""

    def close(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release what the fetcher holds (connections); a fetcher that holds nothing keeps this."""

    @abstractmethod
    def open(self, url: str, *, offset: int, timeout: float) -> Body:
        """Start fetching ``url`` from byte ``offset``.

        ``timeout`` bounds every wait (connect, each read): a server silent
        for that long raises :class:`TooSlow`. Raises
        :class:`RangeNotSatisfiable` when the resource has no byte at
        ``offset``, :class:`HttpStatusError` for other unusable statuses.
        """


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (its CA bundle, ``SSL_CERT_FILE``), built once per process.

    Loading the CA bundle takes ~50 ms on a desktop and far longer on a
    small board; every new ``httpx.Client`` would load it again.
    """
    import httpx

    return httpx.create_ssl_context()


class HttpFetcher(Fetcher):
    """:class:`Fetcher` over HTTP(S) with httpx: ``Range`` requests, redirects followed.

    One connection pool for the fetcher's life, opened on the first request;
    close it (or use it as a context manager) when done. Pass ``client`` to
    configure TLS or proxies.
    """

    def __init__(self, client: httpx.Client | None = None) -> None:
        self._client = client

    def _http(self) -> httpx.Client:
        if self._client is None:
            import httpx

            self._client = httpx.Client(follow_redirects=True, verify=default_ssl_context())
        return self._client

    def close(self) -> None:
        """Close the connection pool (see :meth:`Fetcher.close`)."""
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> HttpFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, url: str, *, offset: int, timeout: float) -> Body:
        """See :meth:`Fetcher.open`."""
        # identity: a compressed body would not hash to the artifact's digest,
        # and byte ranges of a compressed representation are meaningless.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        import httpx

        client = self._http()
        request = client.build_request("GET", url, headers=headers, timeout=httpx.Timeout(timeout))
        try:
            response = client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TooSlow(f"{url}: no response within {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise DownloadError(f"{url}: {exc}") from exc
        try:
            start, size = _parse_response(response, url, offset)
        except BaseException:
            response.close()
            raise
        return Body(start, size, _chunks(response, url, timeout), response.close)


def _parse_response(response: httpx.Response, url: str, offset: int) -> tuple[int, int | None]:
    """``(start, size)`` of a usable response; raises for anything else."""
    status = response.status_code
    if status == 200:
        length = response.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    if status == 206:
        m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if m is None or int(m[1]) != offset:
            raise BadResponse(
                f"{url}: 206 with Content-Range {response.headers.get('Content-Range')!r}, "
                f"asked for bytes={offset}-"
            )
        return offset, None if m[3] == "*" else int(m[3])
    if status == 416:
        m = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        raise RangeNotSatisfiable(f"{url}: 416 for bytes={offset}-", size=int(m[1]) if m else None)
    raise HttpStatusError(f"{url}: HTTP {status}", status=status)


def _chunks(response: httpx.Response, url: str, timeout: float) -> Iterator[bytes]:
    # iter_raw, not iter_bytes(chunk_size): httpx would hold a trickle back
    # until a whole chunk arrived, hiding it from the throughput check.
    import httpx

    try:
        yield from response.iter_raw()
    except httpx.TimeoutException as exc:
        raise TooSlow(f"{url}: no data for {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise Interrupted(f"{url}: {exc}") from exc
    finally:
        response.close()


def download_artifact(
    fetcher: Fetcher,
    url: str,
    dest_partial: Path,
    *,
    expected_size: int,
    expected_sha256: str,
    min_bytes_per_s: float,
    stall_window_s: float,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    pace: Callable[[int], None] | None = None,
) -> Path:
    """Download ``url`` into ``dest_partial`` and verify it against the signed size and sha256.

    Resumes from the bytes already in ``dest_partial`` with a ``Range``
    request (re-hashing them first); starts over if the server ignores the
    range. Never writes more than ``expected_size`` bytes. Fails when fewer
    than ``min_bytes_per_s * stall_window_s`` bytes arrive in a stall window,
    including when the server goes silent for ``stall_window_s``.
    ``progress(done, total)`` is called at most ~10 times a second; setting
    ``cancel`` stops the download at the next chunk. ``pace(nbytes)`` is
    called once per chunk received, on the receiving thread, before the next
    read: the one place a rate cap or a pause may block the download (it may
    raise :class:`Cancelled` to stop it).

    Returns ``dest_partial``, verified; its writeback to disk has started
    but is not awaited: the store fsyncs it before the rename that installs
    it (:meth:`~agent.update.store.ModelStore.install`), where durability
    matters, so the download itself is bounded by the network and not by
    the disk's write speed. Raises :class:`DownloadError` (partial kept:
    call again to resume), :class:`ArtifactError` (partial deleted), or
    ``OSError`` for local disk trouble (partial kept).
    """
    if expected_size < 0:
        raise ValueError(f"expected_size must be >= 0, got {expected_size}")
    if not _SHA256_HEX.fullmatch(expected_sha256):
        raise ValueError(f"expected_sha256 must be 64 lowercase hex digits: {expected_sha256!r}")
    if stall_window_s <= 0 or min_bytes_per_s < 0:
        raise ValueError("need stall_window_s > 0 and min_bytes_per_s >= 0")

    dest_partial = Path(dest_partial)
    limits = _Limits(expected_size, expected_sha256, min_bytes_per_s, stall_window_s)
    try:
        # Unbuffered: the sink thread writes whole batches to the descriptor.
        with open(dest_partial, "a+b", buffering=0, opener=_open_private) as f:
            _Download(fetcher, url, f, limits, progress, cancel, pace).run()
    except ArtifactError:
        # Bad remote bytes are no base to resume from.
        dest_partial.unlink(missing_ok=True)
        raise
    return dest_partial


def _open_private(path: str, flags: int) -> int:
    # O_NOFOLLOW: a symlink planted where the partial goes must not send the
    # bytes elsewhere on the disk.
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


@dataclass(frozen=True, slots=True)
class _Limits:
    size: int
    sha256: str
    min_rate: float
    window: float


class _Download:
    """One download attempt; :meth:`run` does the work."""

    def __init__(
        self,
        fetcher: Fetcher,
        url: str,
        f: BinaryIO,
        limits: _Limits,
        progress: Callable[[int, int], None] | None,
        cancel: threading.Event | None,
        pace: Callable[[int], None] | None = None,
    ) -> None:
        self.fetcher, self.url, self.f, self.limits = fetcher, url, f, limits
        self.progress, self.cancel, self.pace = progress, cancel, pace
        self.digest = hashlib.sha256()
        #: bytes of the artifact received so far (on disk once the sink drained)
        self.done = 0
        self.window_start = 0.0
        self.window_bytes = 0

    def run(self) -> None:
        size = self.limits.size
        self._rehash_partial()
        if self.done == size:
            if self.digest.hexdigest() == self.limits.sha256:
                return  # finished in an earlier attempt; nothing to fetch
            # Full length but the wrong digest: pages lost to a power cut or
            # a stale file. Start over rather than fail on local damage.
            self._restart()
        if self.done < size:
            try:
                self._fetch()
            except RangeNotSatisfiable as exc:
                # We hold fewer bytes than the signed size, so a remote with
                # nothing past them is shorter than what was signed.
                raise SizeMismatch(
                    f"{self.url}: remote has no bytes past {self.done} "
                    f"(remote size {exc.size}), signed size is {size}"
                ) from exc
        actual = self.digest.hexdigest()
        if actual != self.limits.sha256:
            raise HashMismatch(f"{self.url}: sha256 {actual}, signed {self.limits.sha256}")

    def _rehash_partial(self) -> None:
        """Continue the running sha256 over the bytes an earlier attempt left."""
        if os.fstat(self.f.fileno()).st_size > self.limits.size:
            # Cannot come from us (nothing past the cap is written): not our file.
            self._restart()
            return
        self.f.seek(0)
        while chunk := self.f.read(CHUNK_SIZE):
            self.digest.update(chunk)
            self.done += len(chunk)

    def _restart(self) -> None:
        self.f.truncate(0)
        self.digest = hashlib.sha256()
        self.done = 0

    def _fetch(self) -> None:
        self.window_start, self.window_bytes = time.monotonic(), 0
        try:
            body = self.fetcher.open(self.url, offset=self.done, timeout=self.limits.window)
        except TooSlow as exc:
            raise TooSlow(self._too_slow(time.monotonic())) from exc
        with body:
            self._accept(body)
            sink = Sink(self.f.fileno(), self.digest)
            try:
                self._stream(body, sink)
            finally:
                # Keep every byte received, even when failing: the next attempt resumes there.
                sink.close()
        if self.done < self.limits.size:
            # A body without a declared length ended early: a cut or a short
            # file, indistinguishable here. Resuming tells them apart (416).
            raise Interrupted(f"{self.url}: body ended at {self.done} of {self.limits.size} bytes")

    def _accept(self, body: Body) -> None:
        size = self.limits.size
        if body.start != self.done:
            if body.start != 0:
                raise BadResponse(f"{self.url}: body starts at {body.start}, asked {self.done}")
            # The server ignored Range and sends the whole file: start over.
            self._restart()
        if body.size is not None and body.size != size:
            error = TooLong if body.size > size else SizeMismatch
            raise error(f"{self.url}: remote size {body.size}, signed size is {size}")

    def _stream(self, body: Body, sink: Sink) -> None:
        # The hot loop runs once per network read (~64 KiB): keep it to a
        # clock read, a few comparisons and a list append. Hashing and disk
        # writes happen on the sink's thread.
        size, window = self.limits.size, self.limits.window
        need = self.limits.min_rate * window
        clock, cancel, progress, pace = time.monotonic, self.cancel, self.progress, self.pace
        next_progress = clock()
        done = self.done
        batch: list[bytes] = []
        batch_bytes = 0
        chunks = iter(body)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except TooSlow as exc:
                    # The transport's read timeout: a silent server. Say it as a figure.
                    raise TooSlow(self._too_slow(clock())) from exc
                now = clock()
                if now - self.window_start >= window:
                    # A whole window has passed: judge the bytes that arrived in it.
                    if self.window_bytes < need:
                        raise TooSlow(self._too_slow(now))
                    self.window_start, self.window_bytes = now, 0
                n = len(chunk)
                if done + n > size:
                    # Checked before queueing: nothing past the cap reaches the disk.
                    raise TooLong(f"{self.url}: server sent more than the signed {size} bytes")
                done += n
                self.window_bytes += n
                batch.append(chunk)
                batch_bytes += n
                if batch_bytes >= CHUNK_SIZE:
                    sink.put(batch)
                    batch, batch_bytes = [], 0
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{self.url}: cancelled at {done} of {size} bytes")
                if pace is not None:
                    # The throttle's one hook: it may sleep (a rate cap) or wait
                    # (a metered link) before the next read.
                    pace(n)
                if progress is not None and now >= next_progress:
                    progress(done, size)
                    next_progress = now + 1 / PROGRESS_HZ
        finally:
            if batch:
                sink.put(batch)
            self.done = done
        if progress is not None:
            progress(done, size)

    def _too_slow(self, now: float) -> str:
        elapsed = max(now - self.window_start, 0.0)
        return (
            f"download too slow: {self.window_bytes} B in {elapsed:.1f} s, "
            f"need >= {self.limits.min_rate:g} B/s ({self.url})"
        )
