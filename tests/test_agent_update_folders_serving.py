"""A folder variant through a whole agent: the real ONNX SmolLM2 folder, updated to and served.

A real agent process serves the GGUF SmolLM2 as 1.0.0; a signed release
2.0.0 carries the onnxruntime-genai build (the folder the set-up built:
``model.onnx``, ``model.onnx.data``, ``genai_config.json``, tokenizer
files) as a folder variant. The agent downloads it file by file over HTTP,
installs it as one unit, health-checks it in its worker and switches to
it; the official ``openai`` client then gets answers from it, streamed and
not, named as 2.0.0. Then to the GGUF, as 3.0.0, and back to the folder,
which is still installed and is not fetched again.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

import protocol as p
from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import ready_url, serving_rig
from tests.support.updates import (
    DeviceRig,
    built_onnx_folder,
    file_sha256,
    folder_variant_for,
    link_or_copy,
    variant_for,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "smollm2-135m"
WATER = [{"role": "user", "content": "What is the chemical symbol for water?"}]


@pytest.fixture(scope="module")
def onnx_folder() -> Path:
    return built_onnx_folder()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, broker, cp_credentials, model_path: Path,
        onnx_folder: Path) -> Iterator[DeviceRig]:
    work = tmp_path_factory.mktemp("folder-serving")
    artifacts = work / "artifacts"
    for f in onnx_folder.iterdir():
        link_or_copy(f, artifacts / "smollm2-onnx-int4" / f.name)
    link_or_copy(model_path, artifacts / "smollm2.gguf")
    device_id = f"folder-{secrets.token_hex(3)}"
    with (
        ArtifactServer(artifacts) as server,
        serving_rig(work, broker, cp_credentials, device_id, server, model_path, MODEL,
                    heartbeat_interval_s=2.0) as rig,
    ):
        yield rig


def _chat(url: str, stream: bool) -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    if not stream:
        reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                               messages=WATER)
        return reply.choices[0].message.content or "", reply.model
    chunks = list(client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                                 messages=WATER, stream=True))
    assert len(chunks) > 3, "streamed piece by piece"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[0].model


def _update(rig: DeviceRig, version: str, variant: p.Variant) -> None:
    payload = rig.assign(rig.release(version, variant))
    rig.publish(payload)
    final = rig.wait_final(f"a-{rig.device_id}-{rig._sequence}", timeout=300)
    assert final.type == p.EventType.ACTIVATED, final


def test_an_onnx_folder_variant_is_installed_whole_and_served(
    rig: DeviceRig, onnx_folder: Path, model_path: Path
) -> None:
    url = ready_url(rig)
    assert _chat(url, stream=False)[1] == f"{MODEL}@1.0.0"
    # Files in any order: the folder's identity is the digest of its sorted list.
    variant = folder_variant_for(rig.server.directory / "smollm2-onnx-int4",
                                 "smollm2-onnx-int4")
    _update(rig, "2.0.0", variant)

    key, sha256 = rig.active(MODEL)  # re-hashes every file and checks nothing else is there
    assert (key, sha256) == (f"{MODEL}@2.0.0-micro", variant.sha256)
    installed = rig.store.active().artifact
    assert installed.is_dir()
    assert {f.name: file_sha256(f) for f in installed.iterdir()} == {
        f.path: f.sha256 for f in variant.files}
    assert rig.staging == []
    downloading = [e.progress_pct for e in rig.events(f"a-{rig.device_id}-{rig._sequence}")
                   if e.type == p.EventType.DOWNLOADING]
    assert downloading[-1] == 100.0 and downloading == sorted(downloading)

    for stream in (False, True):
        text, _ = wait_for(lambda s=stream: _served_by(url, "2.0.0", s), 60,
                               "the ONNX build to answer")
        assert "h2o" in text.lower(), text
    hello = rig.wait_hello(lambda h: any(m.version == "2.0.0" for m in h.active_models()))
    assert [(m.name, m.sha256) for m in hello.active_models()] == [(MODEL, variant.sha256)]

    # And back to a single file: the folder stays installed as the rollback target.
    _update(rig, "3.0.0", variant_for(model_path, "smollm2.gguf"))
    assert rig.active(MODEL)[0] == f"{MODEL}@3.0.0-micro"
    assert rig.store.previous().key == f"{MODEL}@2.0.0-micro"
    assert rig.store.verify_hash(f"{MODEL}@2.0.0-micro")
    text, _ = wait_for(lambda: _served_by(url, "3.0.0", False), 60, "the GGUF to answer")
    assert "h2o" in text.lower(), text

    # Back to the folder: it is installed and verifies whole, so nothing is fetched again.
    fetched = len(rig.server.requests())
    _update(rig, "2.0.0", variant)
    assert rig.active(MODEL) == (f"{MODEL}@2.0.0-micro", variant.sha256)
    assert len(rig.server.requests()) == fetched, "the installed folder is reused"
    text, _ = wait_for(lambda: _served_by(url, "2.0.0", False), 60, "the ONNX build again")
    assert "h2o" in text.lower(), text


def _served_by(url: str, version: str, stream: bool) -> tuple[str, str] | None:
    text, model = _chat(url, stream)
    return (text, model) if model == f"{MODEL}@{version}" else None
