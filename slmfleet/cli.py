"""Entry point of the ``slmfleet`` command: dispatch by the first word."""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    if wanted == "agent":
        from .agent_entry import run_agent

        sys.exit(run_agent(sys.argv[2:]))
    if wanted == "models" and sys.argv[2:3] == ["build"]:
        # The build runs llama.cpp on this machine; the other `models` commands
        # talk to the control plane, which never imports it.
        from modelbuild.cli import main as build_main

        build_main(sys.argv[3:])
        return
    from .app import build_app

    build_app(wanted)()


if __name__ == "__main__":
    main()
