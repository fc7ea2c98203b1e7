"""Paging for list endpoints: one ``limit``/``cursor`` dependency, opaque keyset cursors.

Every list route takes :data:`PageDep`; its ``limit`` and ``cursor`` query
parameters, their bounds and their 422s are declared here once.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query
from fastapi.exceptions import RequestValidationError

from controlplane.api.deps import ContextDep

T = TypeVar("T")
K = TypeVar("K")


def query_error(param: str, message: str, value: object) -> RequestValidationError:
    """A 422 shaped like FastAPI's own validation errors, for checks done in a route."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", param), "msg": message, "input": value}]
    )


def encode_cursor(after: str) -> str:
    """Cursor that resumes a listing after the key ``after``."""
    raw = json.dumps({"v": 1, "after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> str:
    """The key a cursor resumes after; raise a 422 for anything we did not issue."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") != 1 or not isinstance(doc["after"], str):
            raise ValueError("unknown cursor version")
        return doc["after"]
    except (ValueError, KeyError, binascii.Error) as exc:
        raise query_error("cursor", "invalid cursor", cursor) from exc


def check_limit(limit: int, cap: int) -> int:
    """``limit`` unchanged, or a 422 naming the cap."""
    if limit > cap:
        raise query_error("limit", f"limit must be at most {cap}", limit)
    return limit


#: page size when a list request names none
DEFAULT_PAGE_SIZE = 100


def page_size(limit: int | None, cap: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The page size to serve: ``limit`` (a 422 above ``cap``), else ``default`` capped."""
    return check_limit(limit, cap) if limit is not None else min(default, cap)


@dataclass(frozen=True, slots=True)
class Page:
    """One list request's paging: how many rows to serve and where to resume."""

    size: int
    cursor: str | None

    @property
    def fetch(self) -> int:
        """Rows to ask the database for: one more than served tells whether more exist."""
        return self.size + 1

    def after(self, parse: Callable[[str], K] | None = None) -> K | str | None:
        """The key the cursor resumes after (None on the first page), through ``parse``
        when the key has parts; a ``ValueError`` from ``parse`` is a 422 like any bad cursor."""
        if not self.cursor:
            return None
        raw = decode_cursor(self.cursor)
        if parse is None:
            return raw
        try:
            return parse(raw)
        except ValueError as exc:
            raise query_error("cursor", "invalid cursor", self.cursor) from exc

    def cut(self, rows: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], str | None]:
        """The rows to serve out of ``rows`` (fetched with :attr:`fetch`), and the cursor
        of the next page (None on the last), made from ``key`` of the last row served."""
        page = list(rows[: self.size])
        return page, encode_cursor(key(page[-1])) if len(rows) > self.size else None


def page_params(
    context: ContextDep,
    limit: Annotated[int | None, Query(ge=1, description="page size, at most page_max")] = None,
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
) -> Page:
    """The ``limit`` and ``cursor`` query parameters of a list request, checked."""
    return Page(page_size(limit, context.settings.page_max), cursor)


PageDep = Annotated[Page, Depends(page_params)]


def document_page_max(schema: dict[str, Any], cap: int) -> None:
    """State ``cap`` (the setting ``page_max``) as every ``limit`` parameter's maximum.

    The bound is a setting, so it cannot be written into the route's
    declaration; the served schema still has to admit only what is served.
    """
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for param in operation.get("parameters", ()) if isinstance(operation, dict) else ():
                if param.get("in") == "query" and param.get("name") == "limit":
                    _with_maximum(param["schema"], cap)


def _with_maximum(schema: dict[str, Any], cap: int) -> None:
    # `int | None` is documented as anyOf [integer, null]; the bound goes on the integer.
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = cap
