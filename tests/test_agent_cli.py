"""`slmfleet agent`: its small argument parser and exit statuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import UsageError, main, parse_run_args
from agent.config import DEFAULT_CONFIG_PATH

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], DEFAULT_CONFIG_PATH),
        (["run", "--config", "/x/agent.toml"], Path("/x/agent.toml")),
        (["run", "--config=/x/agent.toml"], Path("/x/agent.toml")),
        (["run", "-c", "a.toml"], Path("a.toml")),
        (["run", "-ca.toml"], Path("a.toml")),
        (["run", "-c=a.toml"], Path("a.toml")),
        (["run", "--conf", "a.toml"], Path("a.toml")),  # abbreviations, as argparse took
        (["run", "--c=a.toml"], Path("a.toml")),
        (["run", "-c", "a.toml", "-c", "b.toml"], Path("b.toml")),  # the last one wins
        (["--help"], None),
        (["-h"], None),
        (["run", "--help"], None),
        (["run", "--he"], None),
        (["run", "-c", "a.toml", "-h"], None),
    ],
)
def test_parse(argv: list[str], expected: Path | None) -> None:
    assert parse_run_args(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: command"),
        (["start"], "invalid choice: 'start'"),
        (["run", "--config"], "expected one argument"),
        (["run", "-c", "--help"], "expected one argument"),
        (["run", "extra"], "unrecognized arguments: extra"),
        (["run", "--verbose", "x"], "unrecognized arguments: --verbose x"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_run_args(argv)


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """2, as argparse did: the systemd unit does not restart on it."""
    assert main(["run", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: slmfleet agent run")
    assert "error: unrecognized arguments: --bogus" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--config PATH" in out and str(DEFAULT_CONFIG_PATH) in out


def test_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_through_the_slmfleet_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "slmfleet", "agent", "run", "-c",
         str(tmp_path / "missing.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "not found" in result.stderr
