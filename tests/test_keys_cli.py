"""`slmfleet keys`: key files, the key lists agents pin, rotation; and the control
plane refusing to start on missing or mismatched key files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import protocol as p
from controlplane.config import ControlPlaneSettings
from controlplane.keyfiles import KeyFileError, read_private_key
from controlplane.trust import TrustConfigError, load_trust
from slmfleet.app import build_app

runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(build_app(args[0]), list(args))
    return result.exit_code, result.output


def _generate(directory: Path, role: str) -> tuple[str, Path]:
    code, out = _cli("keys", "generate", "--role", role, "--out", str(directory))
    assert code == 0, out
    keyid = out.split()[1]
    return keyid, directory / f"{keyid}.key"


def test_generate_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    keyid, path = _generate(tmp_path / "keys", "release")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["schema"] == "slmfleet.private-key/1"
    assert (doc["role"], doc["keyid"]) == ("release", keyid)
    key = read_private_key(path, "release")
    assert key.key_id == keyid
    pub = json.loads((tmp_path / "keys" / f"{keyid}.pub").read_text())
    assert pub["public"] == key.public.to_b64()
    with pytest.raises(KeyFileError, match="not a director key"):
        read_private_key(path, "director")


def test_generate_refuses_an_unknown_role(tmp_path: Path) -> None:
    code, out = _cli("keys", "generate", "--role", "admin", "--out", str(tmp_path))
    assert code != 0 and "role must be one of" in out
    assert list(tmp_path.iterdir()) == []


def test_list_two_of_three_is_what_an_agent_pins(tmp_path: Path) -> None:
    keys = [_generate(tmp_path / "k", "release") for _ in range(3)]
    out = tmp_path / "release-keys.json"
    code, text = _cli(
        "keys", "list", "--role", "release", "--threshold", "2",
        "--key", str(keys[0][1]),
        "--key", str(keys[1][1]).replace(".key", ".pub"),
        "--key", read_private_key(keys[2][1]).public.to_b64(),
        "--sign-with", str(keys[0][1]), "--sign-with", str(keys[2][1]),
        "--expires-days", "365",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, text
    data = out.read_bytes()
    assert data == p.canonical_json(json.loads(data))  # canonical JSON, as pinned
    pinned = p.verify_pinned_key_list(data, "release")
    assert (pinned.version, pinned.threshold) == (1, 2)
    assert set(pinned.keys) == {k for k, _ in keys}
    assert pinned.expires_at is not None


def test_list_signed_below_its_threshold_is_not_written(tmp_path: Path) -> None:
    keys = [_generate(tmp_path / "k", "release") for _ in range(2)]
    out = tmp_path / "release-keys.json"
    code, text = _cli(
        "keys", "list", "--role", "release", "--threshold", "2",
        "--key", str(keys[0][1]), "--key", str(keys[1][1]),
        "--sign-with", str(keys[0][1]), "--out", str(out),
    )  # fmt: skip
    assert code != 0 and "1 valid signature(s)" in text
    assert not out.exists()


def test_list_refuses_a_key_of_the_other_role(tmp_path: Path) -> None:
    _, director = _generate(tmp_path / "k", "director")
    code, text = _cli(
        "keys", "list", "--role", "release", "--key", str(director), "--out", str(tmp_path / "x")
    )
    assert code != 0 and "not a release key" in text


def test_rotate_is_verified_like_a_device_would(tmp_path: Path) -> None:
    old = [_generate(tmp_path / "old", "director") for _ in range(2)]
    current = tmp_path / "director-keys.json"
    code, text = _cli(
        "keys", "list", "--role", "director", "--threshold", "2",
        "--key", str(old[0][1]), "--key", str(old[1][1]), "--out", str(current),
    )  # fmt: skip
    assert code == 0, text
    new = _generate(tmp_path / "new", "director")
    rotated = tmp_path / "director-keys.v2.json"

    # Only one of the two current keys signs: a device would refuse it, so no file.
    code, text = _cli(
        "keys", "rotate", "--current", str(current), "--key", str(new[1]),
        "--sign-with", str(old[0][1]), "--sign-with", str(new[1]), "--out", str(rotated),
    )  # fmt: skip
    assert code != 0 and "new director key list" in text
    assert not rotated.exists()

    code, text = _cli(
        "keys", "rotate", "--current", str(current), "--key", str(new[1]),
        "--sign-with", str(old[0][1]), "--sign-with", str(old[1][1]),
        "--sign-with", str(new[1]), "--out", str(rotated),
    )  # fmt: skip
    assert code == 0, text
    pinned = p.verify_pinned_key_list(current.read_bytes(), "director")
    successor = p.verify_key_rotation(pinned, rotated.read_bytes())
    assert successor.version == 2 and set(successor.keys) == {new[0]}


# --- the control plane's start-up checks -------------------------------------


def _keys(tmp_path: Path) -> dict[str, Path]:
    release = _generate(tmp_path / "k", "release")[1]
    director = _generate(tmp_path / "k", "director")[1]
    for role, key in (("release", release), ("director", director)):
        code, text = _cli(
            "keys", "list", "--role", role, "--key", str(key),
            "--out", str(tmp_path / f"{role}-keys.json"),
        )  # fmt: skip
        assert code == 0, text
    return {
        "release_keys_file": tmp_path / "release-keys.json",
        "director_keys_file": tmp_path / "director-keys.json",
        "director_key": director,
    }


def test_control_plane_trust_loads_from_cli_made_files(tmp_path: Path) -> None:
    k = _keys(tmp_path)
    settings = ControlPlaneSettings(
        data_dir=tmp_path,
        release_keys_file=k["release_keys_file"],
        director_keys_file=k["director_keys_file"],
        director_key_files=[k["director_key"]],
    )
    trust = load_trust(settings)
    assert trust.release_keys is not None and trust.director is not None
    assert [s.key_id for s in trust.director.signers] == list(trust.director.key_list.keys)


def test_missing_key_files_stop_the_start_naming_the_fix(tmp_path: Path) -> None:
    k = _keys(tmp_path)
    missing = ControlPlaneSettings(data_dir=tmp_path, release_keys_file=tmp_path / "nope.json")
    with pytest.raises(TrustConfigError, match="slmfleet keys generate --role release"):
        load_trust(missing)
    no_director_key = ControlPlaneSettings(
        data_dir=tmp_path,
        release_keys_file=k["release_keys_file"],
        director_keys_file=k["director_keys_file"],
        director_key_files=[tmp_path / "gone.key"],
    )
    with pytest.raises(TrustConfigError, match="slmfleet keys generate --role director"):
        load_trust(no_director_key)


def test_director_key_not_in_the_pinned_list_is_refused(tmp_path: Path) -> None:
    k = _keys(tmp_path)
    _, stray = _generate(tmp_path / "stray", "director")
    settings = ControlPlaneSettings(
        data_dir=tmp_path,
        release_keys_file=k["release_keys_file"],
        director_keys_file=k["director_keys_file"],
        director_key_files=[stray],
    )
    with pytest.raises(TrustConfigError, match="agents would reject"):
        load_trust(settings)


def test_half_a_director_configuration_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="director_key_files"):
        ControlPlaneSettings(data_dir=tmp_path, director_keys_file=tmp_path / "d.json",
                             release_keys_file=tmp_path / "r.json")
    settings = ControlPlaneSettings.model_validate(
        {"data_dir": tmp_path, "release_keys_file": "r.json", "director_keys_file": "d.json",
         "director_key_files": "a.key, b.key"}
    )
    assert settings.director_key_files == [Path("a.key"), Path("b.key")]
