"""A whole fleet on one machine, for ``slmfleet dev``, the tests and the benchmarks.

:mod:`.fleet` (:class:`DevFleet`: broker, control plane on SQLite, local
agents, a demo release rolled out canary-first), :mod:`.mosquitto` (a broker
on a loopback port), :mod:`.model_cache` (where the setup script puts the
test model). Production code never imports this package.
"""
