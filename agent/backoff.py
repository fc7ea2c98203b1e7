"""Jittered exponential backoff for reconnects.

A fleet that loses its broker all reconnects at once when it comes back;
jitter spreads that thundering herd out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": half fixed, half random."""

    minimum: float = 1.0
    maximum: float = 60.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; grows until ``maximum``."""
        ceiling = min(self.maximum, self.minimum * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Call after a successful connection."""
        self.attempt = 0
