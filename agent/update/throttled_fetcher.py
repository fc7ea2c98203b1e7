"""A :class:`Fetcher` with a rate cap and a policy pause (see :mod:`agent.update.throttle`).

Its own module: the fetcher's imports (ssl) are loaded only once there is
something to download.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from .fetcher import Body, Fetcher
from .throttle import HOLD_CHECK_S, DownloadHeld, TokenBucket


class ThrottledFetcher(Fetcher):
    """``inner`` with a rate cap (None: none) and a policy pause; see the module docstring.

    ``cancel`` cuts a rate wait short (the download loop then sees it and stops).
    """

    def __init__(self, inner: Fetcher, rate: float | None, *,
                 hold: Callable[[], str | None] = lambda: None,
                 cancel: threading.Event | None = None) -> None:
        self._inner, self._hold = inner, hold
        self._bucket = TokenBucket(rate) if rate else None
        self._cancel = cancel or threading.Event()

    def close(self) -> None:
        """Close the wrapped fetcher."""
        self._inner.close()

    def open(self, url: str, *, offset: int, timeout: float) -> Body:
        """See :meth:`Fetcher.open`; raises :class:`DownloadHeld` before asking, if held."""
        reason = self._hold()
        if reason is not None:
            raise DownloadHeld(reason)
        body = self._inner.open(url, offset=offset, timeout=timeout)
        return Body(body.start, body.size, self._paced(body.chunks), body.close)

    def _paced(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        bucket, cancel, clock = self._bucket, self._cancel, time.monotonic
        next_check = clock() + HOLD_CHECK_S
        for chunk in chunks:
            yield chunk
            if bucket is not None:
                wait = bucket.take(len(chunk))
                if wait > 0:
                    cancel.wait(wait)
            now = clock()
            if now >= next_check:
                next_check = now + HOLD_CHECK_S
                reason = self._hold()
                if reason is not None:
                    raise DownloadHeld(reason)
