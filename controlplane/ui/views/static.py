"""The console's own stylesheet and scripts, served from the package (nothing from outside)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(prefix="/ui/static", include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
#: read once: a handful of small files, and no path from a request ever reaches the disk
FILES: dict[str, tuple[bytes, str]] = {
    p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in _TYPES
}


@router.get("/{name}")
def static_file(name: str) -> Response:
    """One of the console's files by name; 404 for anything else."""
    found = FILES.get(name)
    if found is None:
        return Response(status_code=404)
    body, kind = found
    return Response(body, media_type=kind, headers={"cache-control": "public, max-age=3600"})
