"""The three roles of the admin API, each allowed everything the one below is."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """``viewer`` reads; ``operator`` also assigns, publishes and rolls out;
    ``admin`` also manages tokens, keys, device credentials and deletes."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Order of privilege: viewer 0, operator 1, admin 2."""
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """Whether a token of this role may call a route that needs ``needed``."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
