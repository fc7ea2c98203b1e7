"""slmfleet device agent: capability reports, local inference, safe updates."""

__version__ = "0.1.0"

#: log line format of the agent and of the child processes whose stderr it shares
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
