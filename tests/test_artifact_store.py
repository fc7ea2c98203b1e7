"""The content-addressed artifact store, against a running control plane over real HTTP.

Each file is kept once by its sha256; publishing asks which digests the
store lacks and sends only those; paths agents fetch resolve to blobs;
garbage collection removes only what no registered release refers to.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.keyfiles import save_key
from controlplane.publishing import publish
from protocol import Tier, VariantFile, canonical_json, files_digest
from tests.support.auth import ADMIN_HEADERS
from tests.support.registry import blob, write_trust
from tests.support.signer import TrustSimulator, make_variant

HEALTH = {
    "max_ttft_ms": 2000,
    "min_tokens_per_s": 5,
    "golden_prompts": [{"prompt": "What is the capital of Germany?", "expected": ["Berlin"]}],
}


class Plane:
    """A running control plane, its store on disk, a release key and a spec writer."""

    def __init__(self, root: Path, url: str, key: Path, sim: TrustSimulator) -> None:
        self.root = root
        self.sim = sim
        self.url = url
        self.key = key
        self.http = httpx.Client(base_url=url, headers=ADMIN_HEADERS, timeout=60)

    @property
    def blobs(self) -> Path:
        return self.root / "cp" / "artifacts" / "blobs" / "sha256"

    @property
    def incoming(self) -> Path:
        return self.root / "cp" / "artifacts" / ".incoming"

    def blob_names(self) -> set[str]:
        return {p.name for p in self.blobs.iterdir()}

    def spec(self, name: str, version: str, variants: dict[str, tuple[Path, str]]) -> Path:
        """Write a release spec: tier -> (file or folder, format)."""
        doc = {
            "name": name,
            "version": version,
            "variants": {
                tier: {"file": str(file), "format": fmt, "parameters": 135_000_000,
                       "context_length": 2048, "health_check": HEALTH}
                for tier, (file, fmt) in variants.items()
            },
        }
        path = self.root / f"{name}-{version}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def publish(self, spec: Path, **kwargs: Any) -> Any:
        return publish(spec, [self.key], self.url, ADMIN_HEADERS["Authorization"][7:], **kwargs)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, broker: Any,
          cp_credentials: Any) -> Iterator[Plane]:
    from controlplane.service import ControlPlane
    from tests.support.controlplane import cp_settings

    root = tmp_path_factory.mktemp("store")
    sim = TrustSimulator()
    trust = write_trust(root / "keys", sim)
    key, _ = save_key(root / "release", "release", sim.release_signers[0])
    cp = ControlPlane(cp_settings(root / "cp", broker, cp_credentials,
                                  release_keys_file=trust.release_keys_file)).start()
    try:
        yield Plane(root, cp.api_url, key, sim)
    finally:
        cp.stop()


def _folder(root: Path, label: str, files: dict[str, bytes]) -> Path:
    folder = root / label
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_second_release_sharing_files_uploads_only_the_new_bytes(
    plane: Plane, model_path: Path
) -> None:
    """The same GGUF for two tiers is sent once; the next release, which shares it and
    a tokenizer, sends only its new ONNX files; the CLI's figures say so; one copy each."""
    from typer.testing import CliRunner

    from slmfleet.app import build_app

    tokenizer = blob("tokenizer", 50_000)
    first = plane.spec("shared", "1.0.0", {"micro": (model_path, "gguf"),
                                           "small": (model_path, "gguf")})
    runner = CliRunner()
    result = runner.invoke(build_app("models"), [
        "models", "publish", "--spec", str(first), "--key", str(plane.key),
        "--server", plane.url, "--output", "json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout[result.stdout.index("{"):])["publish"]
    size = model_path.stat().st_size
    assert figures["files"] == 2 and figures["blobs"] == 1 and figures["files_hashed"] == 1
    assert figures["uploads"] == 1 and figures["bytes_sent"] == size
    assert figures["bytes_held"] == 0

    onnx = _folder(plane.root, "onnx-1", {"model.onnx": blob("graph", 20_000),
                                          "model.onnx.data": blob("weights", 300_000),
                                          "tokenizer.json": tokenizer})
    second = plane.spec("shared", "1.1.0", {"micro": (model_path, "gguf"),
                                            "small": (onnx, "onnx")})
    result = runner.invoke(build_app("models"), [
        "models", "publish", "--spec", str(second), "--key", str(plane.key),
        "--server", plane.url])
    assert result.exit_code == 0, result.output
    assert "4 files, 4 distinct" in result.output
    assert f"sent 3 ({(320_000 + 50_000) / 1e6:.1f} MB)" in result.output
    assert f"already held 1 ({size / 1e6:.1f} MB)" in result.output

    # A third release whose folder shares the tokenizer with the second.
    onnx2 = _folder(plane.root, "onnx-2", {"model.onnx": blob("graph2", 20_000),
                                           "model.onnx.data": blob("weights2", 300_000),
                                           "tokenizer.json": tokenizer})
    done = plane.publish(plane.spec("shared", "1.2.0", {"small": (onnx2, "onnx")}))
    assert (done.summary.uploads, done.summary.bytes_sent) == (2, 320_000)
    assert done.summary.bytes_held == 50_000

    # One copy of each content on disk, whatever the number of paths naming it.
    expected = {_sha(model_path.read_bytes()), _sha(tokenizer)} | {
        _sha(blob(label, n)) for label, n in [("graph", 20_000), ("weights", 300_000),
                                              ("graph2", 20_000), ("weights2", 300_000)]}
    assert expected <= plane.blob_names()
    assert sum(1 for p in plane.blobs.iterdir() if p.stat().st_size == size) == 1


def test_folder_variant_is_published_and_fetched_file_by_file(plane: Plane) -> None:
    files = {"model.onnx": blob("f-graph", 9_000), "genai_config.json": b'{"model": {}}',
             "tokenizer/vocab.json": blob("f-vocab", 3_000)}
    folder = _folder(plane.root, "folder-variant", files)
    done = plane.publish(plane.spec("folder", "1.0.0", {"small": (folder, "onnx")}))
    variant = done.version["manifest"]["variants"]["small"]
    listed = [VariantFile(**f) for f in variant["files"]]
    assert sorted(f.path for f in listed) == sorted(files)
    assert variant["sha256"] == files_digest(listed)
    assert variant["size_bytes"] == sum(len(d) for d in files.values())
    for rel, data in files.items():
        r = httpx.get(f"{plane.url}/v1/artifacts/{variant['artifact']}/{rel}")
        assert r.status_code == 200 and r.content == data
        assert r.headers["etag"] == f'"{_sha(data)}"'
    # The folder itself is no file.
    assert httpx.get(f"{plane.url}/v1/artifacts/{variant['artifact']}").status_code == 404


def test_range_downloads_of_resolved_paths(plane: Plane) -> None:
    data = blob("ranged", 10_000)
    folder = _folder(plane.root, "ranged", {"model.onnx.data": data})
    done = plane.publish(plane.spec("ranged", "1.0.0", {"small": (folder, "onnx")}))
    url = f"{plane.url}/v1/artifacts/{done.version['manifest']['variants']['small']['artifact']}"
    r = httpx.get(f"{url}/model.onnx.data", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
    r = httpx.get(f"{url}/model.onnx.data",
                  headers={"Range": "bytes=9000-", "If-Range": f'"{_sha(data)}"'})
    assert r.status_code == 206 and r.content == data[9000:]
    r = httpx.get(f"{url}/model.onnx.data", headers={"Range": "bytes=20000-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = httpx.head(f"{url}/model.onnx.data")
    assert r.status_code == 200 and r.headers["content-length"] == str(len(data))


def test_tampered_upload_is_refused_and_nothing_kept(plane: Plane) -> None:
    claimed = blob("claimed", 5_000)
    sent = blob("sent", 5_000)
    before = plane.blob_names()
    r = plane.http.put(f"/v1/blobs/sha256/{_sha(claimed)}", content=sent)
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "digest_mismatch"
    assert plane.blob_names() == before
    assert list(plane.incoming.iterdir()) == []
    assert plane.http.post("/v1/blobs/missing", json={"digests": [_sha(claimed), _sha(sent)]}
                           ).json()["missing"] == [_sha(claimed), _sha(sent)]
    assert plane.http.put("/v1/blobs/sha256/not-a-digest", content=sent).status_code == 422
    assert plane.http.post("/v1/blobs/missing", json={"digests": ["ABC"]}).status_code == 422


def test_concurrent_uploads_of_the_same_digest_keep_one_copy(plane: Plane) -> None:
    data = blob("concurrent", 2_000_000)
    sha = _sha(data)
    statuses: list[int] = []
    start = threading.Barrier(6)

    def send() -> None:
        with httpx.Client(base_url=plane.url, headers=ADMIN_HEADERS, timeout=60) as http:
            start.wait()
            # No Content-Length (a generator body): every upload streams in full.
            statuses.append(http.put(f"/v1/blobs/sha256/{sha}", content=iter([data[:1 << 20],
                                                                       data[1 << 20:]]))
                            .status_code)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201] * 6
    assert (plane.blobs / sha).read_bytes() == data
    assert [p.name for p in plane.blobs.iterdir() if p.name == sha] == [sha]
    assert list(plane.incoming.iterdir()) == []
    assert plane.http.post("/v1/blobs/missing", json={"digests": [sha]}).json()["missing"] == []


def test_gc_keeps_referenced_blobs_and_removes_orphans(plane: Plane) -> None:
    from typer.testing import CliRunner

    from slmfleet.app import build_app

    kept = blob("gc-kept", 4_000)
    folder = _folder(plane.root, "gc", {"model.onnx": kept})
    done = plane.publish(plane.spec("gc", "1.0.0", {"small": (folder, "onnx")}))
    orphan = blob("gc-orphan", 3_000)
    assert plane.http.put(f"/v1/blobs/sha256/{_sha(orphan)}", content=orphan).status_code == 201
    unregistered = blob("gc-path", 2_000)
    assert plane.http.put("/v1/artifacts/never/registered.bin", content=unregistered,
                          headers={"X-Content-SHA256": _sha(unregistered)}).status_code == 201

    # Within the grace period nothing goes, however unreferenced.
    assert plane.http.post("/v1/blobs/gc", json={}).json()["removed_blobs"] == []
    dry = plane.http.post("/v1/blobs/gc", json={"dry_run": True, "grace_s": 0}).json()
    assert {_sha(orphan), _sha(unregistered)} <= set(dry["removed_blobs"])
    assert _sha(kept) not in dry["removed_blobs"]
    assert {_sha(orphan), _sha(unregistered), _sha(kept)} <= plane.blob_names()  # dry

    result = CliRunner().invoke(build_app("models"), [
        "models", "gc", "--grace", "0", "--server", plane.url, "--output", "json"])
    assert result.exit_code == 0, result.output
    removed = json.loads(result.stdout[result.stdout.index("{"):])
    assert {_sha(orphan), _sha(unregistered)} <= set(removed["removed_blobs"])
    assert "never/registered.bin" in removed["removed_paths"]
    names = plane.blob_names()
    assert _sha(orphan) not in names and _sha(unregistered) not in names
    # Everything every registered release refers to is still there and served.
    artifact = done.version["manifest"]["variants"]["small"]["artifact"]
    assert httpx.get(f"{plane.url}/v1/artifacts/{artifact}/model.onnx").content == kept
    assert httpx.get(f"{plane.url}/v1/artifacts/never/registered.bin").status_code == 404
    audit = plane.http.get("/v1/audit").json()["items"]
    assert any(entry.get("path") == "/v1/blobs/gc" for entry in audit)


def test_a_release_naming_one_path_twice_with_different_content_is_refused(
    plane: Plane
) -> None:
    a, b = blob("twice-a", 100), blob("twice-b", 100)
    for data in (a, b):
        assert plane.http.put(f"/v1/blobs/sha256/{_sha(data)}", content=data).status_code == 201
    variants = {tier: make_variant(tier, sha256=_sha(data), size_bytes=100,
                                   artifact="twice/model.gguf")
                for tier, data in ((Tier.MICRO, a), (Tier.SMALL, b))}
    envelope = plane.sim.release("twice", "1.0.0", variants=variants)
    r = plane.http.post("/v1/models", content=canonical_json(envelope))
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "artifact_mismatch"
    assert httpx.get(f"{plane.url}/v1/artifacts/twice/model.gguf").status_code == 404


def test_gc_never_touches_an_upload_in_progress(plane: Plane) -> None:
    """A collection while an upload is half sent leaves it to finish and land."""
    data = blob("gc-in-flight", 3_000_000)
    half_sent, go_on = threading.Event(), threading.Event()
    outcome: list[int] = []

    def body() -> Iterator[bytes]:
        yield data[:1_500_000]
        half_sent.set()
        go_on.wait(30)
        yield data[1_500_000:]

    def send() -> None:
        with httpx.Client(base_url=plane.url, headers=ADMIN_HEADERS, timeout=60) as http:
            outcome.append(http.put(f"/v1/blobs/sha256/{_sha(data)}", content=body()).status_code)

    sender = threading.Thread(target=send)
    sender.start()
    assert half_sent.wait(30)
    done = plane.http.post("/v1/blobs/gc", json={"grace_s": 0}).json()
    assert _sha(data) not in done["removed_blobs"]
    go_on.set()
    sender.join(60)
    assert outcome == [201]
    assert (plane.blobs / _sha(data)).read_bytes() == data


def test_gc_needs_admin(plane: Plane) -> None:
    r = httpx.post(f"{plane.url}/v1/blobs/gc", json={"dry_run": True})
    assert r.status_code == 401


@pytest.mark.parametrize("problem", ["symlink", "outside", "hidden"])
def test_folder_with_a_symlink_or_hidden_file_is_refused_at_publish(
    plane: Plane, tmp_path: Path, problem: str
) -> None:
    from controlplane.client import PublishError

    folder = _folder(tmp_path, "bad", {"model.onnx": blob("bad-graph", 1_000)})
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not part of the model")
    if problem == "symlink":
        (folder / "tokenizer.json").symlink_to(folder / "model.onnx")
    elif problem == "outside":
        (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
    else:
        (folder / ".DS_Store").write_bytes(b"x")
    before = plane.blob_names()
    with pytest.raises(PublishError) as caught:
        plane.publish(plane.spec("bad", "1.0.0", {"small": (folder, "onnx")}))
    assert ("hidden" if problem == "hidden" else "symlink") in str(caught.value)
    assert plane.blob_names() == before
    assert plane.http.get("/v1/models/bad/versions/1.0.0").status_code == 404


def test_example_release_with_a_gguf_and_an_onnx_folder_variant(
    plane: Plane, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/smollm2-onnx.release.yaml, with the ONNX build made at set-up."""
    from tests.support.genai import onnx_genai_path

    folder = onnx_genai_path()
    if folder is None:
        pytest.skip("no onnxruntime-genai build: run scripts/build-onnx-genai.sh")
    monkeypatch.setenv("SLMFLEET_ONNX_MODEL", str(folder))
    example = Path(__file__).parent.parent / "examples" / "smollm2-onnx.release.yaml"
    spec = plane.root / "onnx-example.yaml"
    spec.write_text(example.read_text().replace(
        "~/.cache/slmfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf", str(model_path)))
    done = plane.publish(spec)
    manifest = done.version["manifest"]
    assert manifest["variants"]["micro"]["format"] == "gguf"
    small = manifest["variants"]["small"]
    assert small["format"] == "onnx"
    assert {f["path"] for f in small["files"]} == {p.name for p in folder.iterdir()}
    data = (folder / "genai_config.json").read_bytes()
    served = httpx.get(f"{plane.url}/v1/artifacts/{small['artifact']}/genai_config.json")
    assert served.content == data
