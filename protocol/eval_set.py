"""Evaluation sets: questions a release is scored on, on the device and at build time.

A release may pin an evaluation set (:class:`EvalSetRef`: artifact path,
sha256, size, item count, time budget). The set itself is a JSON file
(:class:`EvalSet`, schema ``slmfleet.evalset/1``): items with a prompt, a
category and a scorer. The agent fetches it beside the model, refuses it
unless it matches the signed reference byte for byte (:func:`parse_eval_set`),
runs each prompt greedily on the candidate and scores the answer
(:func:`score_answer`); the control plane compares the scores of two
versions on the same tier (the ``min_eval_ratio`` gate).

Scorers, all answering pass (1.0) or fail (0.0):

* ``exact``: the answer, stripped of surrounding whitespace (and, unless
  ``case_sensitive``, compared case-insensitively), equals ``expected``;
* ``contains``: the answer contains any of ``expected`` (case-insensitive);
* ``regex``: ``pattern`` matches somewhere in the answer (Python ``re.search``);
* ``choice``: of the listed ``options``, the one the answer names first
  (case-insensitive, whole words) is ``answer``;
* ``json_schema``: the JSON value extracted from the answer
  (:mod:`protocol.eval_json`) is valid against ``schema``. The value is
  taken from the first Markdown code block fenced with ```` ```json ````
  (any case), or without one the first bare ```` ``` ```` block, up to its
  closing fence or the end of the answer; with neither, or when that block
  holds no JSON value, from the whole answer. In that text it is the whole
  text, stripped, when that is one JSON value; otherwise the first
  top-level ``{...}`` or ``[...]`` that parses, whatever follows it ignored
  (a model that writes on after its object is judged on the object; one
  whose object was cut off fails). The item's result records the
  extracted text.

An item may carry a ``response_format`` (the OpenAI request field:
``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
{"name", "schema"}}``), sent with its request, so the agent's
grammar-constrained structured output is what gets scored. The format
fixes the answer's shape; the scorer judges its content (a schema with the
expected values, say), so a format alone never makes an item pass.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationError, field_validator, model_validator

from .errors import MalformedPayload, PayloadTooLarge, SchemaMismatch
from .eval_json import extract_json
from .keys import load_json
from .messages import Wire
from .variant_files import check_relative_path

EVAL_SET_SCHEMA = "slmfleet.evalset/1"
#: an evaluation set file is at most this large
MAX_EVAL_SET_BYTES = 256 * 1024
#: and holds at most this many items
MAX_EVAL_ITEMS = 200
#: an answer longer than this is cut before scoring (bounds regex and JSON work)
MAX_SCORED_CHARS = 8192
#: the longest time budget a manifest may give the on-device evaluation
MAX_EVAL_BUDGET_S = 600.0

_Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
_Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ExactScorer(Wire):
    """Passes when the stripped answer equals ``expected``."""

    kind: Literal["exact"]
    expected: _Text
    case_sensitive: Annotated[bool, Field(strict=True)] = False


class ContainsScorer(Wire):
    """Passes when the answer contains any of ``expected`` (case-insensitive)."""

    kind: Literal["contains"]
    expected: Annotated[list[_Text], Field(min_length=1, max_length=16)]


class RegexScorer(Wire):
    """Passes when ``pattern`` is found in the answer."""

    kind: Literal["regex"]
    pattern: _Text

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from None
        return value


class ChoiceScorer(Wire):
    """Passes when the first of ``options`` the answer names is ``answer``."""

    kind: Literal["choice"]
    options: Annotated[list[_Text], Field(min_length=2, max_length=16)]
    answer: _Text

    @model_validator(mode="after")
    def _answer_is_an_option(self) -> ChoiceScorer:
        folded = [option.lower() for option in self.options]
        if len(set(folded)) != len(folded):
            raise ValueError("options repeat (ignoring case)")
        if self.answer.lower() not in folded:
            raise ValueError("answer must be one of options")
        return self


class JsonSchemaScorer(Wire):
    """Passes when the answer is JSON valid against ``schema`` (JSON Schema 2020-12)."""

    kind: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_json_schema(value)


Scorer = Annotated[
    ExactScorer | ContainsScorer | RegexScorer | ChoiceScorer | JsonSchemaScorer,
    Field(discriminator="kind"),
]


def _check_json_schema(value: dict[str, Any]) -> dict[str, Any]:
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        raise ValueError(f"schema is not a JSON Schema: {exc.message}") from None
    return value


class JsonObjectFormat(Wire):
    """``{"type": "json_object"}``: the answer is any JSON object."""

    type: Literal["json_object"]


class JsonSchemaSpec(Wire):
    """``response_format.json_schema``: the schema the answer is generated under."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    json_schema: dict[str, Any] = Field(alias="schema")
    description: Annotated[str, StringConstraints(max_length=256)] | None = None
    strict: Annotated[bool, Field(strict=True)] | None = None

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_json_schema(value)


class JsonSchemaFormat(Wire):
    """``{"type": "json_schema", "json_schema": {...}}``: the answer follows a schema."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class EvalItem(Wire):
    """One question: a prompt sent as a chat user message, scored on the answer."""

    id: _Name
    #: items are scored and reported per category (e.g. ``facts``, ``json``)
    category: _Name = "general"
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=512)] = 32
    scorer: Scorer
    #: sent with the request: the answer is generated under this structured-output format
    response_format: ResponseFormat | None = None


class EvalSet(Wire):
    """The evaluation set file's content."""

    schema_: Literal["slmfleet.evalset/1"] = Field(EVAL_SET_SCHEMA, alias="schema")
    items: Annotated[list[EvalItem], Field(min_length=1, max_length=MAX_EVAL_ITEMS)]

    @model_validator(mode="after")
    def _unique_ids(self) -> EvalSet:
        ids = [item.id for item in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("two items share an id")
        return self


class EvalSetRef(Wire):
    """The release's pin on its evaluation set (inside the signed manifest)."""

    #: path under the artifact base URL, like a variant's ``artifact``
    artifact: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    sha256: _Sha256
    size_bytes: Annotated[int, Field(strict=True, ge=1, le=MAX_EVAL_SET_BYTES)]
    items: Annotated[int, Field(strict=True, ge=1, le=MAX_EVAL_ITEMS)]
    #: the on-device evaluation stops here; items not reached count as not run
    time_budget_s: Annotated[float, Field(strict=True, gt=0, le=MAX_EVAL_BUDGET_S)] = 60.0

    @field_validator("artifact")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        return check_relative_path(value, "eval_set.artifact")


def eval_set_ref(data: bytes, artifact: str, *, time_budget_s: float = 60.0) -> EvalSetRef:
    """Pin an evaluation set file's bytes (parsed first, so a bad file never gets signed)."""
    items = parse_eval_set_bytes(data)
    return EvalSetRef(
        artifact=artifact,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        items=len(items.items),
        time_budget_s=time_budget_s,
    )


def parse_eval_set_bytes(data: bytes) -> EvalSet:
    """Parse an evaluation set file; raise a ProtocolError naming what is wrong."""
    raw = load_json(data, max_bytes=MAX_EVAL_SET_BYTES, what="evaluation set")
    if not isinstance(raw, dict) or raw.get("schema") != EVAL_SET_SCHEMA:
        raise SchemaMismatch(f"evaluation set schema must be {EVAL_SET_SCHEMA}")
    try:
        return EvalSet.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MalformedPayload(f"evaluation set: {where}: {first['msg']}") from None


def parse_eval_set(data: bytes, ref: EvalSetRef) -> EvalSet:
    """Check ``data`` against the signed ``ref`` (size, sha256, item count), then parse it.

    Raises :class:`PayloadTooLarge` or :class:`MalformedPayload` on a size or
    hash mismatch (the file is not the one the release signers pinned) and
    whatever :func:`parse_eval_set_bytes` raises.
    """
    if len(data) != ref.size_bytes:
        if len(data) > ref.size_bytes:
            raise PayloadTooLarge(
                f"evaluation set is {len(data)} bytes, the release pins {ref.size_bytes}"
            )
        raise MalformedPayload(
            f"evaluation set is {len(data)} bytes, the release pins {ref.size_bytes}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise MalformedPayload(f"evaluation set sha256 {digest} is not the pinned {ref.sha256}")
    parsed = parse_eval_set_bytes(data)
    if len(parsed.items) != ref.items:
        raise MalformedPayload(
            f"evaluation set holds {len(parsed.items)} items, the release pins {ref.items}"
        )
    return parsed


def _first_named(options: Iterable[str], text: str) -> str | None:
    best: tuple[int, str] | None = None
    for option in options:
        found = re.search(rf"(?<!\w){re.escape(option.lower())}(?!\w)", text)
        if found and (best is None or found.start() < best[0]):
            best = (found.start(), option)
    return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Judged:
    """One answer's verdict, with the JSON text a ``json_schema`` scorer read (else None)."""

    passed: bool
    extracted: str | None = None


def judge_answer(scorer: Scorer, answer: str) -> Judged:
    """Judge one answer against ``scorer``, saying what JSON was extracted for ``json_schema``."""
    if not isinstance(scorer, JsonSchemaScorer):
        return Judged(score_answer(scorer, answer) == 1.0)
    from jsonschema import Draft202012Validator

    found = extract_json(answer[:MAX_SCORED_CHARS])
    if found is None:
        return Judged(False)
    return Judged(Draft202012Validator(scorer.json_schema).is_valid(found.value), found.text)


def score_answer(scorer: Scorer, answer: str) -> float:
    """Score one answer: 1.0 when it passes ``scorer``, else 0.0."""
    if isinstance(scorer, JsonSchemaScorer):
        return float(judge_answer(scorer, answer).passed)
    text = answer[:MAX_SCORED_CHARS]
    if isinstance(scorer, ExactScorer):
        if scorer.case_sensitive:
            return float(text.strip() == scorer.expected)
        return float(text.strip().lower() == scorer.expected.lower())
    if isinstance(scorer, ContainsScorer):
        lowered = text.lower()
        return float(any(expected.lower() in lowered for expected in scorer.expected))
    if isinstance(scorer, RegexScorer):
        return float(re.search(scorer.pattern, text) is not None)
    assert isinstance(scorer, ChoiceScorer)
    named = _first_named(scorer.options, text.lower())
    return float(named is not None and named.lower() == scorer.answer.lower())


@dataclass
class EvalScore:
    """Scores of one evaluation run, overall and per category."""

    passed: int = 0
    run: int = 0
    #: items in the set; ``run`` < ``total`` when the time budget ran out
    total: int = 0
    by_category: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Passed over the set's items (an item not run counts as failed)."""
        return self.passed / self.total if self.total else 0.0

    def add(self, category: str, passed: bool) -> None:
        """Count one scored item."""
        self.run += 1
        self.passed += int(passed)
        done, count = self.by_category.get(category, (0, 0))
        self.by_category[category] = (done + int(passed), count + 1)

    def as_dict(self) -> dict[str, Any]:
        """The wire form carried in events and telemetry."""
        return {
            "score": round(self.score, 4),
            "passed": self.passed,
            "run": self.run,
            "total": self.total,
            "by_category": {
                name: {"passed": done, "run": count}
                for name, (done, count) in sorted(self.by_category.items())
            },
        }


def score_answers(items: EvalSet, answers: Mapping[str, str]) -> EvalScore:
    """Score ``answers`` (item id -> answer text); an item not answered counts as failed."""
    result = EvalScore(total=len(items.items))
    for item in items.items:
        if item.id in answers:
            result.add(item.category, score_answer(item.scorer, answers[item.id]) == 1.0)
    return result
