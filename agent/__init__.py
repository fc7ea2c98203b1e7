"""slmfleet device agent: capability reports, local inference, safe updates."""

__version__ = "0.1.0"
