"""What the API and jobs share: settings, database and the ingest's status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .config import ControlPlaneSettings
from .ingest_stats import IngestStatsSnapshot


class IngestStatus(Protocol):
    """The part of :class:`controlplane.ingest.MqttIngest` the API reads."""

    @property
    def connected(self) -> bool: ...

    def stats(self) -> IngestStatsSnapshot: ...


@dataclass(frozen=True)
class AppContext:
    """Handed to :func:`controlplane.api.create_app`; one per control-plane process."""

    settings: ControlPlaneSettings
    engine: Engine
    sessions: sessionmaker[Session]
    ingest: IngestStatus
