"""Publishing an adapter release: the spec file, the manifest it builds, the registry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from controlplane.release_spec import SpecError, artifact_path, build_manifest, load_spec
from protocol import Tier, canonical_json, sign_release
from tests.support.registry import registry_app, upload
from tests.support.signer import TrustSimulator

BASE_SHA = "b1" * 32

SPEC = """\
name: support-formal
version: 1.0.0
description: formal greetings for customer support (LoRA on smollm2)
adapter_of:
  name: smollm2
  versions: ">=1.1.0,<2.0.0"
  sha256: {micro: %s}
  scale: 0.8
variants:
  micro:
    file: adapter.gguf
    format: gguf-lora
    parameters: 460000
    context_length: 8192
    health_check:
      max_ttft_ms: 5000
      golden_prompts:
        - {prompt: "Say hello to a customer.", expected: [Dear], max_tokens: 16}
"""


def _spec(tmp_path: Path, text: str) -> Path:
    (tmp_path / "adapter.gguf").write_bytes(b"GGUF adapter bytes" * 100)
    path = tmp_path / "support-formal.yaml"
    path.write_text(text)
    return path


def test_an_adapter_spec_builds_an_adapter_release(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, SPEC % BASE_SHA))
    data = (tmp_path / "adapter.gguf").read_bytes()
    measured = {Tier.MICRO: (hashlib.sha256(data).hexdigest(), len(data))}
    manifest = build_manifest(spec, measured, released_at=1.0)
    assert manifest.adapter_of is not None
    assert manifest.adapter_of.name == "smollm2" and manifest.adapter_of.scale == 0.8
    assert manifest.adapter_of.sha256[Tier.MICRO] == BASE_SHA
    variant = manifest.variants[Tier.MICRO]
    assert variant.format == "gguf-lora" and variant.size_bytes == len(data)
    assert artifact_path(spec, Tier.MICRO) == "support-formal/1.0.0/micro/adapter.gguf"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: text.replace("adapter_of:", "adapter_off:"), "adapter_off"),
    (lambda text: text[:text.index("adapter_of:")] + text[text.index("variants:"):],
     "needs adapter_of"),
    (lambda text: text.replace(">=1.1.0,<2.0.0", "1.1.0"), "not a comparator"),
    (lambda text: text.replace("{micro: ", "{small: "), r"no base for tier\(s\) micro"),
    (lambda text: text.replace("format: gguf-lora", "format: gguf"), "only gguf-lora"),
])
def test_a_bad_adapter_spec_is_refused_by_name(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec = load_spec(_spec(tmp_path, edit(SPEC % BASE_SHA)))
        build_manifest(spec, {Tier.MICRO: ("a" * 64, 10)}, released_at=1.0)


def test_the_registry_takes_an_adapter_release(tmp_path: Path) -> None:
    sim = TrustSimulator()
    spec = load_spec(_spec(tmp_path, SPEC % BASE_SHA))
    data = (tmp_path / "adapter.gguf").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    manifest = build_manifest(spec, {Tier.MICRO: (sha, len(data))}, released_at=sim.now - 60)
    envelope = sign_release(manifest, sim.release_signers)
    client, engine = registry_app(tmp_path, sim)
    try:
        assert upload(client, artifact_path(spec, Tier.MICRO), data).status_code in (200, 201)
        response = client.post("/v1/models", content=canonical_json(envelope))
        assert response.status_code == 201, response.text
        shown = client.get("/v1/models/support-formal/versions/1.0.0")
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert body["variants"][0]["format"] == "gguf-lora"
        assert body["manifest"]["adapter_of"] == {
            "name": "smollm2", "versions": ">=1.1.0,<2.0.0", "sha256": {"micro": BASE_SHA},
            "scale": 0.8}
    finally:
        client.close()
        engine.dispose()
