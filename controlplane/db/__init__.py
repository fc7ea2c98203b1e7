"""The control plane's database: models, engine set-up and migrations."""

from .migrate import upgrade_to_head
from .models import Base, CapabilitySnapshot, Device, DeviceEvent, DeviceLabel, TelemetryRow
from .session import make_engine, session_factory

__all__ = [
    "Base",
    "CapabilitySnapshot",
    "Device",
    "DeviceEvent",
    "DeviceLabel",
    "TelemetryRow",
    "make_engine",
    "session_factory",
    "upgrade_to_head",
]
