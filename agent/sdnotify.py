"""systemd readiness and watchdog notifications (sd_notify protocol).

Sends datagrams to ``$NOTIFY_SOCKET`` when systemd set one; a no-op
otherwise, so the agent runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; return True if sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """Half the unit's ``WatchdogSec`` (systemd's advice), or None if unset."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
