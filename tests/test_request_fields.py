"""No silent drops: the request-field table of docs/inference.md, walked against a real agent.

The docs table is parsed and must match the code's table
(``agent.inference.request_fields.FIELDS``) field for field; then every
refused field is sent on every route that knows it and must be answered
``400 unsupported_parameter`` naming it, fields of the other route and
unknown fields too, while ignored fields and the "accepted as absent"
values of refused ones are answered 200.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agent.inference.request_fields import CHAT, COMPLETIONS, FIELDS
from tests.support.inference import served_model

MODEL = "smollm2-135m"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "inference.md"
ROUTES = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}
#: a plausible value for each ignored field (a new ignored field needs one here)
IGNORED_VALUES: dict[str, Any] = {
    "stream_options": {"include_usage": True}, "user": "user-1", "safety_identifier": "s-1",
    "metadata": {"team": "edge"}, "store": True, "service_tier": "auto",
    "prompt_cache_key": "k-1",
}


def docs_table() -> dict[str, dict[str, Any]]:
    """field -> {"routes", "handling", "notes"}, from the table between the markers."""
    text = DOCS.read_text()
    block = text[text.index("<!-- request-fields:start -->"):
                 text.index("<!-- request-fields:end -->")]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([a-z_]+)`", cells[0]) if len(cells) == 4 else None
        if match:
            rows[match.group(1)] = {"routes": {r.strip() for r in cells[1].split(",")},
                                    "handling": cells[2], "notes": cells[3]}
    return rows


DOC_ROWS = docs_table()
REFUSALS = [(name, route) for name, row in DOC_ROWS.items() for route in sorted(row["routes"])
            if FIELDS.get(name) is not None and FIELDS[name].refused_example is not None]
WRONG_ROUTE = [(name, route) for name, row in DOC_ROWS.items() for route in ROUTES
               if route not in row["routes"]]


def _base(route: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    if route == CHAT:
        body["messages"] = [{"role": "user", "content": "Say hi."}]
    else:
        body["prompt"] = "Hello"
    return body


def test_docs_table_lists_every_field_the_code_knows_and_agrees() -> None:
    assert len(DOC_ROWS) > 20, "the docs table was not found or not parsed"
    assert set(FIELDS) - set(DOC_ROWS) == set(), "fields missing from docs/inference.md"
    assert set(DOC_ROWS) - set(FIELDS) == set(), "docs list fields the code does not know"
    for name, row in DOC_ROWS.items():
        field = FIELDS[name]
        assert row["handling"] == field.handling, name
        assert row["routes"] == set(field.routes), name
        assert row["handling"] in ("honoured", "refused", "ignored"), name


def test_every_refused_field_has_an_example_and_every_ignored_one_a_value() -> None:
    for name, field in FIELDS.items():
        if field.handling == "refused":
            assert field.refused_example is not None, name
        if field.handling == "ignored":
            assert name in IGNORED_VALUES, name


@pytest.fixture(scope="module")
def url(tmp_path_factory, broker, cp_credentials, model_path: Path) -> Iterator[str]:
    with served_model(tmp_path_factory.mktemp("fields"), broker, cp_credentials, "fields",
                      model_path, MODEL) as base:
        yield base


def _refused(url: str, route: str, body: dict[str, Any], field: str) -> str:
    r = httpx.post(f"{url}{ROUTES[route]}", json=body, timeout=60)
    assert r.status_code == 400, (field, route, r.text)
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter", error
    assert error["param"] == field and f"'{field}'" in error["message"], error
    return error["message"]


@pytest.mark.integration
@pytest.mark.parametrize(("field", "route"), REFUSALS, ids=[f"{f}-{r}" for f, r in REFUSALS])
def test_refused_field_is_a_400_naming_it(url: str, field: str, route: str) -> None:
    message = _refused(url, route, {**_base(route), field: FIELDS[field].refused_example},
                       field)
    if DOC_ROWS[field]["handling"] == "refused":
        assert FIELDS[field].note in message


@pytest.mark.integration
@pytest.mark.parametrize(("field", "route"), WRONG_ROUTE,
                         ids=[f"{f}-{r}" for f, r in WRONG_ROUTE])
def test_field_of_the_other_route_is_a_400_naming_it(url: str, field: str, route: str) -> None:
    value = FIELDS[field].refused_example or IGNORED_VALUES.get(field) or "x"
    message = _refused(url, route, {**_base(route), field: value}, field)
    assert "unknown parameter" in message and ROUTES[route] in message


@pytest.mark.integration
@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_unknown_field_is_a_400_naming_it(url: str, route: str) -> None:
    _refused(url, route, {**_base(route), "top_k": 40}, "top_k")


@pytest.mark.integration
@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_ignored_fields_and_absent_values_are_accepted(url: str, route: str) -> None:
    body = _base(route)
    for name, row in DOC_ROWS.items():
        if route not in row["routes"]:
            continue
        if row["handling"] == "ignored":
            body[name] = IGNORED_VALUES[name]
        elif row["handling"] == "refused":
            neutral = [v for v in FIELDS[name].neutral if v is not None]
            body[name] = neutral[0] if neutral else None
    body.update(n=1, frequency_penalty=0.5, presence_penalty=-0.5, stream=None,
                response_format={"type": "text"})
    r = httpx.post(f"{url}{ROUTES[route]}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.integration
def test_honoured_fields_are_checked_not_dropped(url: str) -> None:
    r = httpx.post(f"{url}{ROUTES[CHAT]}", json={**_base(CHAT), "presence_penalty": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=2, logprobs=True, top_logprobs=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "unsupported_parameter"
    assert caught.value.param in ("logprobs", "top_logprobs")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=2, n=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.param == "n"
