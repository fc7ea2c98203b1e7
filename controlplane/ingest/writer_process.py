"""The ingest's validating and writing half, in a process of its own.

Receiving MQTT in Python takes a good part of one core at a few thousand
messages a second; validating every payload and writing it to the database
needs as much again. In one process both share one GIL, and the receiving
thread then waits for the writer at every socket read, which halves what
the ingest sustains. So the MQTT side only stamps each message and ships
it, raw, in batches through a pipe; this process decodes, validates,
counts and writes on the other core.

Wire format on the pipe (parent to worker): ``pickle`` of a list of
:data:`RawMessage`; an empty byte string asks the worker to finish and exit.
The worker reports :meth:`IngestStats.export` dicts back on a second pipe
whenever they change, and one final report before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

from protocol import ProtocolError

from ..db.session import make_engine
from ..db.writes import BatchStore, IngestItem
from ..logs import RateLimitedLog
from .batch_writer import BatchWriter
from .decode import ClockSkew, decode_device_message
from .stats import IngestStats

log = logging.getLogger(__name__)

#: (topic, payload, retained, received_at)
RawMessage = tuple[str, bytes, bool, float]

#: asks the worker to write what it has and exit
STOP = b""
#: how often the worker checks whether its counters moved
REPORT_INTERVAL_S = 0.02


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker process needs; plain values, so it pickles."""

    database_url: str
    batch_max: int
    flush_s: float
    queue_max: int
    log_level: int
    stop_timeout_s: float = 10.0
    #: heartbeats further than this from their arrival are refused (None: any)
    max_clock_skew_s: float | None = None


def encode_batch(batch: list[RawMessage]) -> bytes:
    """Serialise a batch for the pipe."""
    return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


class _Reporter:
    """Sends the worker's counters to the parent when they change."""

    def __init__(self, stats: IngestStats, items: queue.Queue[IngestItem], out: Connection) -> None:
        self._stats = stats
        self._items = items
        self._out = out
        self._last: dict[str, object] | None = None
        self._lock = threading.Lock()

    def report(self) -> None:
        """Send the counters if they changed since the last report."""
        current = self._stats.export()
        current["queue_depth"] = self._items.qsize()
        with self._lock:
            if current == self._last:
                return
            self._last = current
            # The parent is gone: the main loop notices on its own pipe.
            with contextlib.suppress(OSError):
                self._out.send(current)

    def run(self, stop: threading.Event) -> None:
        """Report every :data:`REPORT_INTERVAL_S` until ``stop``."""
        while not stop.wait(REPORT_INTERVAL_S):
            self.report()


def run_worker(config: WorkerConfig, inbox: Connection, outbox: Connection) -> None:
    """Entry point of the worker process: decode and write until told to stop."""
    # Ctrl-C in a terminal, systemd's stop (KillMode=control-group) and
    # `timeout` signal the whole process group; the parent decides when this
    # process stops (it ships the last batch first, then STOP), and a parent
    # that dies closes the pipe, which ends it too.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # No ping before each batch: it is a round trip per flush, and a write on a
    # dead connection already invalidates it and is retried (is_transient).
    engine = make_engine(config.database_url, pool_pre_ping=False)
    store = BatchStore(engine)
    stats = IngestStats()
    items: queue.Queue[IngestItem] = queue.Queue(maxsize=config.queue_max)
    writer = BatchWriter(
        items,
        store.write,
        stats,
        batch_max=config.batch_max,
        flush_s=config.flush_s,
        on_write_error=store.forget,
    )
    reporter = _Reporter(stats, items, outbox)
    stop_reporting = threading.Event()
    reporting = threading.Thread(
        target=reporter.run, args=(stop_reporting,), name="ingest-report", daemon=True
    )
    rejects = RateLimitedLog(log)
    writer.start()
    reporting.start()
    try:
        while True:
            try:
                data = inbox.recv_bytes()
            except EOFError:
                log.error("ingest parent went away; writing what is queued and exiting")
                break
            if data == STOP:
                break
            for topic, payload, retained, received_at in pickle.loads(data):
                try:
                    item = decode_device_message(topic, payload, retained, received_at,
                                                config.max_clock_skew_s)
                except ClockSkew as exc:
                    # the figures are refused; that the device was heard is not
                    stats.count_rejected(exc.reason)
                    items.put(exc.heard)
                    continue
                except ProtocolError as exc:
                    stats.count_rejected(exc.reason)
                    rejects.log(
                        logging.WARNING,
                        f"reject:{exc.reason}",
                        "rejected message on %r (%s): %s",
                        topic,
                        exc.reason,
                        exc,
                    )
                    continue
                except Exception as exc:  # a bug here must not stop the ingest
                    stats.count_rejected("internal_error")
                    rejects.log(
                        logging.ERROR, "internal", "could not decode %r", topic, exc_info=exc
                    )
                    continue
                stats.count_accepted()
                # Blocks when the writer is behind: the parent's pipe fills,
                # its MQTT thread stops reading and the broker holds the rest.
                items.put(item)
    finally:
        writer.stop(config.stop_timeout_s)
        stop_reporting.set()
        reporting.join()
        reporter.report()
        outbox.close()
        engine.dispose()
