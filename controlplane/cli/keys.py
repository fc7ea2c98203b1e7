"""``slmfleet keys``: generate signing keys, build and rotate the key lists agents pin."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Release and director keys, and the signed key lists agents pin.",
    no_args_is_help=True,
)

ROLE_HELP = "release (offline, signs model releases) or director (online, signs assignments)"

#: ``--expires-days`` of a new key list (default ``None``: it never expires)
ExpiresDaysOption = Annotated[
    float | None, typer.Option("--expires-days", help="expiry, in days")
]


@app.callback()
def _group() -> None:
    """Release and director keys, and the signed key lists agents pin."""


@contextmanager
def _refusals() -> Iterator[None]:
    """A bad key file or a failed write inside: print ``error: …`` and exit 1."""
    from controlplane.keyfiles import KeyFileError

    try:
        yield
    except (KeyFileError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def generate(
    role: str = typer.Option(..., "--role", help=ROLE_HELP),
    out: Path = typer.Option(..., "--out", help="directory for <keyid>.key and <keyid>.pub"),
) -> None:
    """Create an Ed25519 key: DIR/<keyid>.key (private, mode 0600) and DIR/<keyid>.pub."""
    from controlplane.keyfiles import generate_key

    with _refusals():
        key, private_path, public_path = generate_key(out, role)
    typer.echo(f"keyid   {key.key_id}")
    typer.echo(f"public  {key.public.to_b64()}")
    typer.echo(f"private {private_path} (keep it secret{', offline' if role == 'release' else ''})")
    typer.echo(f"pubfile {public_path}")


@app.command("list")
def list_(
    role: str = typer.Option(..., "--role", help=ROLE_HELP),
    threshold: int = typer.Option(1, "--threshold", help="signatures required (k of n)"),
    key: list[str] = typer.Option(
        ..., "--key", help="a member: .key or .pub file, or a base64 public key; repeat"
    ),
    sign_with: list[Path] = typer.Option(
        [],
        "--sign-with",
        help="private key file that signs the list (default: the --key .key files)",
    ),
    version: int = typer.Option(1, "--version", help="list version; agents pin version 1"),
    expires_days: ExpiresDaysOption = None,
    out: Path = typer.Option(..., "--out", help="where to write the signed list (JSON)"),
) -> None:
    """Write a key list signed by a threshold of its own keys: the file agents pin."""
    from controlplane import keyfiles

    with _refusals():
        keyfiles.check_role(role)
        members = [keyfiles.read_public_key(spec, role) for spec in key]
        signer_paths = sign_with or [
            Path(spec) for spec in key if keyfiles.is_private_key_file(Path(spec))
        ]
        if not signer_paths:
            raise keyfiles.KeyFileError("no private key to sign with: pass --sign-with KEYFILE")
        signers = [keyfiles.read_private_key(path, role) for path in signer_paths]
        keyfiles.write_atomic(out, keyfiles.build_key_list(
            role, members, signers, threshold=threshold, version=version, now=time.time(),
            expires_days=expires_days,
        ))
    typer.echo(f"wrote {role} key list v{version} ({threshold} of {len(members)}) to {out}")


@app.command()
def rotate(
    current: Path = typer.Option(..., "--current", help="the key list devices pin now"),
    key: list[str] = typer.Option(
        ..., "--key", help="a member of the new list: .key/.pub file or base64 public key"
    ),
    threshold: int = typer.Option(1, "--threshold", help="signatures the new list requires"),
    sign_with: list[Path] = typer.Option(
        ...,
        "--sign-with",
        help="private key files: a threshold of the current keys AND of the new keys",
    ),
    expires_days: ExpiresDaysOption = None,
    out: Path = typer.Option(..., "--out", help="where to write the new list (JSON)"),
) -> None:
    """Write the next version of a key list, signed by old and new thresholds."""
    from controlplane import keyfiles

    with _refusals():
        role = _role_of(current)
        pinned = keyfiles.read_key_list(current, role)
        members = [keyfiles.read_public_key(spec, role) for spec in key]
        signers = [keyfiles.read_private_key(path, role) for path in sign_with]
        keyfiles.write_atomic(out, keyfiles.rotate_key_list(
            pinned, members, signers, threshold=threshold, now=time.time(),
            expires_days=expires_days,
        ))
    typer.echo(
        f"wrote {role} key list v{pinned.version + 1} ({threshold} of {len(members)}) to {out}; "
        f"it replaces v{pinned.version} on devices that verify it"
    )


def _role_of(path: Path) -> str:
    """The role a key-list file claims, read only to pick how to verify it."""
    from controlplane.keyfiles import KeyFileError

    try:
        doc = json.loads(path.read_bytes()[:65536])
        role = doc["signed"]["role"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a key list: {exc}") from exc
    if not isinstance(role, str):
        raise KeyFileError(f"{path} is not a key list")
    return role
