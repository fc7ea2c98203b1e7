"""``slmfleet agent ...``: the device agent, without Typer.

The agent runs for months on small devices, and keeps for its whole life
what it imports: it never loads Typer (and with it click and rich), and the
standard-library modules its libraries import but rarely use stand in until
first used (:mod:`agent.lazy_stdlib`).
"""

from __future__ import annotations


def run_agent(argv: list[str]) -> int:
    """Run ``slmfleet agent`` with ``argv`` (the words after ``agent``)."""
    # First, before paho-mqtt or pydantic is imported.
    from agent.lazy_stdlib import defer_unused_imports

    defer_unused_imports()
    from agent.cli import main as agent_main

    return agent_main(argv)
