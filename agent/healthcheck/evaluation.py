"""Scoring a model on a release's evaluation set, within the set's time budget.

The health check runs every item of the set (:class:`protocol.EvalSet`) as
a greedy chat completion with the item's ``max_tokens`` and scores the
answer with the item's scorer (:func:`protocol.eval_set.score_answer`).
Items run one at a time, in the set's order, until the time budget the
release's manifest states is spent: the items not reached count as
failed, and the result says the budget stopped it (``stopped_early``).

The budget counts the time the model ran, not the time a warm swap kept
the candidate frozen while the serving worker answered requests
(:mod:`agent.inference.candidate_freeze`): what it bounds is the device's
work, not how busy the device was.

How an answer is obtained is the caller's: the candidate worker's
``check_prompt`` op during the health check, the serving worker's
``complete`` op for the active version, or a backend loaded in a one-off
child (:mod:`agent.healthcheck.__main__`). Each sends the item as
:func:`item_request` shapes it: an item's ``response_format`` goes with
it, so structured output runs under the agent's grammar as it does for
any request.

The result holds, besides the counts, one entry per item run (``items``:
id, passed, and for a ``json_schema`` item the JSON text the scorer
extracted). Those stay on the device (logs, the one-off check's output):
:func:`public_scores` is what events, telemetry and the cache carry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import EvalSet
from protocol.eval_set import EVAL_SET_SCHEMA, EvalItem, EvalScore, JsonSchemaFormat, judge_answer

log = logging.getLogger(__name__)

#: an item's answer, or None when the model could not answer it (counted as failed)
Ask = Callable[[EvalItem], Awaitable[str | None]]
#: seconds a worker was kept frozen within [start, end] (see agent.inference.candidate_freeze)
Frozen = Callable[[float, float], float]
#: an item's extracted JSON is cut to this many characters in its result (it ends up in logs)
EXTRACTED_CHARS = 200


def _never_frozen(start: float, end: float) -> float:
    return 0.0


def eval_request(items: EvalSet, time_budget_s: float) -> dict[str, Any]:
    """The evaluation part of a health-check request, as plain JSON values."""
    return {"items": [item.model_dump(mode="json", by_alias=True) for item in items.items],
            "time_budget_s": time_budget_s}


def worker_format(item: EvalItem) -> dict[str, Any] | None:
    """The item's ``response_format`` as the inference worker takes it (None: free text)."""
    fmt = item.response_format
    if fmt is None:
        return None
    if isinstance(fmt, JsonSchemaFormat):
        return {"type": "json_schema", "schema": fmt.json_schema.json_schema}
    return {"type": "json_object"}


def item_request(item: EvalItem) -> dict[str, Any]:
    """The item as a golden-prompt-like request: prompt, ``max_tokens``, its format if any."""
    request: dict[str, Any] = {"prompt": item.prompt, "max_tokens": item.max_tokens}
    if (fmt := worker_format(item)) is not None:
        request["response_format"] = fmt
    return request


def chat_request(item: EvalItem) -> dict[str, Any]:
    """The item as a worker ``complete`` request: one user message, greedy, seeded."""
    return {"messages": [{"role": "user", "content": item.prompt}], "temperature": 0.0,
            "max_tokens": item.max_tokens, "seed": 0, "response_format": worker_format(item)}


def public_scores(scores: dict[str, Any]) -> dict[str, Any]:
    """``scores`` without the per-item results: the form events, telemetry and the cache carry."""
    return {k: v for k, v in scores.items() if k != "items"}


def eval_set_of(request: dict[str, Any]) -> EvalSet:
    """The :class:`EvalSet` an :func:`eval_request` carries (it was verified before)."""
    return EvalSet.model_validate({"schema": EVAL_SET_SCHEMA, "items": request["items"]})


def scores_dict(score: EvalScore, elapsed_s: float, stopped_early: bool) -> dict[str, Any]:
    """The wire form of one run's scores (:class:`protocol.EvalScores`)."""
    return {**score.as_dict(), "elapsed_s": round(elapsed_s, 3), "stopped_early": stopped_early}


def _item_result(item: EvalItem, answer: str | None) -> dict[str, Any]:
    """One item's entry in ``items``: passed, and what the scorer extracted."""
    if answer is None:
        return {"id": item.id, "passed": False, "answered": False}
    judged = judge_answer(item.scorer, answer)
    result: dict[str, Any] = {"id": item.id, "passed": judged.passed}
    if item.scorer.kind == "json_schema":
        result["extracted"] = (None if judged.extracted is None
                               else judged.extracted[:EXTRACTED_CHARS])
    return result


async def score_model(items: EvalSet, time_budget_s: float, ask: Ask,
                      frozen: Frozen = _never_frozen) -> dict[str, Any]:
    """Run and score ``items`` through ``ask`` until ``time_budget_s`` of running time is spent."""
    result = EvalScore(total=len(items.items))
    per_item: list[dict[str, Any]] = []
    started = time.monotonic()
    elapsed = 0.0
    stopped_early = False
    for item in items.items:
        now = time.monotonic()
        elapsed = now - started - frozen(started, now)
        if elapsed >= time_budget_s:
            stopped_early = True
            break
        per_item.append(_item_result(item, await ask(item)))
        result.add(item.category, per_item[-1]["passed"])
    else:
        now = time.monotonic()
        elapsed = now - started - frozen(started, now)
    if stopped_early:
        log.warning("evaluation stopped by its %g s budget after %d of %d items",
                    time_budget_s, result.run, result.total)
    return {**scores_dict(result, elapsed, stopped_early), "items": per_item}


def describe(scores: dict[str, Any]) -> str:
    """One line for people: ``0.86 (43/50 passed; facts 20/20, json 8/15)``."""
    categories = ", ".join(f"{name} {c['passed']}/{c['run']}"
                           for name, c in scores.get("by_category", {}).items())
    text = f"{scores['score']:.2f} ({scores['passed']}/{scores['total']} passed"
    if categories:
        text += f"; {categories}"
    if scores.get("stopped_early"):
        text += f"; time budget spent after {scores['run']} item(s), the rest count as failed"
    return text + ")"


async def score_in_worker(call: Callable[..., Awaitable[dict[str, Any]]], spec: dict[str, Any],
                          frozen: Frozen = _never_frozen) -> dict[str, Any]:
    """Score the candidate loaded in a worker (``call`` is its :meth:`Worker.call`).

    Each item is one ``check_prompt`` call, like a golden prompt: greedy,
    the item's ``max_tokens`` and ``response_format``, and a frozen
    candidate's frozen time kept out of the budget through ``frozen``.
    """

    async def ask(item: EvalItem) -> str | None:
        outcome = await call("check_prompt", {"item": item_request(item)})
        if "error" in outcome:
            # The item fails (a format the grammar cannot enforce, say); the check goes on.
            log.warning("evaluation item %s not answered: %s", item.id, outcome["error"])
        return outcome.get("answer")

    return await score_model(eval_set_of(spec), spec["time_budget_s"], ask, frozen)
