"""``python -m slmfleet``: the same as the ``slmfleet`` command."""

from slmfleet.cli import main

main()
