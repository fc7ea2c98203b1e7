"""`slmfleet agent ...`: run the device agent.

Neither Typer nor argparse: the agent process keeps what it imports for its
whole life on a small device, and one command with one option needs no
parser library (argparse alone stays ~0.3 MB resident). Errors follow
argparse's conventions: usage on stderr and exit status 2, which the
systemd unit does not restart on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH

PROG = "slmfleet agent"
USAGE = f"usage: {PROG} run [-h] [--config PATH]"
HELP = f"""{USAGE}

Run the device agent.

commands:
  run                   join the fleet: report capabilities, heartbeat, install
                        assigned models

options:
  -h, --help            show this help message and exit
  -c PATH, --config PATH
                        agent TOML config (default {DEFAULT_CONFIG_PATH})
"""


class UsageError(Exception):
    """The command line is not ``run [--config PATH]``."""


def _long(name: str, option: str) -> bool:
    """``name`` is ``option`` or an abbreviation of it, as argparse allows."""
    return len(name) > 2 and option.startswith(name)


def parse_run_args(argv: list[str]) -> Path | None:
    """The config path of ``run [--config PATH]``; None when help was asked for.

    Accepts what argparse accepted: ``-c PATH``, ``-cPATH``, ``-c=PATH``,
    ``--config PATH``, ``--config=PATH`` and abbreviations such as
    ``--conf``; anything else raises :class:`UsageError`.
    """
    if not argv:
        raise UsageError("the following arguments are required: command")
    if argv[0] == "-h" or _long(argv[0], "--help"):
        return None
    if argv[0] != "run":
        raise UsageError(f"argument command: invalid choice: {argv[0]!r} (choose from 'run')")
    config = DEFAULT_CONFIG_PATH
    rest = argv[1:]
    while rest:
        arg = rest.pop(0)
        name, equals, inline = arg.partition("=")
        if arg == "-h" or _long(arg, "--help"):
            return None
        if name == "-c" or _long(name, "--config"):
            if not equals:
                if not rest or rest[0].startswith("-"):
                    raise UsageError("argument -c/--config: expected one argument")
                inline = rest.pop(0)
        elif arg.startswith("-c") and not arg.startswith("--"):
            inline = arg[2:]
        else:
            raise UsageError(f"unrecognized arguments: {' '.join([arg, *rest])}")
        config = Path(inline)
    return config


def main(argv: list[str]) -> int:
    """Parse ``argv`` (the words after ``slmfleet agent``) and run the command."""
    try:
        config_path = parse_run_args(argv)
    except UsageError as exc:
        print(f"{USAGE}\n{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if config_path is None:
        print(HELP, end="")
        return 0
    from .config import load_config

    try:
        cfg = load_config(config_path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .hardware import Detection

    # The probe child runs while the agent's own modules load.
    detection = Detection(cfg)
    from .service import run_agent

    run_agent(cfg, detection)
    return 0
