"""Folder variants, evaluation sets and update policies: the wire models' own checks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from protocol import (
    EvalSet,
    MalformedPayload,
    UpdatePolicy,
    Variant,
    VariantFile,
    Window,
    eval_set_ref,
    files_digest,
    parse_eval_set,
    score_answer,
    score_answers,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


def _files() -> list[VariantFile]:
    return [
        VariantFile(path="model.onnx", sha256=SHA_A, size_bytes=10),
        VariantFile(path="model.onnx.data", sha256=SHA_B, size_bytes=90),
    ]


def _variant(files: list[VariantFile], **override: object) -> Variant:
    fields: dict[str, object] = {
        "format": "onnx", "sha256": files_digest(files), "size_bytes": 100,
        "artifact": "smollm2/1.0.0/onnx", "parameters": 1, "context_length": 64,
        "files": files,
        "health_check": {"golden_prompts": [{"prompt": "hi", "expected": ["x"]}],
                         "max_ttft_ms": 100.0},
    }
    fields.update(override)
    return Variant.model_validate(fields)


def test_folder_digest_is_order_free_and_change_sensitive() -> None:
    files = _files()
    assert files_digest(files) == files_digest(list(reversed(files)))
    renamed = [files[0], VariantFile(path="other.data", sha256=SHA_B, size_bytes=90)]
    assert files_digest(renamed) != files_digest(files)
    assert _variant(files).is_folder


@pytest.mark.parametrize(
    ("files", "override", "problem"),
    [
        (_files(), {"sha256": "c" * 64}, "digest of the file list"),
        (_files(), {"size_bytes": 99}, "add up to 100"),
        ([*_files(), VariantFile(path="MODEL.onnx", sha256=SHA_A, size_bytes=0)], {},
         "share a path"),
        ([VariantFile(path="a", sha256=SHA_A, size_bytes=50),
          VariantFile(path="a/b", sha256=SHA_B, size_bytes=50)], {}, "inside a path"),
    ],
    ids=["wrong-digest", "wrong-size", "case-twin", "file-as-folder"],
)
def test_inconsistent_folders_are_refused(
    files: list[VariantFile], override: dict[str, object], problem: str
) -> None:
    if "sha256" not in override:
        override = {**override, "sha256": files_digest(files)}
    with pytest.raises(ValidationError, match=problem):
        _variant(files, **override)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../b", "a\\b", "a//b", "x?y", "."])
def test_file_paths_cannot_escape_the_folder(path: str) -> None:
    with pytest.raises(ValidationError, match="relative path"):
        VariantFile(path=path, sha256=SHA_A, size_bytes=1)


EVAL = {
    "schema": "slmfleet.evalset/1",
    "items": [
        {"id": "capital", "category": "facts", "prompt": "Capital of France?",
         "scorer": {"kind": "contains", "expected": ["Paris"]}},
        {"id": "yes", "prompt": "Say yes", "scorer": {"kind": "exact", "expected": "Yes"}},
        {"id": "num", "prompt": "A number", "scorer": {"kind": "regex", "pattern": r"\d+"}},
        {"id": "colour", "category": "choice", "prompt": "Sky?",
         "scorer": {"kind": "choice", "options": ["red", "blue"], "answer": "blue"}},
        {"id": "json", "category": "json", "prompt": "JSON please",
         "scorer": {"kind": "json_schema", "schema": {
             "type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}}},
    ],
}


def test_scorers() -> None:
    items = {item.id: item.scorer for item in EvalSet.model_validate(EVAL).items}
    assert score_answer(items["capital"], "It is paris.") == 1.0
    assert score_answer(items["yes"], "  yes \n") == 1.0
    assert score_answer(items["yes"], "yes!") == 0.0
    assert score_answer(items["num"], "about 42") == 1.0
    assert score_answer(items["colour"], "Blue, not red") == 1.0
    assert score_answer(items["colour"], "red or blue") == 0.0
    assert score_answer(items["colour"], "bluebird") == 0.0
    assert score_answer(items["json"], '```json\n{"a": 3}\n```') == 1.0
    assert score_answer(items["json"], '{"a": "3"}') == 0.0
    assert score_answer(items["json"], "not json") == 0.0


def test_scores_per_category_count_unanswered_as_failed() -> None:
    parsed = EvalSet.model_validate(EVAL)
    score = score_answers(parsed, {"capital": "Paris", "json": '{"a": 1}', "yes": "no"})
    assert score.total == 5 and score.run == 3 and score.passed == 2
    assert score.score == pytest.approx(0.4)
    assert score.as_dict()["by_category"]["facts"] == {"passed": 1, "run": 1}


def test_eval_file_must_match_its_pin() -> None:
    data = json.dumps(EVAL).encode()
    ref = eval_set_ref(data, "smollm2/1.0.0/eval.json", time_budget_s=20.0)
    assert len(parse_eval_set(data, ref).items) == 5
    tampered = data.replace(b"Paris", b"Rome!")
    with pytest.raises(MalformedPayload, match="sha256"):
        parse_eval_set(tampered, ref)
    with pytest.raises(MalformedPayload, match="bytes"):
        parse_eval_set(data[:-1], ref)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "regex", "pattern": "("},
        {"kind": "choice", "options": ["a", "b"], "answer": "c"},
        {"kind": "json_schema", "schema": {"type": 5}},
        {"kind": "nope"},
    ],
)
def test_bad_scorers_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EvalSet.model_validate({**EVAL, "items": [{"id": "x", "prompt": "p", "scorer": bad}]})


def _ts(year: int, month: int, day: int, hour: int, minute: int, tz: str) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(
    ("window", "at", "is_open", "next_open"),
    [
        # daily 02:00-04:00 UTC
        (Window(cron="0 2 * * *", duration_s=7200), _ts(2026, 3, 1, 1, 59, "UTC"), False,
         _ts(2026, 3, 1, 2, 0, "UTC")),
        (Window(cron="0 2 * * *", duration_s=7200), _ts(2026, 3, 1, 2, 0, "UTC"), True, None),
        (Window(cron="0 2 * * *", duration_s=7200), _ts(2026, 3, 1, 4, 0, "UTC"), False,
         _ts(2026, 3, 2, 2, 0, "UTC")),
        # crossing midnight in Berlin: 23:00 for 3 h
        (Window(cron="0 23 * * *", duration_s=3 * 3600, tz="Europe/Berlin"),
         _ts(2026, 6, 2, 1, 30, "Europe/Berlin"), True, None),
        # the spring-forward night in Berlin: 02:30 does not exist on 2026-03-29
        (Window(cron="30 1 * * *", duration_s=3600, tz="Europe/Berlin"),
         _ts(2026, 3, 29, 3, 15, "Europe/Berlin"), True, None),
    ],
    ids=["before", "at-opening", "after-closing", "across-midnight", "dst-spring"],
)
def test_windows(window: Window, at: float, is_open: bool, next_open: float | None) -> None:
    assert window.is_open(at) is is_open
    assert window.next_open(at) == (at if is_open else next_open)


def test_local_windows_use_the_device_zone() -> None:
    window = Window(cron="0 9 * * 1-5", duration_s=3600, tz="local")
    at = datetime(2026, 12, 7, 9, 30, tzinfo=ZoneInfo("Asia/Tokyo")).timestamp()  # a Monday
    assert window.is_open(at, ZoneInfo("Asia/Tokyo"))
    assert not window.is_open(at, UTC)


@pytest.mark.parametrize(
    "bad",
    [
        {"cron": "0 2 * *", "duration_s": 60},
        {"cron": "0 25 * * *", "duration_s": 60},
        {"cron": "0 2 * * *", "duration_s": 10},
        {"cron": "0 2 * * *", "duration_s": 60, "tz": "Mars/Olympus"},
    ],
)
def test_bad_windows_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        UpdatePolicy.model_validate({"download_window": bad})
