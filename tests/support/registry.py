"""Helpers for registry and director tests: key files from a TrustSimulator, releases
whose artifacts are real (tiny) blobs in the control plane's store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from controlplane.keyfiles import save_key
from protocol import Tier, canonical_json, sign_key_list
from tests.support import database
from tests.support.auth import admin_client
from tests.support.signer import TrustSimulator, make_variant


@dataclass(frozen=True)
class TrustFiles:
    """Where a simulator's keys were written, as control-plane settings."""

    release_keys_file: Path
    director_keys_file: Path
    director_key_files: list[Path]

    def settings(self) -> dict[str, Any]:
        """Keyword arguments for :class:`ControlPlaneSettings`."""
        return {
            "release_keys_file": self.release_keys_file,
            "director_keys_file": self.director_keys_file,
            "director_key_files": self.director_key_files,
        }


def write_trust(directory: Path, sim: TrustSimulator) -> TrustFiles:
    """Write ``sim``'s pinned key lists and director private keys under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    release = directory / "release-keys.json"
    director = directory / "director-keys.json"
    release.write_bytes(
        canonical_json(
            sign_key_list(sim.release_keys, sim.release_signers[: sim.release_keys.threshold])
        )
    )
    director.write_bytes(
        canonical_json(
            sign_key_list(sim.director_keys, sim.director_signers[: sim.director_keys.threshold])
        )
    )
    key_files = [save_key(directory / "director", "director", k)[0] for k in sim.director_signers]
    return TrustFiles(release, director, key_files)


def blob(label: str, size: int = 4096) -> bytes:
    """Deterministic test bytes standing in for a model file."""
    seed = hashlib.sha256(label.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def upload(client: httpx.Client | Any, path: str, data: bytes, sha256: str | None = None) -> Any:
    """PUT ``data`` to the artifact store (``client`` has the API as its base URL)."""
    return client.put(
        f"/v1/artifacts/{path}",
        content=data,
        headers={"X-Content-SHA256": sha256 or hashlib.sha256(data).hexdigest()},
    )


def release_with_blobs(
    sim: TrustSimulator,
    name: str,
    version: str,
    blobs: dict[Tier, bytes],
    **overrides: Any,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A signed release whose variants describe ``blobs``; returns it and path -> bytes."""
    variants = {}
    files = {}
    for tier, data in blobs.items():
        path = f"{name}/{version}/{tier.value}/model.gguf"
        files[path] = data
        variants[tier] = make_variant(
            tier,
            name=name,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            artifact=path,
        )
    return sim.release(name, version, variants=variants, **overrides), files


def publish(
    client: httpx.Client | Any,
    sim: TrustSimulator,
    name: str = "smollm2",
    version: str = "1.0.0",
    tiers: tuple[Tier, ...] = (Tier.MICRO,),
) -> dict[str, Any]:
    """Upload blobs for ``tiers`` and register a release of them; return the release envelope."""
    envelope, files = release_with_blobs(
        sim, name, version, {t: blob(f"{name}{version}{t.value}") for t in tiers}
    )
    for path, data in files.items():
        assert upload(client, path, data).status_code in (200, 201)
    response = client.post("/v1/models", content=canonical_json(envelope))
    assert response.status_code in (200, 201), response.text
    return envelope


def registry_api(
    tmp_path: Path, sim: TrustSimulator | None = None, **settings: Any
) -> tuple[Any, Any]:
    """The API app over a fresh registry (SQLite, or PostgreSQL when the test module
    runs on it: tests/support/database.py) and artifact store, without a broker.

    With ``sim``, the registry trusts its release keys. Returns ``(FastAPI
    app, engine)``; dispose of the engine when done.
    """
    from controlplane.api import create_app
    from controlplane.artifacts import ArtifactStore
    from controlplane.config import ControlPlaneSettings
    from controlplane.context import AppContext
    from controlplane.db import make_engine, session_factory, upgrade_to_head
    from controlplane.ingest import MqttIngest
    from controlplane.trust import load_trust

    trust_settings = write_trust(tmp_path / "keys", sim).settings() if sim else {}
    trust_settings.pop("director_keys_file", None)
    trust_settings.pop("director_key_files", None)
    cfg = ControlPlaneSettings(data_dir=tmp_path / "cp", **trust_settings,
                               **database.settings(settings), **settings)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg.database_url)
    upgrade_to_head(engine)
    context = AppContext(
        cfg,
        engine,
        session_factory(engine),
        MqttIngest(cfg),
        trust=load_trust(cfg),
        artifacts=ArtifactStore(cfg.artifacts_dir, cfg.artifact_max_bytes).open(),
    )
    return create_app(context), engine


def registry_app(
    tmp_path: Path, sim: TrustSimulator | None = None, **settings: Any
) -> tuple[Any, Any]:
    """:func:`registry_api` behind a TestClient that sends an admin token with every
    request. Returns ``(TestClient, engine)``; dispose of the engine when done."""
    app, engine = registry_api(tmp_path, sim, **settings)
    return admin_client(app), engine
