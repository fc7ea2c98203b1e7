"""`slmfleet agent ...`: run the device agent.

Plain argparse, not Typer: on a small device the agent process should not
carry the admin CLI's libraries (click, rich) in its memory for its lifetime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmfleet agent", description="Run the device agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="join the fleet: report capabilities, heartbeat, install assigned models"
    )
    run.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG_PATH,
                     help=f"agent TOML config (default {DEFAULT_CONFIG_PATH})")
    return parser


def main(argv: list[str]) -> int:
    """Parse ``argv`` (the words after ``slmfleet agent``) and run the command."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        from .config import load_config
        from .service import run_agent

        try:
            cfg = load_config(args.config)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        run_agent(cfg)
    return 0
