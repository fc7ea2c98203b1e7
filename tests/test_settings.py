"""Control-plane settings: defaults, the TOML file, SLMFLEET_* overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.config import (
    DEFAULT_DATA_DIR,
    ControlPlaneSettings,
    SettingsError,
    load_settings,
)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controlplane.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    s = load_settings(None, environ={})
    assert s.data_dir == DEFAULT_DATA_DIR
    assert s.database_url == f"sqlite:///{DEFAULT_DATA_DIR / 'controlplane.db'}"
    assert (s.mqtt_host, s.mqtt_port) == ("127.0.0.1", 1883)
    assert s.mqtt_username == CONTROL_PLANE_USER
    assert s.mqtt_password is None
    assert s.mqtt_client_id is None and s.mqtt_shared_group is None
    assert (s.api_host, s.api_port) == ("127.0.0.1", 8080)
    assert s.page_max == 500
    assert s.offline_after_s == s.heartbeat_interval_s * s.offline_after_missed == 90.0


def test_unrelated_environment_is_ignored() -> None:
    env = {"SLMFLEET_CACHE": "/tmp/x", "SLMFLEET_AGENT_CONFIG": "a.toml", "API_PORT": "1"}
    assert load_settings(None, environ=env) == load_settings(None, environ={})


def test_toml_file_sets_values_and_database_follows_data_dir(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        f"""
        data_dir = "{tmp_path / "data"}"
        mqtt_url = "mqtt://broker.example:1884"
        mqtt_password = "s3cret"
        api_port = 9000
        heartbeat_interval_s = 5
        offline_after_missed = 4
        page_max = 50
        """,
    )
    s = load_settings(path, environ={})
    assert s.data_dir == tmp_path / "data"
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'controlplane.db'}"
    assert (s.mqtt_host, s.mqtt_port) == ("broker.example", 1884)
    assert s.api_port == 9000
    assert s.offline_after_s == 20.0
    assert s.page_max == 50
    assert s.mqtt_password is not None and s.mqtt_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        api_port = 9000
        data_dir = "/srv/from-file"
        mqtt_client_id = "cp-file"
        database_url = "sqlite:////srv/explicit.db"
        """,
    )
    env = {
        "SLMFLEET_API_PORT": "0",
        "SLMFLEET_MQTT_CLIENT_ID": "",  # empty clears an optional field
        "SLMFLEET_DATA_DIR": str(tmp_path / "env"),
        "SLMFLEET_HEARTBEAT_INTERVAL_S": "2.5",
    }
    s = load_settings(path, environ=env)
    assert s.api_port == 0
    assert s.mqtt_client_id is None
    assert s.data_dir == tmp_path / "env"
    # an explicit database_url from the file is kept, not derived from data_dir
    assert s.database_url == "sqlite:////srv/explicit.db"
    assert s.heartbeat_interval_s == 2.5


def test_environment_data_dir_moves_the_default_database(tmp_path: Path) -> None:
    s = load_settings(None, environ={"SLMFLEET_DATA_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'controlplane.db'}"


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("api_port = 70000", {}, "controlplane.toml: api_port: Input should be less than or"),
        ("", {"SLMFLEET_API_PORT": "abc"}, "SLMFLEET_API_PORT: Input should be a valid integer"),
        ("heartbeat_interval_s = 0", {}, "heartbeat_interval_s: Input should be greater than 0"),
        ("page_max = 0", {}, "page_max: Input should be greater than or equal to 1"),
        ('mqtt_url = "ws://h:8883"', {}, "mqtt_url: Value error, must look like mqtt://"),
        ('mqtt_url = "mqtt://h:port"', {}, "mqtt_url: Value error, bad port"),
        ('mqtt_shared_group = "a/b"', {}, "mqtt_shared_group: String should match pattern"),
        ("api_prot = 8080", {}, "controlplane.toml: api_prot: unknown key"),
        ("", {"SLMFLEET_OFFLINE_AFTER_MISSED": "-1"}, "SLMFLEET_OFFLINE_AFTER_MISSED: Input"),
        ("mqtt_session_expiry_s = 60", {}, "mqtt_session_expiry_s needs a fixed mqtt_client_id"),
    ],
)
def test_invalid_values_name_the_key_and_its_source(
    tmp_path: Path, toml: str, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(_toml(tmp_path, toml), environ=env)
    message = str(info.value)
    assert message.startswith("invalid control-plane settings:")
    assert expected in message


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'api_port = -1\nmqtt_url = "http://x"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, environ={"SLMFLEET_PAGE_MAX": "0"})
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 3
    assert any(line.strip().startswith(f"{path}: api_port:") for line in lines)
    assert any(line.strip().startswith(f"{path}: mqtt_url:") for line in lines)
    assert any(line.strip().startswith("SLMFLEET_PAGE_MAX:") for line in lines)


def test_missing_or_broken_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(SettingsError, match="is not valid TOML"):
        load_settings(_toml(tmp_path, "api_port = = 1"), environ={})


def test_direct_construction_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra_field"):
        ControlPlaneSettings(extra_field=1)  # type: ignore[call-arg]
