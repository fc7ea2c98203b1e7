"""Alembic environment for the control plane.

The caller (``controlplane.db.migrate``) hands over an open connection in
``config.attributes["connection"]``; the ``alembic`` command line can still
be used with ``-x url=...`` or ``sqlalchemy.url`` for offline SQL output.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from controlplane.db.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL for a URL without connecting (``alembic upgrade --sql``)."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("offline migrations need -x url=... or sqlalchemy.url")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate on the connection handed over by the caller."""
    connection = config.attributes.get("connection")
    if connection is None:
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
            "sqlalchemy.url"
        )
        if not url:
            raise RuntimeError("no connection in config.attributes and no URL given")
        from controlplane.db.session import make_engine

        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                _configure(conn)
                with context.begin_transaction():
                    context.run_migrations()
        finally:
            engine.dispose()
        return
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
