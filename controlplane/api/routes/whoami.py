"""``/v1/auth/whoami``: which token a request carries (any role)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from controlplane.api.deps import PrincipalDep
from controlplane.api.schemas_auth import WhoAmI

router = APIRouter(prefix="/v1/auth", tags=["auth"])


@router.get("/whoami", response_model=WhoAmI)
def whoami(principal: PrincipalDep) -> WhoAmI:
    """The id, name and role of the calling token; `slmfleet login` checks a token with it."""
    if principal is None:  # the middleware lets no such request through
        raise HTTPException(401, detail="no valid token")
    return WhoAmI(id=principal.token_id, name=principal.name, role=principal.role)
