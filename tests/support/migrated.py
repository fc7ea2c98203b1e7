"""A migrated control-plane database of each kind, for tests that run on both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from controlplane.db import make_engine, upgrade_to_head

#: the fixture params of a test run on SQLite and on a real PostgreSQL
KINDS = ["sqlite", "postgresql"]


def migrated_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """Body of a fixture parametrised with :data:`KINDS`: an engine on a database at head."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'cp.db'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()
