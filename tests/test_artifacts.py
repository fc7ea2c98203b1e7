"""The artifact store over HTTP: verified uploads, Range semantics, nothing half-written."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.artifacts import BadArtifactPath, check_path
from tests.support.registry import blob, registry_app, upload

DATA = blob("artifact", 1000)
SHA = hashlib.sha256(DATA).hexdigest()
PATH = "smollm2/1.0.0/micro/model.gguf"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Any]:
    client, engine = registry_app(tmp_path, artifact_max_bytes=64 * 1024)
    with client:
        yield client
    engine.dispose()


@pytest.fixture
def stored(api: Any) -> Any:
    assert upload(api, PATH, DATA).status_code == 201
    return api


def _visible_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_upload_then_get_whole_file_with_sha_etag(stored: Any) -> None:
    r = stored.get(f"/v1/artifacts/{PATH}")
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["etag"] == f'"{SHA}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(len(DATA))


def test_head_gives_size_and_etag_without_body(stored: Any) -> None:
    r = stored.head(f"/v1/artifacts/{PATH}")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["content-length"] == str(len(DATA))
    assert r.headers["etag"] == f'"{SHA}"'


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),  # first byte
        ("bytes=100-199", 100, 199),  # middle
        ("bytes=999-999", 999, 999),  # last byte
        ("bytes=990-", 990, 999),  # open-ended: to the end
        ("bytes=-10", 990, 999),  # suffix: the last 10 bytes
        ("bytes=500-5000", 500, 999),  # end past EOF is clamped
        ("bytes=-5000", 0, 999),  # suffix longer than the file: all of it
    ],
)
def test_range_returns_206_with_content_range(
    stored: Any, header: str, start: int, end: int
) -> None:
    r = stored.get(f"/v1/artifacts/{PATH}", headers={"Range": header})
    assert r.status_code == 206
    assert r.content == DATA[start : end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert r.headers["content-length"] == str(end - start + 1)


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000"])
def test_unsatisfiable_range_is_416_with_the_size(stored: Any, header: str) -> None:
    r = stored.get(f"/v1/artifacts/{PATH}", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(DATA)}"


def test_if_range_with_a_stale_etag_sends_the_whole_file(stored: Any) -> None:
    """A resumed download of *other* content must start over, not splice."""
    r = stored.get(
        f"/v1/artifacts/{PATH}", headers={"Range": "bytes=500-", "If-Range": '"' + "0" * 64 + '"'}
    )
    assert r.status_code == 200 and r.content == DATA
    r = stored.get(f"/v1/artifacts/{PATH}", headers={"Range": "bytes=500-", "If-Range": f'"{SHA}"'})
    assert r.status_code == 206 and r.content == DATA[500:]


def test_hash_mismatch_stores_nothing(api: Any, tmp_path: Path) -> None:
    r = upload(api, PATH, DATA, sha256="0" * 64)
    assert r.status_code == 422
    assert r.json()["detail"]["reason"] == "digest_mismatch"
    assert api.get(f"/v1/artifacts/{PATH}").status_code == 404
    assert _visible_files(tmp_path / "cp" / "artifacts") == []


def test_missing_or_malformed_digest_header_is_refused(api: Any) -> None:
    assert api.put(f"/v1/artifacts/{PATH}", content=DATA).status_code == 422
    r = api.put(f"/v1/artifacts/{PATH}", content=DATA, headers={"X-Content-SHA256": "abc"})
    assert r.status_code == 422


def test_too_large_is_413_and_leaves_nothing(api: Any, tmp_path: Path) -> None:
    big = blob("big", 64 * 1024 + 1)
    assert upload(api, PATH, big).status_code == 413
    # Streamed without a Content-Length: the cap still holds mid-body.
    r = api.put(
        f"/v1/artifacts/{PATH}",
        content=iter([big[:40_000], big[40_000:]]),
        headers={"X-Content-SHA256": hashlib.sha256(big).hexdigest()},
    )
    assert r.status_code == 413
    assert _visible_files(tmp_path / "cp" / "artifacts") == []


def test_same_blob_again_is_idempotent_different_blob_conflicts(stored: Any) -> None:
    r = upload(stored, PATH, DATA)
    assert r.status_code == 200 and r.json()["sha256"] == SHA
    other = blob("other", 1000)
    r = upload(stored, PATH, other)
    assert r.status_code == 409
    assert stored.get(f"/v1/artifacts/{PATH}").content == DATA


def test_blob_left_by_a_crash_before_recording_is_not_served_until_recorded(
    api: Any, tmp_path: Path
) -> None:
    """A blob on disk whose path is not in the index (crash between the two) is not
    served at that path; the identical upload records it, a different one then conflicts."""
    blobs = tmp_path / "cp" / "artifacts" / "blobs" / "sha256"
    (blobs / SHA).write_bytes(DATA)
    assert api.get(f"/v1/artifacts/{PATH}").status_code == 404  # not recorded: not served
    assert upload(api, PATH, DATA).status_code == 201  # newly recorded, hence served
    assert api.get(f"/v1/artifacts/{PATH}").content == DATA
    assert upload(api, PATH, blob("other", 1000)).status_code == 409
    assert sorted(p.name for p in blobs.iterdir()) == [SHA]


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "a/../b", "/abs", "a//b", ".incoming/x", "a/.hidden", "sp ace", "a%2Fb",
     "x" * 600, ""],
)
def test_unsafe_paths_are_refused_by_the_store(path: str) -> None:
    with pytest.raises(BadArtifactPath):
        check_path(path)


# HTTP clients normalise '..' segments away before sending; these reach the server as is.
@pytest.mark.parametrize("path", ["a//b", ".incoming/x", "a/.hidden", "x" * 600, "a/%2E%2E/b"])
def test_unsafe_paths_are_refused_over_http(api: Any, path: str) -> None:
    assert upload(api, path, DATA).status_code == 422
    assert api.get(f"/v1/artifacts/{path}").status_code == 404


def test_unknown_artifact_is_404(api: Any) -> None:
    assert api.get("/v1/artifacts/nope/x.gguf").status_code == 404
    assert api.head("/v1/artifacts/nope/x.gguf").status_code == 404
