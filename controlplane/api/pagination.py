"""Opaque keyset cursors and page-size checks for list endpoints."""

from __future__ import annotations

import base64
import binascii
import json

from fastapi.exceptions import RequestValidationError


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
