"""The one ``slmfleet`` command, also ``python -m slmfleet``.

It dispatches by its first word, importing only what that word needs:
``agent`` goes to the device agent (:mod:`agent.cli`), ``simulate`` to the
fleet simulator (:mod:`fleetsim.cli`), every other word to the control
plane's commands (:mod:`controlplane.cli`). The agent, the control plane and
the simulator never import each other's CLIs; only this package knows all
three.
"""
