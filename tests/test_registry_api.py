"""The model registry over HTTP: only releases a release-key threshold signed get in,
nothing is stored for one that fails, and versions sort by semver."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import protocol as p
from controlplane.db.models import ModelVariant, ModelVersion
from controlplane.semver_order import sort_key
from tests.support.auth import ADMIN_HEADERS
from tests.support.registry import blob, publish, registry_app, release_with_blobs, upload
from tests.support.semver import SPEC_PRECEDENCE_CHAIN
from tests.support.signer import TrustSimulator, flip_byte


@pytest.fixture
def sim() -> TrustSimulator:
    # 2-of-3 release keys, so "below threshold" and "wrong key" are distinct cases.
    return TrustSimulator(release_threshold=2, n_release_keys=3)


@pytest.fixture
def app(tmp_path: Path, sim: TrustSimulator) -> Iterator[tuple[Any, Any]]:
    client, engine = registry_app(tmp_path, sim, page_max=50)
    with client:
        yield client, engine
    engine.dispose()


@pytest.fixture
def api(app: tuple[Any, Any]) -> Any:
    return app[0]


def _rows(engine: Any) -> tuple[int, int]:
    with engine.connect() as conn:
        versions = conn.execute(select(func.count()).select_from(ModelVersion)).scalar_one()
        variants = conn.execute(select(func.count()).select_from(ModelVariant)).scalar_one()
    return versions, variants


def _stage(api: Any, sim: TrustSimulator, version: str = "1.0.0", **kw: Any) -> dict[str, Any]:
    """Upload the blobs of a two-tier release and return its (unregistered) envelope."""
    envelope, files = release_with_blobs(
        sim, "smollm2", version, {p.Tier.MICRO: blob("m"), p.Tier.SMALL: blob("s", 8000)}, **kw
    )
    for path, data in files.items():
        assert upload(api, path, data).status_code in (200, 201)
    return envelope


def test_publish_then_read_back_verbatim(api: Any, sim: TrustSimulator) -> None:
    envelope = _stage(api, sim)
    r = api.post("/v1/models", content=p.canonical_json(envelope))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["version"]) == ("smollm2", "1.0.0")
    assert {v["tier"] for v in body["variants"]} == {"micro", "small"}

    detail = api.get("/v1/models/smollm2/versions/1.0.0").json()
    assert detail["envelope"] == envelope
    # What is stored still verifies against the release keys: no re-serialisation drift.
    assert p.verify_release(p.canonical_json(detail["envelope"]), sim.release_keys).ref == (
        "smollm2@1.0.0"
    )
    models = api.get("/v1/models").json()
    assert models["items"][0]["name"] == "smollm2"
    assert models["items"][0]["latest_version"] == "1.0.0"
    assert models["next"] is None


def test_same_manifest_twice_is_idempotent_a_different_one_conflicts(
    app: tuple[Any, Any], sim: TrustSimulator
) -> None:
    api, engine = app
    envelope = _stage(api, sim)
    assert api.post("/v1/models", content=p.canonical_json(envelope)).status_code == 201
    # Same manifest, even re-serialised with other whitespace and key order: 200.
    again = json.dumps(envelope, indent=2).encode()
    assert api.post("/v1/models", content=again).status_code == 200
    other = _stage(api, sim, description="a different build")
    r = api.post("/v1/models", content=p.canonical_json(other))
    assert r.status_code == 409
    assert "different manifest" in r.json()["detail"]["message"]
    assert _rows(engine) == (1, 2)


def _below_threshold(sim: TrustSimulator, envelope: dict[str, Any]) -> bytes:
    return p.canonical_json(sim.resign_release(envelope, sim.release_signers[:1]))


def _wrong_keys(sim: TrustSimulator, envelope: dict[str, Any]) -> bytes:
    stranger = TrustSimulator(release_threshold=2)
    return p.canonical_json(stranger.resign_release(envelope, stranger.release_signers))


def _tampered(sim: TrustSimulator, envelope: dict[str, Any]) -> bytes:
    # One byte of a variant's sha256 changed after signing.
    sha = envelope["signed"]["variants"]["micro"]["sha256"]
    return flip_byte(p.canonical_json(envelope), sha)


def _unsigned(sim: TrustSimulator, envelope: dict[str, Any]) -> bytes:
    return p.canonical_json({"signed": envelope["signed"], "signatures": []})


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_below_threshold, "threshold_not_met"),
        (_wrong_keys, "threshold_not_met"),
        (_tampered, "threshold_not_met"),
        (_unsigned, "threshold_not_met"),
    ],
)
def test_untrusted_release_is_refused_with_reason_and_nothing_stored(
    app: tuple[Any, Any], sim: TrustSimulator, attack: Any, reason: str
) -> None:
    api, engine = app
    payload = attack(sim, _stage(api, sim))
    r = api.post("/v1/models", content=payload)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["reason"] == reason
    assert "release" in r.json()["detail"]["message"]
    assert _rows(engine) == (0, 0)
    assert api.get("/v1/models/smollm2/versions").status_code == 404
    assert api.get("/v1/models").json()["items"] == []


def test_not_a_release_is_400_and_oversize_is_413(
    app: tuple[Any, Any], sim: TrustSimulator
) -> None:
    api, engine = app
    assert api.post("/v1/models", content=b"{not json").json()["detail"]["reason"] == "malformed"
    # A key list is validly signed by the release keys, but it is not a release.
    key_list = p.sign_key_list(sim.release_keys, sim.release_signers[:2])
    r = api.post("/v1/models", content=p.canonical_json(key_list))
    assert r.status_code == 400 and r.json()["detail"]["reason"] == "wrong_schema"
    r = api.post("/v1/models", content=b" " * (p.MAX_RELEASE_BYTES + 1))
    assert r.status_code == 413
    assert _rows(engine) == (0, 0)


def test_missing_or_different_artifact_is_named(app: tuple[Any, Any], sim: TrustSimulator) -> None:
    api, engine = app
    envelope, files = release_with_blobs(sim, "smollm2", "1.0.0", {p.Tier.MICRO: blob("m")})
    r = api.post("/v1/models", content=p.canonical_json(envelope))
    assert r.status_code == 422
    assert r.json()["detail"]["reason"] == "missing_artifact"
    assert "smollm2/1.0.0/micro/model.gguf" in r.json()["detail"]["message"]
    # The right path holding other bytes is refused too.
    (path,) = files
    assert upload(api, path, blob("impostor")).status_code == 201
    r = api.post("/v1/models", content=p.canonical_json(envelope))
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "artifact_mismatch"
    assert _rows(engine) == (0, 0)


def test_registry_off_without_release_keys(tmp_path: Path) -> None:
    client, engine = registry_app(tmp_path)
    with client:
        r = client.post("/v1/models", content=b"{}")
        assert r.status_code == 404
        assert "release_keys_file" in r.json()["detail"]
    engine.dispose()


VERSIONS = [*SPEC_PRECEDENCE_CHAIN, "1.2.0", "1.10.0", "2.0.0-0", "2.0.0", "10.0.0"]


def test_sort_key_orders_like_semver_precedence() -> None:
    # semver.org's own example chain, plus multi-digit components.
    shuffled = VERSIONS[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=sort_key) == VERSIONS
    assert sorted(shuffled, key=p.semver_key) == VERSIONS
    extra = ["0.0.1", "1.0.0-a", "1.0.0-a-b", "1.0.0-a.b", "1.0.0-0a", "1.0.0-9", "1.0.0-10"]
    both = VERSIONS + extra
    assert sorted(both, key=sort_key) == sorted(both, key=p.semver_key)
    assert sort_key("1.0.0+build.1") == sort_key("1.0.0")
    with pytest.raises(ValueError, match="too large"):
        sort_key("99999999999999999999999.0.0")


def test_versions_listed_newest_first_across_pages(api: Any, sim: TrustSimulator) -> None:
    for version in random.Random(3).sample(VERSIONS, len(VERSIONS)):
        publish(api, sim, "smollm2", version)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/models/smollm2/versions", params=params).json()
        seen += [v["version"] for v in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == VERSIONS[::-1]
    assert api.get("/v1/models").json()["items"][0]["latest_version"] == "10.0.0"
    assert api.get("/v1/models/smollm2/versions", params={"cursor": "junk"}).status_code == 422


def test_artifact_in_use_survives_garbage_collection(
    app: tuple[Any, Any], sim: TrustSimulator
) -> None:
    """A registered release lists its files: collection with no grace keeps their
    blobs and paths, and the artifact is still served."""
    api, _ = app
    envelope = publish(api, sim)
    done = api.post("/v1/blobs/gc", json={"grace_s": 0}).json()
    assert done["removed_blobs"] == [] and done["removed_paths"] == []
    artifact = envelope["signed"]["variants"]["micro"]["artifact"]
    assert api.get(f"/v1/artifacts/{artifact}").status_code == 200


def test_manifest_digest_is_sha256_of_the_canonical_signed_part(
    api: Any, sim: TrustSimulator
) -> None:
    envelope = publish(api, sim)
    detail = api.get("/v1/models/smollm2/versions/1.0.0").json()
    assert detail["manifest_sha256"] == hashlib.sha256(
        p.canonical_json(envelope["signed"])
    ).hexdigest()


# --- the real model, through the CLI, against a running control plane ---------


def test_publish_real_smollm2_with_the_cli(
    tmp_path: Path, broker: Any, cp_credentials: Any, model_path: Path
) -> None:
    from typer.testing import CliRunner

    from controlplane.service import ControlPlane
    from slmfleet.app import build_app
    from tests.support.controlplane import cp_settings

    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(build_app(args[0]), list(args))
        assert result.exit_code == 0, result.output
        return result.output

    keyid = cli("keys", "generate", "--role", "release", "--out", str(tmp_path / "k")).split()[1]
    key = tmp_path / "k" / f"{keyid}.key"
    pinned = tmp_path / "release-keys.json"
    cli("keys", "list", "--role", "release", "--key", str(key), "--out", str(pinned))
    spec = tmp_path / "smollm2.yaml"
    example = (Path(__file__).parent.parent / "examples" / "smollm2.release.yaml").read_text()
    spec.write_text(example.replace(
        "~/.cache/slmfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf", str(model_path)
    ))

    plane = ControlPlane(
        cp_settings(tmp_path / "cp", broker, cp_credentials, release_keys_file=pinned)
    ).start()
    try:
        server = plane.api_url
        out = cli("models", "publish", "--spec", str(spec), "--key", str(key), "--server", server)
        assert "published smollm2@1.0.0 (micro)" in out
        detail = httpx.get(
            f"{server}/v1/models/smollm2/versions/1.0.0",
            headers=ADMIN_HEADERS
        ).json()
        (variant,) = detail["variants"]
        data = model_path.read_bytes()
        assert variant["sha256"] == hashlib.sha256(data).hexdigest()
        assert variant["size_bytes"] == len(data)
        served = httpx.get(f"{server}/v1/artifacts/{variant['artifact']}",
                           headers={"Range": "bytes=0-3"})
        assert served.status_code == 206 and served.content == b"GGUF"
        prompts = detail["manifest"]["variants"]["micro"]["health_check"]["golden_prompts"]
        assert [g["expected"] for g in prompts] == [["Berlin"], ["H2O"], ["cold"]]

        # Publishing again (a new released_at, so a different manifest) conflicts,
        # but the artifact upload is skipped as already present.
        result = runner.invoke(build_app("models"), ["models", "publish", "--spec", str(spec),
                                                     "--key", str(key), "--server", server])
        assert result.exit_code == 1
        assert "already uploaded" in result.output
        assert "different manifest" in result.output
        assert "smollm2" in cli("models", "list", "--server", server)
        assert "Q4_1" in cli("models", "show", "smollm2", "1.0.0", "--server", server)
    finally:
        plane.stop()
