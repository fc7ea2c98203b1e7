"""A real HTTP artifact server on loopback, with faults a test can switch on.

    with ArtifactServer(directory) as server:
        server.set_fault("model.gguf", cut_after=1_000_000, times=1)
        download_artifact(HttpFetcher(), server.url("model.gguf"), ...)
        assert server.requests("model.gguf")[1].range == "bytes=1000000-"

Serves the files of one directory with single-range ``Range`` support
(206/416) over HTTP/1.1 keep-alive. Faults are per path, last until cleared
or for ``times`` requests, and every one ends on its own: a trickle stops
after ``fault_limit_s`` and the server's shutdown interrupts any wait, so a
test never hangs on its own server.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_PIECE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Fault:
    """How to misbehave when serving one path. All fields may be combined."""

    #: close the connection after this many body bytes (Content-Length still says all)
    cut_after: int | None = None
    #: send the body at about this many bytes per second
    trickle_bps: float | None = None
    #: answer 200 with the whole file even when the request has a Range header
    ignore_range: bool = False
    #: send this many junk bytes after the file, body delimited by closing (no Content-Length)
    extra_bytes: int = 0
    #: flip the low bit of the byte at this file offset
    flip_at: int | None = None
    #: answer with this status (e.g. 500) and a short text body instead of the file
    status: int | None = None
    #: answer ``302 Found`` with this ``Location`` (absolute, or relative to the request)
    redirect_to: str | None = None
    #: apply to this many requests, then clear; ``None``: until cleared
    times: int | None = None


@dataclass(slots=True)
class RequestRecord:
    """One request as the server saw it."""

    path: str
    range: str | None
    status: int = 0
    #: body bytes handed to the socket (counted before each write)
    sent: int = 0


class ArtifactServer:
    """Threaded HTTP server for ``directory`` on 127.0.0.1, a context manager."""

    def __init__(self, directory: str | Path, *, fault_limit_s: float = 10.0) -> None:
        self.directory = Path(directory).resolve()
        self.fault_limit_s = fault_limit_s
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self._log: list[RequestRecord] = []
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> ArtifactServer:
        """Bind a free port and serve in a background thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="artifact-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; wakes up any fault that is waiting."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- test API --------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        """The URL that serves ``directory / path``."""
        return f"{self.base_url}/{quote(path.lstrip('/'))}"

    def set_fault(self, path: str, **fields: Any) -> Fault:
        """Misbehave on ``path`` as :class:`Fault` ``fields`` say; replaces any earlier fault."""
        fault = Fault(**fields)
        with self._lock:
            self._faults[path.lstrip("/")] = fault
        return fault

    def clear_faults(self) -> None:
        """Serve every path correctly again."""
        with self._lock:
            self._faults.clear()

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """A copy of the request log, oldest first, optionally for one path."""
        with self._lock:
            records = [dataclasses.replace(r) for r in self._log]
        if path is None:
            return records
        return [r for r in records if r.path == path.lstrip("/")]

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes sent so far, optionally for one path."""
        return sum(r.sent for r in self.requests(path))

    # -- used by the handler ---------------------------------------------

    def _begin(self, path: str, range_header: str | None) -> tuple[RequestRecord, Fault | None]:
        record = RequestRecord(path=path, range=range_header)
        with self._lock:
            self._log.append(record)
            fault = self._faults.get(path)
            if fault is not None and fault.times is not None:
                left = fault.times - 1
                if left <= 0:
                    del self._faults[path]
                else:
                    self._faults[path] = dataclasses.replace(fault, times=left)
        return record, fault

    def _count(self, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.sent += n


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks close()

    def __init__(self, address: tuple[str, int], handler: type, owner: ArtifactServer) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body is what the fault tests do; keep the output clean.
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # Idle keep-alive connections end on their own.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        owner = self.server.owner
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        record, fault = owner._begin(rel, self.headers.get("Range"))
        fault = fault or Fault()
        file = (owner.directory / rel).resolve()
        if fault.status is not None:
            return self._text(record, fault.status, f"fault: status {fault.status}\n", head)
        if fault.redirect_to is not None:
            record.status = 302
            self.send_response(302)
            self.send_header("Location", fault.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if not file.is_relative_to(owner.directory) or not file.is_file():
            return self._text(record, 404, "not found\n", head)

        size = file.stat().st_size
        start, length, status = 0, size, 200
        wanted = None if fault.ignore_range else _parse_range(self.headers.get("Range"), size)
        if wanted == "unsatisfiable":
            record.status = 416  # before replying: the client may look at the log at once
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(wanted, tuple):
            start, length, status = wanted[0], wanted[1], 206

        record.status = status
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
        if fault.extra_bytes:
            # No length: the body ends when we close, so the client cannot know it overran.
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if head:
            return

        with file.open("rb") as f:
            plain = (
                fault.cut_after is None
                and fault.trickle_bps is None
                and fault.flip_at is None
                and not fault.extra_bytes
            )
            if plain:
                owner._count(record, length)
                self.wfile.flush()
                self.connection.sendfile(f, offset=start, count=length)
                return
            self._send_faulty(f, start, length, fault, record)

    def _send_faulty(
        self, f: BinaryIO, start: int, length: int, fault: Fault, record: RequestRecord
    ) -> None:
        owner = self.server.owner
        budget = length if fault.cut_after is None else min(length, fault.cut_after)
        deadline = time.monotonic() + owner.fault_limit_s
        for piece in _pieces(f, start, budget, fault):
            if fault.trickle_bps is not None:
                # Bounded: give up at the deadline or when the server stops.
                wait = min(len(piece) / fault.trickle_bps, deadline - time.monotonic())
                if owner._stopping.wait(max(wait, 0)) or time.monotonic() >= deadline:
                    break
            owner._count(record, len(piece))
            self.wfile.write(piece)
        else:
            if fault.extra_bytes and budget == length:
                owner._count(record, fault.extra_bytes)
                self.wfile.write(b"\xee" * fault.extra_bytes)
        # Every fault that did not send exactly the promised body ends the connection.
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise

    def _text(self, record: RequestRecord, status: int, text: str, head: bool) -> None:
        body = text.encode()
        record.status = status
        if not head:
            self.server.owner._count(record, len(body))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """``(start, length)`` of one satisfiable range, ``"unsatisfiable"``, or ``None``: serve all."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None  # multi-range or garbage: RFC 9110 allows ignoring Range
    if not m[1]:  # suffix range: the last N bytes
        n = min(int(m[2]), size)
        return (size - n, n) if n else "unsatisfiable"
    first = int(m[1])
    last = min(int(m[2]), size - 1) if m[2] else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, last - first + 1


def _pieces(f: BinaryIO, start: int, length: int, fault: Fault) -> Iterator[bytes]:
    """The body in pieces: one per ~50 ms when trickling, else 64 KiB, with ``flip_at`` applied."""
    step = _PIECE if fault.trickle_bps is None else max(1, int(fault.trickle_bps / 20))
    f.seek(start)
    pos, end = start, start + length
    while pos < end:
        piece = f.read(min(step, end - pos))
        if not piece:
            return
        if fault.flip_at is not None and pos <= fault.flip_at < pos + len(piece):
            i = fault.flip_at - pos
            piece = piece[:i] + bytes([piece[i] ^ 1]) + piece[i + 1 :]
        yield piece
        pos += len(piece)
