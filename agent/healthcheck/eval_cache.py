"""Evaluation scores kept per device, keyed by model sha256 and evaluation-set sha256.

A quality gate compares a candidate's score with the active version's on
the same device. The active version is scored once per evaluation set and
the figures kept here, so a device that checks several candidates against
the same active version (a rollback and a retry, the next release with the
same set) runs the set on it only once; a candidate that passes its check
is recorded too, and its score is the baseline once it is active.

One small JSON file written atomically (:mod:`agent.atomic`); at most
:data:`MAX_ENTRIES` entries, the oldest dropped first. A missing or
unreadable file is an empty cache: the worst a lost cache costs is scoring
the active version again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from protocol import ActiveModel, CategoryScore, InferenceStats

from ..atomic import read_json, write_json_atomic
from .evaluation import public_scores

log = logging.getLogger(__name__)

#: scores kept (models x evaluation sets); a device runs a handful of models
MAX_ENTRIES = 32


class EvalCache:
    """Scores by ``(model sha256, evaluation-set sha256)``, persisted in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        try:
            data = read_json(self.path)
        except (OSError, ValueError) as exc:
            log.warning("evaluation cache %s unreadable (%s); starting empty", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, model_sha256: str, eval_sha256: str) -> dict[str, Any] | None:
        """The scores of that model on that set, if the device measured them."""
        entry = self._load().get(f"{model_sha256}:{eval_sha256}")
        return entry.get("scores") if isinstance(entry, dict) else None

    def latest(self, model_sha256: str) -> dict[str, Any] | None:
        """The model's most recent scores on any set (for telemetry)."""
        entries = [e for k, e in self._load().items()
                   if k.startswith(f"{model_sha256}:") and isinstance(e, dict)]
        if not entries:
            return None
        return max(entries, key=lambda e: e.get("at", 0)).get("scores")

    def put(self, model_sha256: str, eval_sha256: str, scores: dict[str, Any]) -> None:
        """Record scores (a failed write is logged: the cache only saves time)."""
        data = self._load()
        # The per-item results stay out: the cache keeps what telemetry and events carry.
        data[f"{model_sha256}:{eval_sha256}"] = {"at": time.time(),
                                                 "scores": public_scores(scores)}
        while len(data) > MAX_ENTRIES:
            oldest = min(data, key=lambda k: data[k].get("at", 0)
                         if isinstance(data[k], dict) else 0)
            del data[oldest]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, data)
        except OSError as exc:
            log.warning("evaluation cache %s not written: %s", self.path, exc)


def with_scores(stats: list[InferenceStats], cache: EvalCache,
                active: list[ActiveModel]) -> list[InferenceStats]:
    """Telemetry's per-version counters, each active version's latest score added."""
    sha_of = {(m.name, m.version): m.sha256 for m in active}
    out = []
    for entry in stats:
        sha = sha_of.get((entry.model, entry.version))
        scores = cache.latest(sha) if sha else None
        if scores is not None:
            entry = entry.model_copy(update={
                "eval_score": scores["score"],
                "eval_by_category": {name: CategoryScore(**c)
                                     for name, c in scores.get("by_category", {}).items()},
            })
        out.append(entry)
    return out
