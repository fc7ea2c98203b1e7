"""The control plane's database: models, engine set-up and migrations."""

# Access-control tables live with the auth package; importing them here puts
# them on the one metadata that migrations and schema checks compare against.
from controlplane.auth import tables as _auth_tables  # noqa: F401

from .device_counts import DeviceCount
from .migrate import upgrade_to_head
from .models import Base, CapabilitySnapshot, Device, DeviceEvent, DeviceLabel, TelemetryRow
from .policy_tables import UpdatePolicyDefault
from .retention_tables import RetentionMark, TelemetryHourly
from .session import make_engine, session_factory

__all__ = [
    "Base",
    "CapabilitySnapshot",
    "Device",
    "DeviceCount",
    "DeviceEvent",
    "DeviceLabel",
    "RetentionMark",
    "TelemetryHourly",
    "TelemetryRow",
    "UpdatePolicyDefault",
    "make_engine",
    "session_factory",
    "upgrade_to_head",
]
