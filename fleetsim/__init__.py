"""A fleet simulator: many devices speaking the real protocol through the real broker.

For load tests and rehearsals: N simulated devices (``slmfleet simulate``)
send hellos and heartbeats, verify and act on the control plane's signed
assignments with the agent's own checks, and report every step, with
download and inference behaviour drawn from a scenario. See docs/simulator.md.
"""

from .device import SimDevice, make_devices
from .runner import FleetSimulator, FleetStats
from .scenario import Behaviour, Scenario, load_scenario

__all__ = ["Behaviour", "FleetSimulator", "FleetStats", "Scenario", "SimDevice", "load_scenario",
           "make_devices"]
