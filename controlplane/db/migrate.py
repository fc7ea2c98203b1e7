"""Run the Alembic migrations shipped inside the package.

No ``alembic.ini`` is needed: the config is built here, and the migration
environment (``controlplane/migrations/env.py``) runs on the connection it
is handed through ``Config.attributes``.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from .session import make_engine

#: package-resource form, so it resolves inside an installed wheel too
SCRIPT_LOCATION = "controlplane:migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations.

    With ``connection`` the migration environment runs on it; without one
    only offline commands (history, SQL generation with a URL) work.
    """
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {SCRIPT_LOCATION}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database at ``engine`` is on (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine_or_url: Engine | str) -> None:
    """Bring the database up to the newest schema; a no-op when it is there already."""
    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
    finally:
        if engine is not engine_or_url:
            engine.dispose()
