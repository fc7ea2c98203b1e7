"""The three roles of the admin API, each allowed everything the one below is."""

from __future__ import annotations

from protocol import Ranked


class Role(Ranked):
    """``viewer`` reads; ``operator`` also assigns, publishes and rolls out;
    ``admin`` also manages tokens, keys, device credentials and deletes."""

    # Declared in order of privilege: viewer 0, operator 1, admin 2.

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """Whether a token of this role may call a route that needs ``needed``."""
        return self.rank >= needed.rank

