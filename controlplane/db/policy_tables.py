"""Default update policies: what devices with a label or a firmware profile get
under a rollout's own (:mod:`controlplane.policy_defaults`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .models import SHORT_LEN, Base, big_id


class UpdatePolicyDefault(Base):
    """A default update policy that devices with a label (``selector`` ``label``:
    ``key=value``) or a firmware profile (``profile``: ``key``, ``value`` empty) get
    under a rollout's own (controlplane/policy_defaults.py)."""

    __tablename__ = "update_policy_defaults"

    id: Mapped[int] = big_id()
    selector: Mapped[str] = mapped_column(String(8))
    key: Mapped[str] = mapped_column(String(SHORT_LEN))
    value: Mapped[str] = mapped_column(String(SHORT_LEN))
    policy: Mapped[dict[str, Any]]
    updated_at: Mapped[float]

    __table_args__ = (UniqueConstraint("selector", "key", "value"),)
