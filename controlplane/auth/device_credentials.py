"""Per-device MQTT credentials: issued by the control plane, enforced by Mosquitto.

The database keeps each device's mosquitto password hash; the broker's
password file and ACL are generated from it (plus the control plane's own
user) and the broker is told to re-read them. The device id is the MQTT
username, and the ACL's ``%u`` patterns confine each device to its own topics.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.broker_auth import acl_text, hash_password, password_file_text, reload_broker
from controlplane.config import ControlPlaneSettings
from controlplane.keyfiles import write_atomic

from .tables import DeviceCredential

log = logging.getLogger(__name__)

#: the broker reads the files through group permission
FILE_MODE = 0o640

# One process rewrites the files at a time; the content always comes from the
# database, so the last writer leaves the complete, current set.
_files_lock = threading.Lock()


class EnrollmentOff(RuntimeError):
    """The control plane does not manage the broker's password file."""


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where the broker's auth files are, and how to make it re-read them."""

    passwd_file: Path
    acl_file: Path
    pid_file: Path | None
    cp_username: str
    cp_password: str

    @classmethod
    def from_settings(cls, settings: ControlPlaneSettings) -> BrokerFiles:
        """The files ``settings`` names; :class:`EnrollmentOff` when it names none."""
        if settings.mosquitto_passwd_file is None or settings.mosquitto_acl_file is None:
            raise EnrollmentOff(
                "device enrollment is off: set mosquitto_passwd_file, mosquitto_acl_file and "
                "mosquitto_pid_file to the broker's files (docs/security.md)"
            )
        assert settings.mqtt_password is not None  # the settings validator insists
        return cls(
            settings.mosquitto_passwd_file,
            settings.mosquitto_acl_file,
            settings.mosquitto_pid_file,
            settings.mqtt_username,
            settings.mqtt_password.get_secret_value(),
        )


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A device's new credentials; ``password`` exists only here."""

    row: DeviceCredential
    password: str
    broker_reloaded: bool


def sync_broker(session: Session, files: BrokerFiles) -> bool:
    """Rewrite the password file and ACL from the database; SIGHUP the broker.

    Returns whether the broker was signalled; when it was not (no pid file,
    broker down) the files are still current and apply at its next start.
    """
    rows = session.scalars(
        select(DeviceCredential).where(DeviceCredential.revoked_at.is_(None))
    )
    hashes = {r.device_id: r.password_hash for r in rows}
    # A device enrolled under the control plane's own name would get its rights.
    hashes.pop(files.cp_username, None)
    hashes[files.cp_username] = hash_password(files.cp_password)
    with _files_lock:
        # Group-readable: the broker runs as its own user, in the control
        # plane's group; the hashes stay out of reach of everyone else.
        write_atomic(files.passwd_file, password_file_text(hashes).encode(), mode=FILE_MODE)
        write_atomic(files.acl_file, acl_text([files.cp_username]).encode(), mode=FILE_MODE)
        if files.pid_file is None:
            return False
        try:
            reload_broker(files.pid_file)
        except (OSError, ValueError) as exc:
            log.warning("broker auth files written, but the broker was not reloaded: %s", exc)
            return False
    return True


def enroll(
    session: Session, files: BrokerFiles, device_id: str, created_by: str | None
) -> Enrollment:
    """Give ``device_id`` a new random MQTT password (replacing any old one)."""
    if device_id == files.cp_username:
        raise ValueError(f"{device_id!r} is the control plane's own MQTT user")
    password = secrets.token_urlsafe(24)
    row = session.get(DeviceCredential, device_id)
    if row is None:
        row = DeviceCredential(device_id=device_id)
        session.add(row)
    row.password_hash = hash_password(password)
    row.created_at = time.time()
    row.revoked_at = None
    row.created_by = created_by
    session.commit()
    return Enrollment(row, password, sync_broker(session, files))


def revoke(session: Session, files: BrokerFiles, device_id: str) -> tuple[DeviceCredential, bool]:
    """Revoke ``device_id``'s credentials; raise :class:`KeyError` when it has none."""
    row = session.get(DeviceCredential, device_id)
    if row is None:
        raise KeyError(device_id)
    if row.revoked_at is None:
        row.revoked_at = time.time()
        session.commit()
    return row, sync_broker(session, files)
