"""Engine and session factory.

SQLite is the default store, tuned at connect time for one writer thread
and concurrent API readers: WAL (readers never block the writer),
``synchronous=NORMAL`` (durable at checkpoints, safe against corruption in
WAL mode), a busy timeout instead of instant "database is locked" errors,
and foreign keys on (SQLite leaves them off per connection).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 5000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url``; SQLite gets the pragmas above.

    Extra keyword arguments go to :func:`sqlalchemy.create_engine`.
    """
    if make_url(url).get_backend_name() == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        # Connections move between the writer thread, the scheduler and the
        # API's worker threads through the pool; each is used by one at a time.
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
