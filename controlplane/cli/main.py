"""Entry point of the ``slmfleet`` command.

Sub-commands are imported only when asked for, so ``slmfleet agent run`` on a
small device never loads the control plane's web and database stack.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer


def build_app(wanted: str | None = None) -> typer.Typer:
    """Build the CLI, importing only ``wanted`` (or everything for help)."""
    from .app import build_app as build

    return build(wanted)


def _agent_main(argv: list[str]) -> int:
    # First, before paho-mqtt or pydantic is imported (agent/lean_imports.py).
    from agent.lean_imports import defer_unused_imports

    defer_unused_imports()
    from agent.cli import main as agent_main

    return agent_main(argv)


def main() -> None:
    """Console-script entry point."""
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    if wanted == "agent":
        # The agent runs for months on small devices: skip Typer entirely.
        sys.exit(_agent_main(sys.argv[2:]))
    build_app(wanted)()


if __name__ == "__main__":
    main()
