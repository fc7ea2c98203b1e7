"""Folder variants: fetched file by file, checked whole, installed as one unit.

Real HTTP (:class:`ArtifactServer` on loopback), the real downloader and a
real model store on disk. What a whole agent does with a folder variant
(serving it, the attack rows, kill -9) is in the tests next to this one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from agent.errors import Cancelled, HashMismatch, Interrupted, SizeMismatch, TooLong
from agent.update.fetcher import HttpFetcher, download_artifact
from agent.update.folder import FolderMismatch, check_folder, download_folder, held_bytes
from agent.update.store import ModelStore, model_key
from protocol import VariantFile, files_digest
from tests.support.http_artifacts import ArtifactServer
from tests.support.updates import folder_files

LIMITS = {"min_bytes_per_s": 1.0, "stall_window_s": 5.0}
RELEASE = {"model.onnx": 200_000, "model.onnx.data": 1_500_000, "genai_config.json": 300,
           "tokenizer/tokenizer.json": 40_000}


def _write_release(root: Path, name: str) -> list[VariantFile]:
    folder = root / name
    for path, size in RELEASE.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(secrets.token_bytes(size))
    return folder_files(folder)


@pytest.fixture()
def served(tmp_path: Path):
    root = tmp_path / "served"
    files = {name: _write_release(root, name) for name in ("r1", "r2")}
    with ArtifactServer(root) as server:
        yield server, files


def _fetch(dest: Path, url: str, files: list[VariantFile], **kwargs: object) -> Path:
    with HttpFetcher() as fetcher:
        def download(*args: object, **kw: object) -> Path:
            return download_artifact(fetcher, *args, **kw)  # type: ignore[arg-type]

        return download_folder(download, url, dest, files, **LIMITS, **kwargs)  # type: ignore[arg-type]


def _manifest(files: list[VariantFile]) -> dict[str, object]:
    return {"sha256": files_digest(files), "size": sum(f.size_bytes for f in files),
            "name": "m", "version": "1.0.0", "tier": "micro", "format": "onnx",
            "files": [f.model_dump() for f in files]}


def test_a_folder_downloads_file_by_file_with_progress_over_the_whole(served, tmp_path) -> None:
    server, files = served
    # A file on the server that the list does not name is never fetched.
    (server.directory / "r1" / "extra.bin").write_bytes(b"not listed")
    seen: list[tuple[int, int]] = []
    dest = _fetch(tmp_path / "partial", server.url("r1"), files["r1"],
                  progress=lambda done, total: seen.append((done, total)))
    check_folder(dest, files["r1"], hashes=True)
    assert sorted(f.path for f in files["r1"]) == sorted(RELEASE)
    total = sum(RELEASE.values())
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "progress never goes back"
    assert {t for _, t in seen} == {total}
    assert server.requests("r1/extra.bin") == []
    assert held_bytes(dest) == total


def test_pace_sees_every_byte_and_can_hold_or_stop_the_download(served, tmp_path) -> None:
    server, files = served
    paced: list[int] = []
    _fetch(tmp_path / "a", server.url("r1"), files["r1"], pace=paced.append)
    assert sum(paced) == sum(RELEASE.values()) and len(paced) > len(RELEASE)

    def stop_after_1mb(n: int) -> None:
        paced.append(n)
        if sum(paced) > 1 << 20:
            raise Cancelled("paused: metered link")

    paced.clear()
    with pytest.raises(Cancelled, match="metered"):
        _fetch(tmp_path / "b", server.url("r1"), files["r1"], pace=stop_after_1mb)
    # What arrived before the stop is kept, to resume from.
    assert 1 << 20 < held_bytes(tmp_path / "b") < sum(RELEASE.values())


def test_a_cut_mid_file_resumes_that_file_and_skips_the_ones_done(served, tmp_path) -> None:
    server, files = served
    server.set_fault("r1/model.onnx.data", cut_after=700_000, times=1)
    dest, done = tmp_path / "partial", set()
    with pytest.raises(Interrupted):
        _fetch(dest, server.url("r1"), files["r1"], verified=done)
    assert "genai_config.json" in done or "model.onnx" in done
    before = {r.path for r in server.requests()}
    _fetch(dest, server.url("r1"), files["r1"], verified=done)
    check_folder(dest, files["r1"], hashes=True)
    retry = server.requests("r1/model.onnx.data")
    assert retry[-1].range == "bytes=700000-", retry
    after = [r.path for r in server.requests() if r.path in before]
    assert after.count("r1/model.onnx") == 1, "a file verified earlier is not fetched again"


@pytest.mark.parametrize(("fault", "error"), [
    ({"flip_at": 10}, HashMismatch),
    ({"extra_bytes": 10}, TooLong),
    ({"cut_after": 100, "status": None}, Interrupted),
])
def test_bad_bytes_for_one_file_fail_it(served, tmp_path, fault, error) -> None:
    server, files = served
    server.set_fault("r1/model.onnx", **fault)
    with pytest.raises(error):
        _fetch(tmp_path / "partial", server.url("r1"), files["r1"])


def test_a_redirect_changes_where_bytes_come_from_never_where_they_go(served, tmp_path) -> None:
    server, files = served
    # Another release's file of the same name, by a path with a "..".
    server.set_fault("r1/genai_config.json", redirect_to="/r1/../r2/genai_config.json")
    dest = tmp_path / "deep" / "partial"
    dest.parent.mkdir()
    with pytest.raises(HashMismatch):
        _fetch(dest, server.url("r1"), files["r1"])
    assert server.requests("r2/genai_config.json"), "the redirect was followed"
    server.clear_faults()
    # A symlink on the server side serves the other release's bytes: refused the same.
    link = server.directory / "r1" / "tokenizer" / "tokenizer.json"
    link.unlink()
    link.symlink_to(server.directory / "r2" / "tokenizer" / "tokenizer.json")
    with pytest.raises(HashMismatch):
        _fetch(dest, server.url("r1"), files["r1"])
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
               if not p.is_relative_to(server.directory)}
    allowed = {"deep", "deep/partial", *(f"deep/partial/{p}" for p in RELEASE),
               "deep/partial/tokenizer"}
    assert written <= allowed, written - allowed


def test_a_listed_size_that_lies_is_refused(served, tmp_path) -> None:
    server, files = served
    short = [f.model_copy(update={"size_bytes": f.size_bytes - 1})
             if f.path == "genai_config.json" else f for f in files["r1"]]
    with pytest.raises(TooLong):
        _fetch(tmp_path / "a", server.url("r1"), short)
    long = [f.model_copy(update={"size_bytes": f.size_bytes + 1})
            if f.path == "genai_config.json" else f for f in files["r1"]]
    with pytest.raises(SizeMismatch):
        _fetch(tmp_path / "b", server.url("r1"), long)


def test_what_is_planted_in_the_partial_folder_is_removed_not_followed(served, tmp_path) -> None:
    server, files = served
    dest, outside = tmp_path / "partial", tmp_path / "outside.bin"
    dest.mkdir()
    outside.write_bytes(b"")
    (dest / "model.onnx").symlink_to(outside)
    (dest / "genai_config.json" / "inner").mkdir(parents=True)  # a folder where a file goes
    (dest / "tokenizer").symlink_to(tmp_path)  # a link where a folder goes
    _fetch(dest, server.url("r1"), files["r1"])  # strays are removed first
    assert outside.read_bytes() == b""
    check_folder(dest, files["r1"], hashes=True)


def _installed(tmp_path: Path, served_dir: Path, files: list[VariantFile]) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    key = model_key("m", "1.0.0", "micro")
    partial = store.staging_path(key)
    _copy_tree(served_dir, partial)
    store.install(key, partial, _manifest(files))
    store.activate(key)
    return store


def _copy_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())


def test_an_installed_folder_is_one_read_only_unit_that_verifies(served, tmp_path) -> None:
    server, files = served
    store = _installed(tmp_path, server.directory / "r1", files["r1"])
    active = store.active()
    assert active is not None and active.artifact.is_dir()
    assert store.verify_hash(active.key)
    assert all(not os.access(active.artifact / f.path, os.W_OK) or os.geteuid() == 0
               for f in files["r1"])
    assert {f.path for f in files["r1"]} == {
        p.relative_to(active.artifact).as_posix() for p in active.artifact.rglob("*")
        if p.is_file()}
    assert store.staging_path(active.key).exists() is False
    # Installing the same folder again is a no-op that consumes the new copy.
    again = store.staging_path(active.key)
    _copy_tree(server.directory / "r1", again)
    assert store.install(active.key, again, _manifest(files["r1"])) == active.dir
    assert not again.exists() and store.verify_hash(active.key)


TAMPERS = {
    "a file added": lambda d: (d / "extra.json").write_text("{}"),
    "a file dropped": lambda d: (d / "genai_config.json").unlink(),
    "a file renamed": lambda d: (d / "genai_config.json").rename(d / "genai-config.json"),
    "a file swapped for a symlink": lambda d: (
        (d / "model.onnx").unlink(), (d / "model.onnx").symlink_to("/etc/hostname")),
    "a byte changed": lambda d: _flip(d / "model.onnx.data"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_an_installed_folder_tampered_with_fails_verification(served, tmp_path, tamper) -> None:
    server, files = served
    store = _installed(tmp_path, server.directory / "r1", files["r1"])
    TAMPERS[tamper](store.active().artifact)
    assert not store.verify_hash(store.active().key)


@pytest.mark.parametrize("tamper", [t for t in TAMPERS if t != "a byte changed"])
def test_install_refuses_a_folder_that_is_not_exactly_its_list(served, tmp_path, tamper) -> None:
    server, files = served
    store = ModelStore(tmp_path / "store")
    key = model_key("m", "1.0.0", "micro")
    partial = store.staging_path(key)
    _copy_tree(server.directory / "r1", partial)
    TAMPERS[tamper](partial)
    with pytest.raises(FolderMismatch):
        store.install(key, partial, _manifest(files["r1"]))
    assert store.installed() == []
