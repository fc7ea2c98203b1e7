"""Fetching a release's evaluation set: pinned like an artifact, refused like one.

The signed manifest pins the set (:class:`protocol.EvalSetRef`: artifact
path, sha256, size, item count). The file is downloaded from
``<artifact base>/<eval_set.artifact>`` through the same fetcher and checks
as a model artifact (size bound, sha256), then parsed and checked against
its pin once more (:func:`protocol.parse_eval_set`). A file that does not
match ends the update exactly as a tampered artifact does (``hash_mismatch``,
``too_long``, ``malformed``), before the model itself is downloaded, and
leaves nothing in staging.

The set is fetched again after a restart (it is a few KiB), so nothing but
the verified model is kept on disk.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol import (
    EvalOutcome,
    EvalScores,
    EvalSet,
    EventType,
    ProtocolError,
    VerifiedEntry,
    parse_eval_set,
)

from ..config import AgentConfig
from ..errors import StoreError
from ..events import EventLog
from ..healthcheck import HealthResult
from ..healthcheck.evaluation import describe, public_scores
from .download import ArtifactRequest, download_with_retries
from .outcome import Failed
from .store import ModelStore
from .stores import ModelStores

if TYPE_CHECKING:
    from .fetcher import Fetcher

#: suffix of the evaluation set's partial file beside the model's in staging
_SUFFIX = ".evalset"


@dataclass(frozen=True, slots=True)
class FetchedEvalSet:
    """A verified evaluation set, with what the health check needs of its pin."""

    items: EvalSet
    sha256: str
    time_budget_s: float


async def fetch_eval_set(
    entry: VerifiedEntry,
    url_base: str,
    *,
    key: str,
    config: AgentConfig,
    stores: ModelStores,
    fetcher_factory: Callable[[], Fetcher] | None,
    cancel: threading.Event,
    abort: asyncio.Event,
    still_current: Callable[[], object],
) -> FetchedEvalSet | None:
    """Download and verify ``entry``'s evaluation set; None when its release has none.

    Raises :class:`Failed` when the file is not the pinned one, and what
    :func:`download_with_retries` raises.
    """
    ref = entry.manifest.eval_set
    if ref is None:
        return None
    partial = stores.store(entry.name).staging_path(key + _SUFFIX)
    request = ArtifactRequest(url=f"{url_base.rstrip('/')}/{ref.artifact}", partial=partial,
                              size=ref.size_bytes, sha256=ref.sha256)
    try:
        await download_with_retries(
            request, config=config, fetcher_factory=fetcher_factory,
            progress=lambda done, total: None, cancel=cancel, abort=abort,
            still_current=still_current,
        )
        data = await asyncio.to_thread(partial.read_bytes)
    finally:
        partial.unlink(missing_ok=True)
    try:
        items = parse_eval_set(data, ref)
    except ProtocolError as exc:
        raise Failed.of(exc, detail=f"evaluation set: {exc}") from exc
    return FetchedEvalSet(items, ref.sha256, ref.time_budget_s)


def eval_fields(fetched: FetchedEvalSet | None, store: ModelStore) -> dict[str, Any]:
    """The :class:`HealthRequest` fields of an evaluation: the set and the active baseline."""
    if fetched is None:
        return {}
    try:
        active = store.active()
    except StoreError:
        active = None
    return {"eval_set": fetched.items, "eval_sha256": fetched.sha256,
            "eval_budget_s": fetched.time_budget_s,
            "active_sha256": active.manifest.get("sha256") if active is not None else None}


def report_evaluation(events: EventLog, assignment_id: str, fetched: FetchedEvalSet | None,
                      result: HealthResult) -> None:
    """Emit the ``evaluated`` event of a check that scored the candidate (none otherwise)."""
    scores = result.details.get("eval")
    if fetched is None or scores is None:
        return
    active = result.details.get("eval_active")
    outcome = EvalOutcome(
        eval_sha256=fetched.sha256,
        candidate=EvalScores.model_validate(public_scores(scores)),
        active_sha256=result.details.get("eval_active_sha256") if active else None,
        active=EvalScores.model_validate(public_scores(active)) if active else None,
    )
    reason = f"candidate {describe(scores)}"
    if active:
        reason += f"; active {describe(active)}"
    events.emit(EventType.EVALUATED, assignment_id, reason=reason, eval=outcome)
