"""What the API and jobs share: settings, database, trust material and the services."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .artifacts import ArtifactStore
from .config import ControlPlaneSettings
from .director import Director
from .ingest.stats import IngestStatsSnapshot
from .trust import Trust


class IngestStatus(Protocol):
    """The part of :class:`controlplane.ingest.receiver.MqttIngest` the API reads."""

    @property
    def connected(self) -> bool: ...

    def stats(self) -> IngestStatsSnapshot: ...


#: no keys configured: registry and director off
NO_TRUST = Trust(release_keys=None, director=None)


@dataclass(frozen=True)
class AppContext:
    """Handed to :func:`controlplane.api.create_app`; one per control-plane process.

    ``artifacts`` and ``director`` are None when not configured; the routes
    that need them answer 503 naming the setting to add.
    """

    settings: ControlPlaneSettings
    engine: Engine
    sessions: sessionmaker[Session]
    ingest: IngestStatus
    trust: Trust = NO_TRUST
    artifacts: ArtifactStore | None = None
    director: Director | None = None
    #: True while this replica holds the leader lease; None: no election runs
    is_leader: Callable[[], bool] | None = None
    #: ask the rollout engine to look now rather than at its next tick (a
    #: rollout was created or acted on); does nothing where no engine runs
    kick_rollouts: Callable[[], None] = lambda: None
