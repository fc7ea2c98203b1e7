"""The agent process: probe the hardware, join the fleet, heartbeat, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from protocol import Capabilities, Hello, Runtime, TopicKind, encode

from . import __version__
from .config import AgentConfig
from .link import MqttLink
from .probe import probe_capabilities, probe_runtimes
from .profiles import FirmwareProfile, default_profiles_dir, load_profiles, match_profile
from .sdnotify import notify, watchdog_interval_s
from .simulated import simulated_capabilities
from .telemetry import TelemetrySampler

log = logging.getLogger(__name__)


def detect_hardware(config: AgentConfig) -> tuple[Capabilities, list[Runtime], FirmwareProfile]:
    """Measure (or, under a simulated-hardware override, recall) this device."""
    config.models_path.mkdir(parents=True, exist_ok=True)
    if config.simulate is not None:
        caps = simulated_capabilities(config.simulate.preset)
    else:
        caps = probe_capabilities(config.models_path)
    profiles = load_profiles(config.profiles_dir or default_profiles_dir())
    return caps, probe_runtimes(), match_profile(caps, profiles)


class Agent:
    """One device agent. ``await run()`` until :meth:`request_stop`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.capabilities, self.runtimes, self.profile = detect_hardware(config)
        self.link = MqttLink(config, self.hello_payload, on_connected=self._on_connected)
        self.telemetry = TelemetrySampler(config.device_id)
        self._stop = asyncio.Event()
        log.info(
            "device %s: profile %s, tier %s%s",
            config.device_id,
            self.profile.id,
            self.profile.tier.value,
            " (SIMULATED hardware)" if config.simulate else "",
        )

    def hello(self) -> Hello:
        """The capability report this device publishes (retained) on connect."""
        return Hello(
            device_id=self.config.device_id,
            ts=time.time(),
            agent_version=__version__,
            capabilities=self.capabilities,
            profile=self.profile.id,
            tier=self.profile.tier,
            runtimes=self.runtimes,
            labels=self.config.labels,
            simulated=self.config.simulate is not None,
        )

    def hello_payload(self) -> bytes:
        return encode(self.hello())

    async def _on_connected(self) -> None:
        notify("READY=1\nSTATUS=connected to broker")

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.link.publish(TopicKind.TELEMETRY, encode(self.telemetry.sample()))

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def request_stop(self) -> None:
        """Ask :meth:`run` to publish ``offline`` and return."""
        self._stop.set()

    async def run(self) -> None:
        """Run until stopped; SIGTERM/SIGINT stop it cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        tasks = [
            asyncio.create_task(self.link.run(), name="mqtt-link"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        if (wd := watchdog_interval_s()) is not None:
            tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
        await self._stop.wait()
        notify("STOPPING=1")
        await self.link.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("agent %s stopped", self.config.device_id)


def run_agent(config: AgentConfig) -> None:
    """Blocking entry point used by ``slmfleet agent run``."""
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def main() -> None:
        await Agent(config).run()

    asyncio.run(main())
