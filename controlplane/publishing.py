"""Publishing a release: hash each distinct file once, send only what the store lacks.

1. The spec's files are listed (a folder variant's every file) and each
   distinct local file hashed once: the same GGUF named by three tiers is
   read once.
2. The manifest is built from the measurements and signed.
3. ``POST /v1/blobs/missing`` asks which of the distinct digests the store
   lacks; only those are streamed to ``PUT /v1/blobs/sha256/<hex>``, one upload
   per digest however many paths name it.
4. ``POST /v1/models`` registers the envelope; the control plane records
   each path the release names against its blob.

``dedupe=False`` does what publishing did before the store was content
addressed, for comparison (bench/publish.py): each tier's file hashed on
its own and every byte sent to its path under ``/v1/artifacts``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .client import ApiClient, ApiError, PublishError, console

CHUNK = 1 << 20
#: uploads of large models take a while; connecting should not
UPLOAD_TIMEOUT = {"connect": 10.0, "read": 300.0, "write": 300.0, "pool": 10.0}


@dataclass
class PublishSummary:
    """What one publish hashed and sent."""

    #: files the release lists (a folder variant counts each of its files)
    files: int = 0
    #: distinct contents among them
    blobs: int = 0
    #: bytes of those distinct contents
    bytes_total: int = 0
    #: local files read to hash them, and their bytes
    files_hashed: int = 0
    bytes_hashed: int = 0
    #: uploads made and the bytes they carried
    uploads: int = 0
    bytes_sent: int = 0
    #: bytes the store already held, not sent
    bytes_held: int = 0
    hash_s: float = 0.0
    upload_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON (``slmfleet models publish --output json``)."""
        return asdict(self)


@dataclass
class Published:
    """A registered release (the API's JSON) and what publishing it took."""

    version: dict[str, Any]
    summary: PublishSummary = field(default_factory=PublishSummary)


@dataclass(frozen=True)
class _File:
    """One file the release lists: its store path and where it is on this machine."""

    path: str
    local: Path
    #: its path inside a folder variant; None for a single-file variant
    rel: str | None = None


#: digests measured in this process, by file identity: ``slmfleet dev`` publishes
#: several releases of the same GGUF and reads it once
_HASHED: dict[tuple[Any, ...], tuple[str, int]] = {}


def _identity(path: Path) -> tuple[Any, ...]:
    """What changes when a file's content may have (as git's index keys it)."""
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _hash(path: Path, progress: Progress) -> tuple[str, int]:
    size = path.stat().st_size
    task = progress.add_task(f"hash   {path.name}", total=size)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            progress.advance(task, len(chunk))
    return digest.hexdigest(), size


def _chunks(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            progress.advance(task, len(chunk))
            yield chunk


def _send(client: ApiClient, url: str, local: Path, sha256: str, size: int,
          progress: Progress) -> None:
    task = progress.add_task(f"upload {local.name}", total=size)
    try:
        client.request(
            "PUT", url, content=_chunks(local, progress, task),
            headers={"X-Content-SHA256": sha256, "Content-Length": str(size),
                     "Content-Type": "application/octet-stream"},
        )
    except ApiError as exc:
        raise PublishError(f"upload of {local} failed: {exc}") from exc


def _missing(client: ApiClient, digests: list[str]) -> set[str]:
    response = client.request("POST", "/v1/blobs/missing", json={"digests": digests})
    return set(response.json()["missing"])


def _report(plan: dict[Any, list[_File]], sent_as: dict[str, tuple[str, int, Path]],
            lacking: set[str]) -> None:
    """One line per file: uploaded now, already in the store, or the same as another."""
    first: dict[str, str] = {}
    for tier, files in plan.items():
        for f in files:
            sha = sent_as[f.path][0]
            if sha not in lacking:
                outcome = "already uploaded"
            elif sha in first:
                outcome = f"same file as {first[sha]}, sent once"
            else:
                first[sha] = f.path
                outcome = "uploaded"
            console.print(f"{tier.value}: {f.path} {outcome}")


def _plan(spec: Any) -> dict[Any, list[_File]]:
    """Each tier's files: one for a file variant, every file of a folder variant."""
    from .release_spec import artifact_path
    from .spec_folders import FolderError, folder_files

    plan = {}
    for tier, variant in spec.variants.items():
        base = artifact_path(spec, tier)
        if variant.file.is_dir():
            try:
                listed = folder_files(variant.file)
            except FolderError as exc:
                raise PublishError(f"variants.{tier.value}.file: {exc}") from exc
            plan[tier] = [_File(f"{base}/{rel}", local, rel) for rel, local in listed]
        elif variant.file.is_file():
            plan[tier] = [_File(base, variant.file)]
        else:
            raise PublishError(f"variants.{tier.value}.file: {variant.file} does not exist")
    return plan


#: path in the store -> (sha256, size, the local file)
Sources = dict[str, tuple[str, int, Path]]


def _measure(plan: dict[Any, list[_File]], progress: Progress, summary: PublishSummary,
             memo: dict[tuple[Any, ...], tuple[str, int]], dedupe: bool
             ) -> tuple[dict[Any, Any], Sources]:
    """Hash what ``memo`` lacks; each tier's measurement and every path's source."""
    from protocol import VariantFile

    measured: dict[Any, Any] = {}
    sources: Sources = {}
    for tier, files in plan.items():
        for f in files:
            key = _identity(f.local) if dedupe else (f.path,)
            if key not in memo:
                memo[key] = _hash(f.local, progress)
                summary.files_hashed += 1
                summary.bytes_hashed += memo[key][1]
            sources[f.path] = (*memo[key], f.local)
        if files[0].rel is None:
            measured[tier] = sources[files[0].path][:2]
        else:
            measured[tier] = [VariantFile(path=f.rel, sha256=sources[f.path][0],
                                          size_bytes=sources[f.path][1]) for f in files]
    return measured, sources


def _send_all(client: ApiClient, plan: dict[Any, list[_File]], sources: Sources,
              summary: PublishSummary, progress: Progress, dedupe: bool) -> None:
    """Upload each blob the store lacks once (or, without ``dedupe``, every path's file)."""
    if not dedupe:
        for path, (sha, size, local) in sources.items():
            _send(client, f"/v1/artifacts/{path}", local, sha, size, progress)
            summary.uploads += 1
            summary.bytes_sent += size
        return
    blobs = {sha: (size, local) for sha, size, local in sources.values()}
    lacking = _missing(client, sorted(blobs))
    for sha, (size, local) in sorted(blobs.items()):
        if sha in lacking:
            _send(client, f"/v1/blobs/sha256/{sha}", local, sha, size, progress)
            summary.uploads += 1
            summary.bytes_sent += size
        else:
            summary.bytes_held += size
    _report(plan, sources, lacking)


def publish(
    spec_path: Path,
    key_paths: list[Path],
    server: str | None = None,
    token: str | None = None,
    *,
    dedupe: bool = True,
    remember: bool = False,
) -> Published:
    """Hash, sign, upload what the store lacks, register; return the version and figures.

    ``remember`` keeps the digests measured for the rest of the process, so
    publishing another release of the same unchanged file does not read it
    again (``slmfleet dev`` publishes four releases of one GGUF).
    ``server`` and ``token`` resolve as for every command
    (:func:`controlplane.client.resolve`).
    """
    import httpx

    from protocol import canonical_json, sign_release

    from .keyfiles import KeyFileError, read_private_key
    from .release_spec import SpecError, build_manifest, load_spec

    started = time.monotonic()
    try:
        spec = load_spec(spec_path)
        keys = [read_private_key(path, "release") for path in key_paths]
    except (SpecError, KeyFileError) as exc:
        raise PublishError(str(exc)) from exc
    plan = _plan(spec)
    summary = PublishSummary(files=sum(len(files) for files in plan.values()))
    with _progress() as progress:
        memo = _HASHED if remember and dedupe else {}
        measured, sources = _measure(plan, progress, summary, memo, dedupe)
        summary.hash_s = time.monotonic() - started
        try:
            manifest = build_manifest(spec, measured, released_at=time.time())
            envelope = sign_release(manifest, keys)
        except (SpecError, ValueError) as exc:
            raise PublishError(str(exc)) from exc
        distinct = {sha: size for sha, size, _ in sources.values()}
        summary.blobs, summary.bytes_total = len(distinct), sum(distinct.values())
        upload_started = time.monotonic()
        try:
            with ApiClient(server, token, timeout=httpx.Timeout(**UPLOAD_TIMEOUT)) as client:
                _send_all(client, plan, sources, summary, progress, dedupe)
                summary.upload_s = time.monotonic() - upload_started
                response = client.request(
                    "POST", "/v1/models", content=canonical_json(envelope),
                    headers={"Content-Type": "application/json"},
                )
        except ApiError as exc:
            raise PublishError(f"publishing {manifest.ref} failed: {exc}") from exc
    summary.total_s = time.monotonic() - started
    return Published(response.json(), summary)
