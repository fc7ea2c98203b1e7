"""The `slmfleet` command line."""
