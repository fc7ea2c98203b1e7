"""The admin CLI against a real control plane: login, tokens, devices, models,
``--output json`` for scripts, and errors that name the fix."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import protocol as p
from controlplane.service import ControlPlane
from slmfleet.app import build_app
from tests.support.auth import ADMIN_TOKEN
from tests.support.controlplane import cp_settings, hello, wait_until
from tests.support.mqtt import RawClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(
    broker: Any, cp_credentials: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    plane = ControlPlane(
        cp_settings(tmp_path_factory.mktemp("cli") / "cp", broker, cp_credentials)
    ).start()
    yield plane.api_url
    plane.stop()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``slmfleet`` in-process with its own config dir and no token in the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("SLMFLEET_TOKEN", raising=False)
    monkeypatch.delenv("SLMFLEET_SERVER", raising=False)
    runner = CliRunner()

    def run(*args: str, code: int = 0, stdin: str | None = None) -> str:
        result = runner.invoke(build_app(args[0]), list(args), input=stdin)
        assert result.exit_code == code, result.output
        return result.output

    return run


def test_login_saves_server_and_token_0600_and_later_commands_use_them(
    cli: Any, server: str, tmp_path: Path
) -> None:
    out = cli("login", "--server", server, stdin=f"{ADMIN_TOKEN}\n")
    assert "as bootstrap (admin)" in out
    saved = tmp_path / "config" / "slmfleet" / "cli.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {"server": server, "token": ADMIN_TOKEN}
    # no --server, no --token: the login file answers
    tokens = json.loads(cli("tokens", "list", "--output", "json"))
    assert "bootstrap" in {t["name"] for t in tokens}


def test_login_with_a_wrong_token_saves_nothing_and_says_what_to_do(
    cli: Any, server: str, tmp_path: Path
) -> None:
    out = cli("login", "--server", server, "--token", "slmf_wrong", code=1)
    assert "401" in out and "slmfleet login" in out
    assert not (tmp_path / "config" / "slmfleet" / "cli.json").exists()


def test_tokens_create_list_revoke(cli: Any, server: str) -> None:
    common = ("--server", server, "--token", ADMIN_TOKEN)
    made = json.loads(cli("tokens", "create", "--name", "ci", "--role", "viewer",
                          "--expires", "12h", *common, "-o", "json"))
    assert made["role"] == "viewer" and made["token"].startswith("slmf_")
    listed = json.loads(cli("tokens", "list", *common, "-o", "json"))
    assert made["id"] in {t["id"] for t in listed}
    table = cli("tokens", "list", *common)
    assert "ci" in table and made["token"] not in table
    # the viewer token reads but may not manage tokens; the error names the fix
    denied = cli("tokens", "list", "--server", server, "--token", made["token"], code=1)
    assert "403" in denied and "admin" in denied
    cli("tokens", "revoke", made["id"], *common)
    refused = cli("devices", "list", "--server", server, "--token", made["token"], code=1)
    assert "401" in refused
    assert "use a number and a unit" in cli(
        "tokens", "create", "--name", "x", "--role", "viewer", "--expires", "soon", *common,
        code=2,
    )


def test_devices_list_and_show_as_json_and_tables(
    cli: Any, server: str, broker: Any, new_device: Any
) -> None:
    password = new_device("cli-dev-1")
    site = f"lab-{secrets.token_hex(3)}"
    client = RawClient(broker.url, "cli-dev-1", password)
    assert not client.connect().is_failure
    try:
        # A label of its own: the session's broker still holds other tests' hellos.
        msg = hello("cli-dev-1", labels={"site": site})
        rc = client.publish(p.device_topic("cli-dev-1", p.TopicKind.HELLO), p.encode(msg))
        assert not rc.is_failure
    finally:
        client.close()
    common = ("--server", server, "--token", ADMIN_TOKEN)

    def listed() -> list[dict[str, Any]]:
        return json.loads(cli("devices", "list", "--label", f"site={site}", *common, "-o", "json"))

    devices = wait_until(listed, 10, "device listed")
    assert [d["id"] for d in devices] == ["cli-dev-1"]
    shown = json.loads(cli("devices", "show", "cli-dev-1", *common, "-o", "json"))
    assert shown["tier"] == "micro" and shown["labels"] == {"site": site}
    assert "cli-dev-1" in cli("devices", "show", "cli-dev-1", *common)
    assert "404" in cli("devices", "show", "nope", *common, code=1)
    assert json.loads(cli("models", "list", *common, "-o", "json")) == []


def test_no_token_anywhere_names_the_fix(cli: Any, server: str) -> None:
    assert os.environ.get("SLMFLEET_TOKEN") is None
    out = cli("devices", "list", "--server", server, code=1)
    assert "401" in out and "slmfleet login" in out


def test_enroll_without_broker_files_names_the_settings(cli: Any, server: str) -> None:
    out = cli("devices", "enroll", "pi-9", "--server", server, "--token", ADMIN_TOKEN, code=1)
    assert "404" in out and "mosquitto_passwd_file" in out
