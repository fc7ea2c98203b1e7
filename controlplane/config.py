"""Control-plane settings: a typed model, read from TOML with ``SLMFLEET_*`` overrides.

Precedence, lowest first: field defaults, the TOML file, then environment
variables named ``SLMFLEET_<FIELD>`` (e.g. ``SLMFLEET_API_PORT=0``). Every
error names the key and where it came from, so a typo in a config file or a
unit's ``Environment=`` line is found at start-up, not at the first message.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from controlplane.broker_auth import CONTROL_PLANE_USER
from protocol import MAX_ARTIFACT_BYTES, check_broker_url

ENV_PREFIX = "SLMFLEET_"
#: placeholders refused as secrets outside ``slmfleet dev`` (compared lower-cased)
DEFAULT_SECRETS = frozenset(
    {"", "changethis", "changeme", "change-me", "password", "secret", "admin", "slmfleet", "token"}
)
#: shortest acceptable configured admin token
MIN_TOKEN_LEN = 32
DEFAULT_DATA_DIR = Path("/var/lib/slmfleet/controlplane")

#: a shared-subscription group name may not contain MQTT level separators or wildcards
SharedGroup = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
#: what agents prepend to ``/v1/artifacts``: the assignment's own URL rule, no trailing slash
PublicUrl = Annotated[
    str, StringConstraints(max_length=480, pattern=r"^https?://[!-~]+[^/]$")
]


class SettingsError(ValueError):
    """The configuration is invalid; the message names each bad key and its source."""


class ControlPlaneSettings(BaseModel):
    """Everything the control plane needs to start. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    data_dir: Path = DEFAULT_DATA_DIR
    #: defaults to an SQLite file inside ``data_dir``
    database_url: str
    #: ``mqtt://host:1883``, or ``mqtts://host:8883`` for TLS
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    #: CA bundle that signed the broker's certificate (mqtts); default: the system's
    mqtt_tls_ca_file: Path | None = None
    mqtt_username: str = CONTROL_PLANE_USER
    mqtt_password: SecretStr | None = None
    #: fixed MQTT client id; default: a random one per start. Needed for a
    #: persistent session, and must differ between replicas.
    mqtt_client_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    #: with a fixed client id, keep the broker session (and the QoS 1 messages
    #: queued in it) this long across a control-plane restart; 0 = clean start
    mqtt_session_expiry_s: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    #: MQTT v5 shared-subscription group; set it when several replicas split the ingest
    mqtt_shared_group: SharedGroup | None = None
    api_host: str = "127.0.0.1"
    #: serve the API over HTTPS with this certificate (PEM, chain included) ...
    api_tls_cert_file: Path | None = None
    #: ... and this private key (PEM)
    api_tls_key_file: Path | None = None
    #: 0 picks a free port at start-up
    api_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    #: the agents' telemetry interval
    heartbeat_interval_s: PositiveFloat = 30.0
    #: a device silent for this many heartbeats is marked offline
    offline_after_missed: PositiveInt = 3
    liveness_check_interval_s: PositiveFloat = 10.0
    #: how often the rollout engine evaluates live rollouts
    rollout_tick_s: PositiveFloat = 5.0
    #: replicas elect the one that runs the rollout engine and re-signing with a
    #: lease of this length in the database; a dead leader is replaced within it
    leader_lease_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 15.0
    ingest_batch_max: Annotated[int, Field(ge=1, le=100_000)] = 500
    ingest_flush_ms: PositiveFloat = 50.0
    #: bound on decoded messages waiting for the writer; a full queue blocks the
    #: MQTT thread, which stops acking QoS 1 and so pushes back on the broker
    ingest_queue_max: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    #: a heartbeat whose ``ts`` is further than this from its arrival is refused
    #: (``slmfleet_ingest_rejected{reason="clock_skew"}``): raw telemetry is kept
    #: by its ``ts``, in day partitions on PostgreSQL
    ingest_max_clock_skew_s: Annotated[float, Field(ge=60.0)] = 86_400.0

    # -- retention (docs/running.md) ---------------------------------------------
    #: raw heartbeats are kept this many days (by their ``ts``); the hourly
    #: rollups made from them before they go are kept ``telemetry_rollup_days``
    telemetry_raw_days: Annotated[int, Field(ge=1, le=3650)] = 7
    telemetry_rollup_days: Annotated[int, Field(ge=1, le=36500)] = 90
    #: update events (``device_events``) are kept this many days
    events_days: Annotated[int, Field(ge=1, le=36500)] = 90
    #: assignment history (entries no longer active) and superseded capability
    #: reports are kept this many days; a device's newest report always stays
    history_days: Annotated[int, Field(ge=1, le=36500)] = 365
    #: the period an audit-log entry must stay explainable: events and history
    #: are never kept for less (the audit log itself is never pruned)
    audit_window_days: Annotated[int, Field(ge=1, le=36500)] = 30
    #: how often retention runs (rollups, pruning, partitions ahead)
    retention_interval_s: Annotated[float, Field(ge=1.0)] = 300.0
    #: rows one delete statement removes; each batch is its own short transaction
    retention_batch_rows: Annotated[int, Field(ge=10, le=1_000_000)] = 5_000
    #: PostgreSQL: day partitions of telemetry created this many days ahead
    telemetry_partitions_ahead_days: Annotated[int, Field(ge=1, le=60)] = 3
    #: hard cap on list page sizes
    page_max: Annotated[int, Field(ge=1, le=100_000)] = 500

    # -- access control (docs/security.md) ------------------------------------
    #: ``slmfleet dev`` only: lets well-known placeholder secrets through
    dev_mode: bool = False
    #: the first admin token, for automated installs; used only when the
    #: database holds no token yet. Unset: a random one is logged once
    bootstrap_token: SecretStr | None = None

    # -- device enrollment: the control plane owns the broker's auth files -----
    #: mosquitto ``password_file`` the control plane rewrites on each enrollment;
    #: None: enrollment is off (the broker's users are managed by hand)
    mosquitto_passwd_file: Path | None = None
    #: mosquitto ``acl_file``, rewritten beside the password file
    mosquitto_acl_file: Path | None = None
    #: mosquitto ``pid_file``: the broker is sent SIGHUP to re-read both
    mosquitto_pid_file: Path | None = None

    # -- model registry and director (docs/models.md) -------------------------
    #: the pinned release key list (``slmfleet keys list --role release``); the
    #: registry refuses manifests not signed by its threshold. None: registry off
    release_keys_file: Path | None = None
    #: the director key list the agents pin (``slmfleet keys list --role director``)
    director_keys_file: Path | None = None
    #: the director's private key file(s), at least the director list's threshold
    #: of them; from the environment, comma-separated
    director_key_files: list[Path] = []
    #: base URL agents reach this API at; artifacts are fetched from
    #: ``<public_url>/v1/artifacts/...``. Default: the API's own address
    public_url: PublicUrl | None = None
    #: where uploaded artifacts live; default ``<data_dir>/artifacts``
    artifacts_dir: Path
    #: largest artifact an upload may carry
    artifact_max_bytes: Annotated[int, Field(ge=1, le=MAX_ARTIFACT_BYTES)] = 64 << 30
    #: how long a signed assignment stays valid
    assignment_ttl_s: Annotated[float, Field(ge=60)] = 86_400.0
    #: re-sign a live assignment once less than this is left; default ttl/2
    resign_margin_s: PositiveFloat | None = None
    #: how often the re-sign job looks for assignments to refresh; default
    #: margin/4, at most 300 s
    resign_interval_s: PositiveFloat | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_paths(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data_dir = Path(data.get("data_dir") or DEFAULT_DATA_DIR)
            if not data.get("database_url"):
                data = {**data, "database_url": f"sqlite:///{data_dir / 'controlplane.db'}"}
            if not data.get("artifacts_dir"):
                data = {**data, "artifacts_dir": data_dir / "artifacts"}
        return data

    @field_validator("director_key_files", mode="before")
    @classmethod
    def _split_key_files(cls, value: Any) -> Any:
        # One environment variable carries the whole list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _director_complete(self) -> ControlPlaneSettings:
        # Half a director configuration is a typo, not a choice: say which half.
        if self.director_key_files and self.director_keys_file is None:
            raise ValueError("director_key_files needs director_keys_file (the pinned list)")
        if self.director_keys_file is not None and not self.director_key_files:
            raise ValueError(
                "director_keys_file needs director_key_files (the private director keys; "
                "create one with `slmfleet keys generate --role director`)"
            )
        if self.director_keys_file is not None and self.release_keys_file is None:
            raise ValueError("the director needs release_keys_file to check what it assigns")
        return self

    @model_validator(mode="after")
    def _resign_window(self) -> ControlPlaneSettings:
        # An interval at least as long as the margin could let an assignment
        # expire between two runs of the re-sign job.
        if self.resign_margin >= self.assignment_ttl_s:
            raise ValueError("resign_margin_s must be below assignment_ttl_s")
        if self.resign_interval >= self.resign_margin:
            raise ValueError("resign_interval_s must be below resign_margin_s")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> ControlPlaneSettings:
        _both_or_neither(self, "api_tls_cert_file", "api_tls_key_file")
        if self.mqtt_tls_ca_file is not None and not self.mqtt_tls:
            raise ValueError("mqtt_tls_ca_file needs an mqtts:// mqtt_url")
        return self

    @model_validator(mode="after")
    def _enrollment_complete(self) -> ControlPlaneSettings:
        _both_or_neither(self, "mosquitto_passwd_file", "mosquitto_acl_file")
        if self.mosquitto_passwd_file is not None and self.mqtt_password is None:
            raise ValueError(
                "mosquitto_passwd_file needs mqtt_password: the control plane writes its own "
                "user into the file it manages"
            )
        return self

    @model_validator(mode="after")
    def _no_default_secrets(self) -> ControlPlaneSettings:
        # Placeholder secrets copied from an example config are the classic
        # way a production install ends up with a guessable credential.
        if self.dev_mode:
            return self
        for name in ("mqtt_password", "bootstrap_token"):
            secret: SecretStr | None = getattr(self, name)
            if secret is not None and secret.get_secret_value().lower() in DEFAULT_SECRETS:
                raise ValueError(f"{name} is a well-known placeholder; set a random secret")
        token = self.bootstrap_token
        if token is not None and not MIN_TOKEN_LEN <= len(token.get_secret_value()) <= 256:
            raise ValueError(
                f"bootstrap_token must be {MIN_TOKEN_LEN} to 256 characters "
                "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return self

    @model_validator(mode="after")
    def _session_needs_client_id(self) -> ControlPlaneSettings:
        if self.mqtt_session_expiry_s and not self.mqtt_client_id:
            raise ValueError("mqtt_session_expiry_s needs a fixed mqtt_client_id")
        return self

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        return check_broker_url(value)

    @property
    def mqtt_host(self) -> str:
        """Broker host name from ``mqtt_url``."""
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_tls(self) -> bool:
        """Whether the broker is reached over TLS (``mqtts://``)."""
        return urlsplit(self.mqtt_url).scheme == "mqtts"

    @property
    def mqtt_port(self) -> int:
        """Broker port from ``mqtt_url`` (1883, or 8883 for mqtts, when absent)."""
        return urlsplit(self.mqtt_url).port or (8883 if self.mqtt_tls else 1883)

    @property
    def api_tls(self) -> bool:
        """Whether the API is served over HTTPS."""
        return self.api_tls_cert_file is not None

    def mqtt_tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the broker connection (None for plain ``mqtt://``).

        Verifies the broker's certificate and host name against
        ``mqtt_tls_ca_file`` (or the system store); raises :class:`OSError` or
        :class:`ssl.SSLError` when the CA file cannot be read.
        """
        if not self.mqtt_tls:
            return None
        cafile = str(self.mqtt_tls_ca_file) if self.mqtt_tls_ca_file else None
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)

    @property
    def resign_margin(self) -> float:
        """Re-sign an assignment once less than this many seconds of validity remain."""
        return self.resign_margin_s or self.assignment_ttl_s / 2

    @property
    def resign_interval(self) -> float:
        """Seconds between two runs of the re-sign job."""
        return self.resign_interval_s or min(300.0, self.resign_margin / 4)

    @model_validator(mode="after")
    def _rollups_outlive_raw(self) -> ControlPlaneSettings:
        if self.telemetry_rollup_days < self.telemetry_raw_days:
            raise ValueError("telemetry_rollup_days must be at least telemetry_raw_days")
        for name in ("events_days", "history_days"):
            if getattr(self, name) < self.audit_window_days:
                raise ValueError(f"{name} must be at least audit_window_days "
                                 f"({self.audit_window_days}): what the audit window covers "
                                 "is never pruned")
        return self

    @property
    def offline_after_s(self) -> float:
        """Silence after which a device counts as offline."""
        return self.heartbeat_interval_s * self.offline_after_missed


def _both_or_neither(settings: BaseModel, first: str, second: str) -> None:
    """Refuse half of a pair of settings that only work together."""
    if (getattr(settings, first) is None) != (getattr(settings, second) is None):
        raise ValueError(f"{first} and {second} go together")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, str | None]:
    """``SLMFLEET_<FIELD>`` values for known fields.

    Other ``SLMFLEET_*`` variables belong to other components (the agent, the
    test cache) and are ignored. An empty value clears an optional field.
    """
    fields = ControlPlaneSettings.model_fields
    out: dict[str, str | None] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in fields:
            out[key] = None if value == "" and not fields[key].is_required() else value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] = os.environ
) -> ControlPlaneSettings:
    """Build settings from the TOML file at ``path`` (optional) and ``environ``.

    Raises :class:`SettingsError` naming each bad key and its source.
    """
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if path is not None:
        for key, value in _read_toml(path).items():
            values[key] = value
            source[key] = f"{path}: {key}"
    for key, value in _env_overrides(environ).items():
        values[key] = value
        source[key] = f"{ENV_PREFIX}{key.upper()}"
    try:
        return ControlPlaneSettings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            key = str(err["loc"][0]) if err["loc"] else ""
            where = source.get(key, key or "settings")
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        raise SettingsError("invalid control-plane settings:\n  " + "\n  ".join(problems)) from exc
