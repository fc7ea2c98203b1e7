"""The agent process: probe the hardware, join the fleet, heartbeat, install
assigned models, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from typing import Any

from protocol import HELLO_SCHEMA_SETS, Capabilities, Hello, InferenceStats, TopicKind, encode

from . import LOG_FORMAT, __version__
from .config import AgentConfig
from .disk import disk_free_bytes
from .events import EventLog
from .hardware import Detection, Hardware, detect_hardware
from .healthcheck import HealthChecker
from .healthcheck.eval_cache import EvalCache, with_scores
from .healthcheck.in_worker import WorkerHealthChecker
from .inference import adapters
from .inference.api import ApiSettings, LocalApi
from .inference.runtime import InferenceRuntime, RuntimeLimits
from .inference.schemas import Limits
from .inference.spec import AdapterSpec, adapter_spec_for_version, spec_for_version
from .link import MqttLink
from .malloc_trim import limit_malloc_arenas, release_freed_memory
from .profiles import with_overrides
from .sdnotify import notify, watchdog_interval_s
from .telemetry import TelemetrySampler
from .update.adapters import inactive_adapters
from .update.pipeline import Updater
from .update.store import ModelVersion

log = logging.getLogger(__name__)

#: how long a stopping agent waits for a running update to reach a safe point
STOP_UPDATE_TIMEOUT_S = 10.0
#: how long a stopping agent tries to deliver spooled events (they survive anyway)
STOP_EVENTS_TIMEOUT_S = 2.0
#: how long a stopping agent lets local API requests being answered finish
#: (alongside the update's wait: the agent unit's TimeoutStopSec is 30 s)
STOP_DRAIN_TIMEOUT_S = 10.0
#: how long a cancelled task of a stopping agent may take to end before it is
#: cancelled again, and how many times
STOP_TASK_GRACE_S = 1.0
STOP_TASK_CANCELS = 3
#: start-up memory is released once connected, or after this long without a broker
SETTLE_TIMEOUT_S = 30.0
#: exit status of an agent that cannot start as configured but may once the
#: cause goes away (the port is freed): systemd's Restart=on-failure retries it
#: a few times, then leaves the unit failed (exit 2, a bad config, is not retried)
START_FAILED_EXIT = 1


class AgentStartError(Exception):
    """The agent cannot do what its config asks (e.g. serve its local API)."""


def _api_unavailable(config: AgentConfig, exc: OSError, key: str = "api_port") -> AgentStartError:
    """The error of a local API that cannot listen, naming the address and the fixes.

    ``key`` is the config key of the port that failed (``api_port`` or ``ollama_port``).
    """
    address = f"{config.api_host}:{getattr(config, key)}"
    if key == "api_port" and config.api_socket is not None:
        address += f" (and {config.api_socket})"
    if key == "api_port" and config.ollama_port is not None:
        address += f" (and port {config.ollama_port}, ollama_port)"
    held = "another process holds that port: stop it, or " if exc.errno == errno.EADDRINUSE else ""
    off = ("remove ollama_port to serve the Ollama API on api_port alone" if key == "ollama_port"
           else "api_enabled = false if this device serves no apps")
    return AgentStartError(
        f"local API cannot listen on {address}: {exc.strerror or exc}; {held}set {key} "
        f"in the agent config to a free port (0 picks one, logged at start), or {off}"
    )


def check_api_port(config: AgentConfig) -> None:
    """Raise :class:`AgentStartError` if the local API's TCP port cannot be bound now.

    Checked before the agent connects or tells systemd it is ready: the API
    itself opens only once the installed model is loaded (so apps are never
    told "no model" while it loads), which may be after both.
    """
    if not config.api_enabled:
        return
    family = socket.AF_INET6 if ":" in config.api_host else socket.AF_INET
    for key in ("api_port", "ollama_port"):
        port = getattr(config, key)
        if not port:  # None: not served; 0: any free port will do
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As asyncio's server does: a port left in TIME_WAIT by the last run is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((config.api_host, port))
                sock.listen()
            except OSError as exc:
                raise _api_unavailable(config, exc, key) from exc


class Agent:
    """One device agent. ``await run()`` until :meth:`request_stop`.

    ``hardware`` and ``health`` replace the probe and the health-check
    subprocess (benchmarks that start many agents from one process).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        hardware: Hardware | None = None,
        health: HealthChecker | None = None,
    ) -> None:
        self.config = config
        self.capabilities, self.runtimes, profile = hardware or detect_hardware(config)
        self.profile = with_overrides(profile, parallel=config.inference_parallel)
        self.events = EventLog(config.event_spool_path, config.device_id,
                               max_spooled=config.max_spooled_events)
        self.inference: InferenceRuntime | None = None
        self.api: LocalApi | None = None
        #: evaluation scores measured on this device (the quality gate's baselines)
        self.eval_cache = EvalCache(config.state_dir / "eval-scores.json")
        if config.api_enabled:
            self.inference = InferenceRuntime(RuntimeLimits(
                max_queue=config.inference_max_queue,
                queue_timeout_s=config.inference_queue_timeout_s,
                load_timeout_s=config.inference_load_timeout_s,
                crash_limit=config.inference_crash_limit,
                crash_window_s=config.inference_crash_window_s,
                max_loaded=config.max_loaded_models,
                keep_alive_s=config.inference_keep_alive_s,
                os_reserve_bytes=self.profile.runtime.os_reserved_mb << 20,
            ))
            if health is None:
                health = WorkerHealthChecker(self.inference, self.profile.runtime,
                                             config.health_check_timeout_s, self.eval_cache)
        self.updater = Updater(
            config,
            capabilities=self.capabilities,
            profile=self.profile,
            events=self.events,
            health=health,
            on_status=self._hello_changed,
            on_activated=self._activated,
            on_removed=self._removed,
        )
        self.link = MqttLink(config, self.hello_payload, on_desired=self.updater.offer,
                             on_connected=self._on_connected)
        self.telemetry = TelemetrySampler(
            config.device_id,
            active_models=self.updater.active_refs,
            inference=self._inference_stats if self.inference else list,
            downloads=self._downloads,
        )
        #: active adapters that are not served, and why (their base's build differs)
        self._inactive: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._hello_dirty = asyncio.Event()
        #: why the agent must exit non-zero once stopped (raised by :meth:`run`)
        self._failed: AgentStartError | None = None
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
            schema=HELLO_SCHEMA_SETS,
            device_id=self.config.device_id,
            ts=time.time(),
            agent_version=__version__,
            capabilities=self._current_capabilities(),
            profile=self.profile.id,
            tier=self.profile.tier,
            runtimes=self.runtimes,
            models=[m.model_copy(update={"inactive": self._inactive[m.name][:1024]})
                    if m.name in self._inactive else m for m in self.updater.active_models()],
            updates=self.updater.updates(),
            update=self.updater.status(),
            labels=self.config.labels,
            simulated=self.config.simulate is not None,
        )

    def _current_capabilities(self) -> Capabilities:
        # Free disk changes with every install; the director should see it as it is now.
        if self.config.simulate is not None:
            return self.capabilities
        try:
            free = disk_free_bytes(self.config.models_path)
        except OSError:
            return self.capabilities
        return self.capabilities.model_copy(update={"disk_free_bytes": free})

    def hello_payload(self) -> bytes:
        return encode(self.hello())

    async def _on_connected(self) -> None:
        notify("READY=1\nSTATUS=connected to broker")
        self.events.kick()

    def _inference_stats(self) -> list[InferenceStats]:
        """Telemetry's per-version counters with each active version's evaluation score."""
        assert self.inference is not None
        return with_scores(self.inference.telemetry(), self.eval_cache,
                           self.updater.active_models())

    def _downloads(self) -> dict[str, int]:
        """Bytes each active ``name@version`` fetched over the network when it was installed."""
        active = set(self.updater.active_refs())
        return {u.ref: u.downloaded_bytes for u in self.updater.updates()
                if u.ref in active and u.downloaded_bytes is not None}

    def _hello_changed(self) -> None:
        self._hello_dirty.set()

    async def _hello_publisher(self) -> None:
        # Its own task: the updater must never wait on the network.
        while True:
            await self._hello_dirty.wait()
            self._hello_dirty.clear()
            await self.link.publish_hello()  # offline: the next connect sends a fresh one
            # The update status changed (an update ended, or an assignment was
            # refused or re-signed): what that work allocated should not stay
            # resident while the agent idles again.
            release_freed_memory()

    def _activated(self, version: ModelVersion) -> None:
        if self.inference is None:
            return
        adapter = adapter_spec_for_version(version)
        if adapter is not None:
            # Applied on its base's worker: nothing of the base is loaded again.
            adapters.spawn(self.inference, self._serve_adapter(adapter), f"adapter-{adapter.ref}")
            return
        spec = spec_for_version(version, self.profile.runtime)
        self.inference.activated(spec)
        active = [a for v in self.updater.active_versions()
                  if (a := adapter_spec_for_version(v)) is not None]
        for adapter in inactive_adapters(spec.name, spec.sha256, active):
            self._adapter_inactive(adapter, f"base_mismatch: {adapter.ref} was made for "
                                   f"another build of {spec.name}; {spec.ref} serves without "
                                   "it until a matching adapter arrives")
        for adapter in active:
            if adapter.name in self._inactive and adapter.base_sha256 == spec.sha256:
                # The base is back on the build the adapter was made for.
                adapters.spawn(self.inference, self._serve_adapter(adapter),
                               f"adapter-{adapter.ref}")

    def _adapter_inactive(self, adapter: AdapterSpec, why: str) -> None:
        """Say (event, then every hello until it serves again) that ``adapter`` is not served."""
        log.warning("adapter %s is not served: %s", adapter.ref, why)
        self._inactive[adapter.name] = why
        self.updater.adapter_inactive(adapter.name, why)
        self._hello_changed()

    async def _serve_adapter(self, adapter: AdapterSpec) -> None:
        assert self.inference is not None
        why = await adapters.activate_adapter(self.inference, adapter)
        if why is not None:
            self._adapter_inactive(adapter, why)
        elif self._inactive.pop(adapter.name, None) is not None:
            self._hello_changed()

    def _removed(self, name: str) -> None:
        """``name`` left the desired set: the runtime stops serving it and its worker ends.

        The runtime's removal is a coroutine (requests being answered finish
        first): it runs as one of the runtime's tasks, so the worker process
        is stopped now rather than at the next restart.
        """
        if self._inactive.pop(name, None) is not None:
            self._hello_changed()
        if self.inference is None:
            return
        adapters.spawn(self.inference, self.inference.remove(name), f"remove-{name}")
        adapters.spawn(self.inference, adapters.remove_adapter(self.inference, name),
                       f"remove-adapter-{name}")

    async def _start_inference(self) -> None:
        """Serve the active model and open the local API (neither delays joining the fleet)."""
        if self.inference is None:
            return
        config = self.config
        installed = self.updater.active_versions()
        for active in installed:
            if adapter_spec_for_version(active) is None:
                await self.inference.serve(spec_for_version(active, self.profile.runtime))
        for active in installed:
            if (adapter := adapter_spec_for_version(active)) is not None:
                await self._serve_adapter(adapter)
        api = LocalApi(self.inference, ApiSettings(
            host=config.api_host, port=config.api_port, socket_path=config.api_socket,
            ollama_port=config.ollama_port,
            max_body_bytes=config.api_max_body_bytes,
            limits=Limits(max_prompt_chars=config.api_max_prompt_chars,
                          default_max_tokens=config.api_default_max_tokens),
        ), locks=self.updater.locks)
        try:
            await api.start()
        except OSError as exc:
            # check_api_port passed, so the port was taken since (or the unix
            # socket cannot be made): an agent configured to serve apps that
            # cannot serve them must not run on as if it did.
            self._failed = _api_unavailable(config, exc)
            self.request_stop()
            return
        self.api = api
        log.info("local API on http://%s:%d%s", config.api_host, api.port,
                 f" and {config.api_socket}" if config.api_socket else "")
        if api.ollama_port is not None:
            log.info("Ollama API also on http://%s:%d", config.api_host, api.ollama_port)
        if not self.link.connected.is_set():
            # Ready means useful (DESIGN.md): apps on the device are served from
            # what is installed even while the broker is out of reach, and a
            # restart by systemd's start timeout would not bring the broker back.
            model = self.updater.active_ref() or "no model yet"
            notify(f"READY=1\nSTATUS=serving locally ({model}); broker not connected yet")

    async def _settle(self, startup: asyncio.Task[None]) -> None:
        """Give start-up's freed memory back once the agent is connected and serving."""
        # Start-up allocates far more than idling keeps (see agent.malloc_trim); doing
        # this once the first connection and the local API are up leaves the
        # steady state with only what it uses.
        await asyncio.wait({startup})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.connected.wait(), SETTLE_TIMEOUT_S)
        release_freed_memory()

    async def _publish_event(self, payload: bytes) -> bool:
        return await self.link.publish(TopicKind.EVENTS, payload)

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        first = True
        while True:
            await asyncio.sleep(interval)
            await self.link.publish(TopicKind.TELEMETRY, encode(self.telemetry.sample()))
            if first:
                # The first heartbeat builds the telemetry schema; its garbage goes too.
                first = False
                release_freed_memory()

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def request_stop(self) -> None:
        """Ask :meth:`run` to publish ``offline`` and return."""
        self._stop.set()

    async def run(self) -> None:
        """Run until stopped; SIGTERM/SIGINT stop it cleanly.

        Raises :class:`AgentStartError` when the local API cannot listen:
        before anything starts (so systemd never hears ``READY=1``) when its
        port is taken at start, after a clean stop if it is taken later.
        """
        check_api_port(self.config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        # Before connecting: hello must report a model that survived the last run.
        await self.updater.start()
        updates = asyncio.create_task(self.updater.run(), name="updater")
        inference = asyncio.create_task(self._start_inference(), name="inference")
        tasks = [
            asyncio.create_task(self.link.run(), name="mqtt-link"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self.events.run(self._publish_event), name="events"),
            asyncio.create_task(self._hello_publisher(), name="hello"),
            inference,
            asyncio.create_task(self._settle(inference), name="settle"),
        ]
        if (wd := watchdog_interval_s()) is not None:
            tasks.append(asyncio.create_task(self._watchdog(wd), name="watchdog"))
        await self._stop.wait()
        notify("STOPPING=1")
        self.updater.stop()
        # No new local requests from here; those being answered finish while
        # the update reaches its safe point.
        draining = (asyncio.create_task(self.api.close(STOP_DRAIN_TIMEOUT_S))
                    if self.api is not None else None)
        done, _ = await asyncio.wait({updates}, timeout=STOP_UPDATE_TIMEOUT_S)
        if updates not in done:
            log.warning("update still busy after %.0f s; it resumes on the next start",
                        STOP_UPDATE_TIMEOUT_S)
            updates.cancel()
        await self.events.wait_delivered(STOP_EVENTS_TIMEOUT_S)
        if draining is not None:
            await draining
        if self.inference is not None:
            await self.inference.close()
        await self.link.close()
        for task in tasks:
            task.cancel()
        await _until_cancelled([updates, *tasks])
        self.updater.mark_clean_shutdown()
        log.info("agent %s stopped", self.config.device_id)
        if self._failed is not None:
            raise self._failed


async def _until_cancelled(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for cancelled ``tasks`` to end, cancelling again those that outlive
    :data:`STOP_TASK_GRACE_S` (at most :data:`STOP_TASK_CANCELS` times).

    About one stop in ten that lands just after connecting, the MQTT link's
    task went on waiting for messages inside aiomqtt as if never cancelled;
    a second cancel ends it. Without this the agent stayed up until
    systemd's TimeoutStopSec killed it, and the next start re-hashed the
    active model for want of a clean-shutdown marker.
    """
    pending = {task for task in tasks if not task.done()}
    for _ in range(STOP_TASK_CANCELS):
        if not pending:
            break
        _, pending = await asyncio.wait(pending, timeout=STOP_TASK_GRACE_S)
        for task in pending:
            log.warning("task %s still running %.0f s after it was cancelled; cancelling "
                        "it again", task.get_name(), STOP_TASK_GRACE_S)
            task.cancel()
    if pending:
        log.error("tasks %s would not stop; leaving them", sorted(t.get_name() for t in pending))
    # Collect what the ended tasks raised, so asyncio does not log it as never retrieved.
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


def run_agent(config: AgentConfig, detection: Detection | None = None) -> None:
    """Blocking entry point used by ``slmfleet agent run``.

    ``detection`` is hardware detection the caller started early; without
    one it starts here.
    """
    limit_malloc_arenas()  # before the event loop starts executor threads
    logging.basicConfig(
        level=config.log_level,
        format=LOG_FORMAT,
    )

    async def main() -> None:
        hardware = (detection or Detection(config)).result()
        await Agent(config, hardware=hardware).run()

    try:
        asyncio.run(main())
    except AgentStartError as exc:
        log.critical("agent %s cannot start: %s", config.device_id, exc)
        raise SystemExit(START_FAILED_EXIT) from None
