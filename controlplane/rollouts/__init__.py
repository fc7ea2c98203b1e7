"""Staged canary rollouts: specs, deterministic cohorts, gates and the engine.

Public surface: :class:`RolloutSpec` (what an admin submits),
:class:`RolloutEngine` and :func:`add_rollout_job` (the scheduled job), and
the :mod:`.store` functions the API uses to create rollouts and apply
operator actions. See docs/rollouts.md.
"""

from .engine import RolloutEngine, add_rollout_job, remove_rollout_engine
from .spec import Gates, RolloutSpec, Stage, Target
from .store import (
    ACTIONS,
    RolloutConflict,
    RolloutError,
    UnknownRollout,
    UnknownVersion,
)

__all__ = [
    "ACTIONS",
    "Gates",
    "RolloutConflict",
    "RolloutEngine",
    "RolloutError",
    "RolloutSpec",
    "Stage",
    "Target",
    "UnknownRollout",
    "UnknownVersion",
    "add_rollout_job",
    "remove_rollout_engine",
]
