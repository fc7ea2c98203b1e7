"""Deterministic cohorts: which devices a stage covers.

Each device's place in a rollout is ``sha256(rollout id, device id)``: the
same on every replica and after every restart, and independent of which
other devices exist, so a device joining or leaving never reshuffles the
others. A stage of ``p`` % covers the first ``ceil(p * N / 100)`` compatible
devices in that order (at least one), so the canary's size -- the blast
radius of a bad release -- is exact, not a coin toss.
"""

from __future__ import annotations

import hashlib
import math


def cohort_key(rollout_id: str, device_id: str) -> str:
    """The device's sort key in the rollout (64 hex digits)."""
    return hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).hexdigest()


def stage_size(percent: float, compatible: int) -> int:
    """How many of ``compatible`` devices a stage of ``percent`` % covers."""
    if compatible <= 0:
        return 0
    return max(1, min(compatible, math.ceil(percent * compatible / 100 - 1e-9)))
