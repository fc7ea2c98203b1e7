"""The ``slmfleet`` Typer app, built with only the sub-commands asked for.

Kept apart from :mod:`slmfleet.cli` so that ``slmfleet agent run``,
which never needs it, does not import Typer (and with it click and rich) into
an agent that idles for months on a small device.
"""

from __future__ import annotations

import importlib

import typer

from .agent_entry import run_agent

#: group name -> (module, attribute) of its Typer app
_GROUPS: dict[str, tuple[str, str, str]] = {
    "controlplane": ("controlplane.cli.serve", "app", "Run the control plane."),
    "keys": ("controlplane.cli.keys", "app", "Release and director keys; the lists agents pin."),
    "models": ("controlplane.cli.models", "app", "Publish signed model releases and list them; "
               "`models build SPEC` makes tier variants by quantization (its own --help)."),
    "rollouts": ("controlplane.cli.rollouts", "app", "Staged canary rollouts of model releases."),
    "devices": ("controlplane.cli.devices", "app", "Devices: list, show, enroll, revoke."),
    "tokens": ("controlplane.cli.tokens", "app", "API tokens: create, list, revoke."),
    "policies": ("controlplane.cli.policies", "app",
                 "Default update policies by device label or firmware profile."),
}
#: top-level commands -> (module, function)
_COMMANDS: dict[str, tuple[str, str]] = {
    "dev": ("controlplane.cli.dev", "dev"),
    "login": ("controlplane.cli.login", "login"),
    "simulate": ("fleetsim.cli", "simulate"),
}


_KNOWN = {*_GROUPS, *_COMMANDS, "agent"}


def build_app(wanted: str | None = None) -> typer.Typer:
    """Build the CLI, importing only ``wanted`` (or everything for help)."""
    app = typer.Typer(
        help="slmfleet: small language models on fleets of edge devices.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def _root() -> None:
        """slmfleet: small language models on fleets of edge devices."""
    for name, (module, attr, help_text) in _GROUPS.items():
        if wanted in (None, name) or wanted not in _KNOWN:
            app.add_typer(getattr(importlib.import_module(module), attr), name=name, help=help_text)
    @app.command(
        "agent",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def _agent(ctx: typer.Context) -> None:
        """Run the device agent (see `slmfleet agent --help`)."""
        raise typer.Exit(run_agent(ctx.args))

    for name, (module, attr) in _COMMANDS.items():
        if wanted in (None, name) or wanted not in _KNOWN:
            app.command(name)(getattr(importlib.import_module(module), attr))
    return app
