"""Unit tests for the pure protocol layer: topics, messages, canonical JSON, signing."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

import protocol as p


def _hello(**over) -> p.Hello:
    fields = dict(
        device_id="pi-1",
        ts=time.time(),
        agent_version="0.1.0",
        capabilities=p.Capabilities(
            cpu=p.CpuInfo(model="Cortex-A72", arch="aarch64", cores=4, threads=4, flags=["neon"]),
            ram_bytes=4 << 30,
            disk_free_bytes=10 << 30,
            os=p.OsInfo(system="Linux", release="6.1"),
        ),
        profile="raspberry-pi-4-4gb",
        tier=p.Tier.MICRO,
    )
    fields.update(over)
    return p.Hello(**fields)


# --- topics -------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(p.TopicKind))
def test_topic_round_trip(kind: p.TopicKind) -> None:
    topic = p.device_topic("dev-01", kind)
    assert topic == f"slmfleet/v1/dev/dev-01/{kind.value}"
    assert p.parse_topic(topic) == ("dev-01", kind)


@pytest.mark.parametrize(
    "device_id", ["", "A", "has/slash", "plus+", "hash#", "$sys", "-lead", "x" * 65, "sp ace"]
)
def test_bad_device_ids_rejected(device_id: str) -> None:
    assert not p.is_valid_device_id(device_id)
    with pytest.raises(ValueError, match="invalid device id"):
        p.device_topic(device_id, p.TopicKind.HELLO)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/dev/a/hello",
        "slmfleet/v1/dev/a/b/hello",
        "slmfleet/v1/dev/a/unknown",
        "slmfleet/v1/dev/A/hello",
        "slmfleet/v1/dev/",
    ],
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(p.TopicError):
        p.parse_topic(topic)


def test_subscriptions() -> None:
    assert p.subscription("telemetry") == "slmfleet/v1/dev/+/telemetry"
    assert p.subscription("events", "cp") == "$share/cp/slmfleet/v1/dev/+/events"


# --- messages -----------------------------------------------------------------

def test_hello_round_trip_carries_schema() -> None:
    hello = _hello()
    raw = p.encode(hello)
    assert json.loads(raw)["schema"] == "slmfleet.hello/1"
    assert p.decode(p.TopicKind.HELLO, raw) == hello


def test_unknown_field_rejected() -> None:
    data = json.loads(p.encode(_hello()))
    data["surprise"] = 1
    with pytest.raises(p.MalformedPayload, match="surprise"):
        p.decode("hello", json.dumps(data).encode())


def test_nested_unknown_field_rejected() -> None:
    data = json.loads(p.encode(_hello()))
    data["capabilities"]["cpu"]["turbo"] = True
    with pytest.raises(p.MalformedPayload):
        p.decode("hello", json.dumps(data).encode())


def test_wrong_schema_is_its_own_error() -> None:
    state = p.State(device_id="pi-1", state=p.DeviceState.ONLINE, ts=1.0)
    with pytest.raises(p.SchemaMismatch) as info:
        p.decode("hello", p.encode(state))
    assert info.value.reason == "wrong_schema"


def test_future_schema_version_rejected() -> None:
    data = json.loads(p.encode(p.State(device_id="pi-1", state="online", ts=1.0)))
    data["schema"] = "slmfleet.state/2"
    with pytest.raises(p.SchemaMismatch):
        p.decode("state", json.dumps(data).encode())


def test_oversized_payload_refused_before_parsing() -> None:
    raw = b"{" + b" " * p.MAX_PAYLOAD_BYTES + b"}"
    with pytest.raises(p.PayloadTooLarge) as info:
        p.decode("telemetry", raw)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b"null", b'{"schema":'])
def test_malformed_json(raw: bytes) -> None:
    with pytest.raises(p.MalformedPayload):
        p.decode("events", raw)


def test_bad_device_id_in_payload() -> None:
    data = json.loads(p.encode(p.State(device_id="pi-1", state="online", ts=1.0)))
    data["device_id"] = "../etc"
    with pytest.raises(p.MalformedPayload, match="device_id"):
        p.decode("state", json.dumps(data).encode())


def test_caps_on_strings_and_lists() -> None:
    with pytest.raises(ValueError):
        _hello(labels={f"k{i}": "v" for i in range(33)})
    with pytest.raises(ValueError):
        _hello(agent_version="x" * 129)


def test_telemetry_and_event_round_trip() -> None:
    t = p.Telemetry(
        device_id="d1", ts=2.0, seq=7, uptime_s=1.5, cpu_percent=12.5, ram_used_bytes=1 << 20,
        inference=[p.InferenceStats(model="m", version="1.0.0", requests=3, ttft_p95_ms=40.0)],
    )
    assert p.decode("telemetry", p.encode(t)) == t
    e = p.Event(device_id="d1", ts=3.0, seq=1, type=p.EventType.DOWNLOADING, progress_pct=50)
    assert p.decode("events", p.encode(e)) == e
    with pytest.raises(p.MalformedPayload):
        p.decode("events", p.encode(e).replace(b"50", b"150"))


def test_desired_is_not_a_device_message() -> None:
    with pytest.raises(ValueError):
        p.decode("desired", b"{}")


def test_tier_order() -> None:
    assert p.Tier.MICRO.rank < p.Tier.SMALL.rank < p.Tier.MEDIUM.rank


# --- canonical JSON and signatures -----------------------------------------------

def test_canonical_json_is_order_independent_and_compact() -> None:
    a = p.canonical_json({"b": 1, "a": [1, {"d": "é", "c": None}]})
    b = p.canonical_json({"a": [1, {"c": None, "d": "é"}], "b": 1})
    assert a == b == '{"a":[1,{"c":null,"d":"é"}],"b":1}'.encode()


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        p.canonical_json({"x": float("nan")})


def test_sign_and_verify_threshold() -> None:
    keys = [p.SigningKey.generate() for _ in range(3)]
    trusted = {k.key_id: k.public for k in keys}
    value = {"name": "smollm2", "version": "1.0.0"}
    sigs = [keys[0].sign_value(value), keys[1].sign_value(value)]
    assert p.verify_value(value, sigs, trusted, threshold=2) == {keys[0].key_id, keys[1].key_id}
    with pytest.raises(p.SignatureError, match="2 valid signature"):
        p.verify_value(value, sigs, trusted, threshold=3)


def test_duplicate_and_unknown_signatures_do_not_count() -> None:
    key, stranger = p.SigningKey.generate(), p.SigningKey.generate()
    trusted = {key.key_id: key.public}
    value = {"x": 1}
    sigs = [key.sign_value(value), key.sign_value(value), stranger.sign_value(value)]
    with pytest.raises(p.SignatureError):
        p.verify_value(value, sigs, trusted, threshold=2)


def test_tampered_value_fails() -> None:
    key = p.SigningKey.generate()
    sig = key.sign_value({"x": 1})
    with pytest.raises(p.SignatureError):
        p.verify_value({"x": 2}, [sig], {key.key_id: key.public}, threshold=1)


@pytest.mark.parametrize("sig", [{"keyid": "zz"}, {"sig": "AA=="}, "junk", {"keyid": 1, "sig": 2}])
def test_malformed_signature_entries_ignored(sig) -> None:
    key = p.SigningKey.generate()
    with pytest.raises(p.SignatureError):
        p.verify_value({"x": 1}, [sig], {key.key_id: key.public}, threshold=1)


def test_key_round_trip() -> None:
    key = p.SigningKey.generate()
    again = p.SigningKey.from_b64(key.to_b64())
    assert again.key_id == key.key_id == p.key_id_for(key.public.raw)
    assert p.PublicKey.from_b64(key.public.to_b64()) == key.public
    with pytest.raises(p.SignatureError):
        p.PublicKey.from_b64("not base64!")


# --- documents people write by hand -------------------------------------------


def test_yaml_mapping_is_parsed_within_its_cap() -> None:
    raw = b"name: x\nvariants: {micro: {file: a.gguf}}\n"
    assert p.parse_yaml_mapping(raw, "spec s.yaml", max_bytes=len(raw)) == {
        "name": "x", "variants": {"micro": {"file": "a.gguf"}},
    }


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"x: " + b"a" * 100, ["spec s.yaml: 103 bytes, limit 64"]),
        (b"x: [unclosed\n", ["spec s.yaml: not valid YAML"]),
        (b"- a\n- list\n", ["spec s.yaml: expected a mapping (x, y) at the top level"]),
        (b"just text\n", ["expected a mapping (x, y)"]),
        (b"", ["expected a mapping (x, y)"]),
    ],
)
def test_yaml_mapping_refusals_name_the_source(raw: bytes, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        p.parse_yaml_mapping(raw, "spec s.yaml", max_bytes=64, expected="a mapping (x, y)")
    for word in words:
        assert word in str(err.value)


def test_validation_problems_name_each_field() -> None:
    with pytest.raises(ValidationError) as err:
        p.Hello.model_validate({"device_id": "Bad Id!"})
    problems = p.validation_problems(err.value).split("; ")
    assert len(problems) == len(err.value.errors())
    assert any(problem.startswith("device_id: ") for problem in problems)
    with pytest.raises(ValidationError) as err:
        p.Hello.model_validate([])
    assert p.validation_problems(err.value, root="(root)").startswith("(root): ")


@pytest.mark.parametrize("url", ["mqtt://localhost", "mqtts://broker.example:8883"])
def test_broker_url_accepted(url: str) -> None:
    assert p.check_broker_url(url) == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ws://h:8883", "must look like mqtt://"),
        ("mqtt://", "must look like mqtt://"),
        ("mqtt://h:port", "bad port"),
        ("mqtt://h:99999", "bad port"),
    ],
)
def test_broker_url_refused(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        p.check_broker_url(url)
