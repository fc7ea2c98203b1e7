"""Agent configuration: one TOML file, typically /etc/slmfleet/agent.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from protocol import check_broker_url, check_device_id, validation_problems

from .profiles import MAX_PARALLEL
from .update.timezone import check_zone

DEFAULT_CONFIG_PATH = Path("/etc/slmfleet/agent.toml")


class SimulatedHardware(BaseModel):
    """SIMULATED hardware: report a recorded device instead of probing this one.

    Only for ``slmfleet dev`` and the fleet simulator, where many agents on one
    machine stand in for different boards. Every hello sent under it carries
    ``simulated: true`` so the control plane never mistakes it for a probe.
    """

    model_config = ConfigDict(extra="forbid")

    preset: str


class AgentConfig(BaseModel):
    """Everything an agent needs to join its fleet."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    broker_url: str = "mqtt://127.0.0.1:1883"
    #: MQTT username; defaults to the device id, which the broker ACL relies on
    username: str | None = None
    password: str | None = None
    #: read the MQTT password from this file instead (kept out of the config)
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    state_dir: Path = Path("/var/lib/slmfleet/agent")
    #: where model versions live; defaults to ``state_dir/models``
    model_dir: Path | None = None
    profiles_dir: Path | None = None
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    reconnect_min_s: Annotated[float, Field(gt=0)] = 1.0
    reconnect_max_s: Annotated[float, Field(gt=0)] = 60.0
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    labels: dict[str, str] = {}
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    simulate: SimulatedHardware | None = None
    #: pinned release key list (SignedKeyList JSON); default ``state_dir/trust/release-keys.json``
    release_keys_file: Path | None = None
    #: pinned director key list; default ``state_dir/trust/director-keys.json``
    director_keys_file: Path | None = None
    #: artifact base URL when an assignment names none (``<base>/<variant.artifact>``)
    artifact_base_url: str | None = None
    #: a download slower than this over a whole stall window is abandoned
    download_min_bytes_per_s: Annotated[float, Field(ge=0)] = 10_000.0
    download_stall_window_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: transport failures are retried (resuming with Range) this many times in all
    download_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    #: first pause between download attempts; doubles each time
    download_retry_s: Annotated[float, Field(ge=0, le=3600)] = 2.0
    #: cap on download throughput (bytes/s); an assignment's own cap applies when lower
    download_max_bytes_per_s: Annotated[int, Field(ge=1024)] | None = None
    #: is the link metered: ``auto`` asks NetworkManager (absent: not metered)
    metered: Literal["auto", "yes", "no"] = "auto"
    #: a file whose first word (yes/no) says whether the link is metered; overrides ``metered``
    metered_file: Path | None = None
    #: the device's IANA time zone, for update windows in ``local`` time;
    #: None: the system's (/etc/localtime)
    timezone: str | None = None
    #: the health-check subprocess is killed after this long
    health_check_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    #: installed versions kept on disk, active and previous included
    keep_versions: Annotated[int, Field(ge=2, le=16)] = 2
    #: update events kept on disk while the broker is unreachable; the oldest go first
    max_spooled_events: Annotated[int, Field(ge=10, le=100_000)] = 1000
    #: serve the local OpenAI-compatible API (and run inference workers)
    api_enabled: bool = True
    #: loopback only: apps on the device, never the network
    api_host: Literal["127.0.0.1", "::1"] = "127.0.0.1"
    #: TCP port of the local API; 0 picks a free one (logged at start)
    api_port: Annotated[int, Field(ge=0, le=65535)] = 11435
    #: also serve the API on this TCP port, Ollama's (11434), for apps configured for
    #: Ollama; None: not; 0 picks a free one (logged at start)
    ollama_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    #: also serve the API on this unix socket (mode 0660)
    api_socket: Path | None = None
    #: largest request body, bytes
    api_max_body_bytes: Annotated[int, Field(ge=1024, le=64 << 20)] = 1 << 20
    #: longest prompt (all messages together), characters
    api_max_prompt_chars: Annotated[int, Field(ge=1, le=16 << 20)] = 64 * 1024
    #: max_tokens when a request names none
    api_default_max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 512
    #: requests waiting for the worker; more are answered 503 with Retry-After
    inference_max_queue: Annotated[int, Field(ge=0, le=10_000)] = 8
    #: a request waiting longer than this for the worker is answered 503
    inference_queue_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    #: a worker that has not loaded its model after this long is killed
    inference_load_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    #: this many worker crashes within inference_crash_window_s make the model unhealthy
    inference_crash_limit: Annotated[int, Field(ge=1, le=1000)] = 3
    inference_crash_window_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    #: generations a model decodes at once; None: the firmware profile's ``runtime.parallel``
    inference_parallel: Annotated[int, Field(ge=1, le=MAX_PARALLEL)] | None = None
    #: models kept loaded at once; loading one more unloads the least recently used
    #: idle one first (0: no cap; RAM still decides)
    max_loaded_models: Annotated[int, Field(ge=0, le=64)] = 0
    #: a model unloads this long after its last request unless the request's
    #: ``keep_alive`` says otherwise; None: it stays loaded until evicted
    inference_keep_alive_s: Annotated[float, Field(ge=0, le=31_536_000)] | None = None

    @field_validator("ollama_port")
    @classmethod
    def _ollama_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        # The same port twice would fail only once the model has loaded, at the second bind.
        if value and value == info.data.get("api_port"):
            raise ValueError("ollama_port must differ from api_port (the Ollama routes are "
                             "served on api_port as well)")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            check_zone(value)
        return value

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return check_device_id(value)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return check_broker_url(value)

    @field_validator("artifact_base_url")
    @classmethod
    def _artifact_base_url(cls, value: str | None) -> str | None:
        if value is not None:
            url = urlsplit(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("artifact_base_url must be an http:// or https:// URL")
        return value

    @property
    def models_path(self) -> Path:
        """Directory holding versioned model directories."""
        return self.model_dir or self.state_dir / "models"

    @property
    def release_keys_path(self) -> Path:
        """The pinned release key list."""
        return self.release_keys_file or self.state_dir / "trust" / "release-keys.json"

    @property
    def director_keys_path(self) -> Path:
        """The pinned director key list."""
        return self.director_keys_file or self.state_dir / "trust" / "director-keys.json"

    @property
    def update_state_path(self) -> Path:
        """The update pipeline's persisted record."""
        return self.state_dir / "update" / "state.json"

    @property
    def update_locks_path(self) -> Path:
        """The update locks apps hold, persisted for their lease."""
        return self.state_dir / "update" / "locks.json"

    @property
    def event_spool_path(self) -> Path:
        """Directory of update events not yet delivered to the broker."""
        return self.state_dir / "events"

    @property
    def mqtt_username(self) -> str:
        return self.username or self.device_id

    def mqtt_password(self) -> str | None:
        """The MQTT password, read from ``password_file`` when one is set."""
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password


def load_config(path: Path) -> AgentConfig:
    """Read and validate an agent TOML config; errors name the file and field."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"agent config {path} not found (pass --config PATH)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"agent config {path} is not valid TOML: {exc}") from exc
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, root="(root)")
        raise ValueError(f"agent config {path}: {problems}") from exc
