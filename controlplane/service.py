"""The control-plane process: database, MQTT ingest, scheduler and HTTP API together."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from .api import create_app
from .artifacts import ArtifactStore
from .config import ControlPlaneSettings
from .context import AppContext
from .db import make_engine, session_factory, upgrade_to_head
from .director import RESIGN_JOB_ID, Director, add_resign_job
from .ingest import MqttIngest
from .leader import LeaderElector, LeaderLease
from .liveness import add_liveness_job
from .publisher import DesiredPublisher
from .retention import RETENTION_JOB_ID, add_retention_job
from .rollouts import RolloutEngine, add_rollout_job, remove_rollout_engine
from .rollouts.engine import JOB_ID as ROLLOUT_JOB_ID
from .scheduler import DURABLE_JOBSTORE, create_scheduler, durable_jobstore
from .trust import load_trust

log = logging.getLogger(__name__)

#: how long start() waits for the broker before going on degraded
MQTT_READY_TIMEOUT_S = 10.0
API_READY_TIMEOUT_S = 10.0
API_STOP_TIMEOUT_S = 5.0
#: what stop() releases last, in this order: the attribute and its release method
#: (outbound MQTT first, then ingest, the database, and the API's socket)
_RELEASED_LAST: tuple[tuple[str, str], ...] = (
    ("publisher", "stop"),
    ("ingest", "stop"),
    ("engine", "dispose"),
    ("_sock", "close"),
)


class ControlPlane:
    """Start, serve and stop everything the control plane runs.

    ``start()`` returns once the API answers; a broker that cannot be reached
    yet is retried in the background (``/healthz`` says ``degraded``), but
    refused credentials fail the start, since retrying cannot fix them.

    Several control planes may share one database (replicas): each serves
    the API and its share of the ingest, and the one holding the leader
    lease also runs the rollout engine and the director's re-signing job
    (:mod:`controlplane.leader`). A lone control plane leads at once.
    """

    def __init__(
        self, settings: ControlPlaneSettings, *, rollout_tick_s: float | None = None,
        leader_lease_s: float | None = None, clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        #: the rollout engine's clock (bake times, decisions); tests set the time
        self.clock = clock or time.time
        #: the settings' figures unless given here (tests, the demo)
        self.rollout_tick_s = rollout_tick_s or settings.rollout_tick_s
        self.leader_lease_s = leader_lease_s or settings.leader_lease_s
        self.leader: LeaderElector | None = None
        self._durable_attached = False
        self._stopping = False
        self.rollouts: RolloutEngine | None = None
        self.engine: Engine | None = None
        self.ingest: MqttIngest | None = None
        self.publisher: DesiredPublisher | None = None
        self.director: Director | None = None
        self.scheduler: BackgroundScheduler | None = None
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self._port: int | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._started = False

    @property
    def api_url(self) -> str:
        """``http://host:port`` (``https://`` with api_tls_cert_file) of the running API."""
        if self._port is None:
            raise RuntimeError("the control plane is not running")
        host = self.settings.api_host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.settings.api_tls else "http"
        return f"{scheme}://{host}:{self._port}"

    def start(self) -> ControlPlane:
        """Migrate, connect, schedule and serve; return once the API answers."""
        with self._lock:
            if self._started:
                raise RuntimeError("the control plane is already started")
            self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def _engine_key(self) -> str:
        # The durable job names its engine by this key; one per control plane object.
        return f"cp-{id(self):x}"

    @property
    def public_url(self) -> str:
        """Base URL agents use for this API: ``public_url`` or the API's own address."""
        return self.settings.public_url or self.api_url

    def _start(self) -> None:
        settings = self.settings
        # Key files first: a misconfigured trust root should stop the start
        # before anything listens or touches the database.
        trust = load_trust(settings)
        if trust.release_keys is None:
            log.warning(
                "model registry off: set release_keys_file (see `slmfleet keys --help` "
                "and docs/models.md)"
            )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        artifacts = ArtifactStore(settings.artifacts_dir, settings.artifact_max_bytes).open()
        self.engine = make_engine(settings.database_url)
        upgrade_to_head(self.engine)
        sessions = session_factory(self.engine)
        # Bound before the director is built: its artifact URL names the port.
        sock = self._bind()

        self.ingest = MqttIngest(settings)
        self.ingest.start()
        if not self.ingest.wait_ready(MQTT_READY_TIMEOUT_S):
            log.warning(
                "broker %s not reachable yet; retrying in the background", settings.mqtt_url
            )

        # The durable job store is attached only while this replica leads (see
        # _on_leadership): a scheduler polling it would run the rollout job too.
        self.scheduler = create_scheduler()
        add_liveness_job(
            self.scheduler,
            self.engine,
            max_silence_s=settings.offline_after_s,
            interval_s=settings.liveness_check_interval_s,
        )
        if trust.director is not None:
            assert trust.release_keys is not None
            self.publisher = DesiredPublisher(settings, self.engine).start()
            self.director = Director(
                self.engine,
                trust.director,
                trust.release_keys,
                artifact_url_base=f"{self.public_url}/v1/artifacts",
                ttl_s=settings.assignment_ttl_s,
                on_change=self.publisher.kick,
            )
            # Rollouts need the director: without keys there is nothing to roll out.
            self.rollouts = RolloutEngine(self.engine, self.director, clock=self.clock)
        self.scheduler.start()
        self.leader = LeaderElector(LeaderLease(self.engine, ttl_s=self.leader_lease_s),
                                    self._on_leadership)
        self.leader.start()

        context = AppContext(
            settings,
            self.engine,
            sessions,
            self.ingest,
            trust=trust,
            artifacts=artifacts,
            director=self.director,
            is_leader=lambda: self.leader is not None and self.leader.is_leader,
            kick_rollouts=self._kick_rollouts,
        )
        self._serve(create_app(context), sock)
        log.info("control plane API at %s", self.api_url)

    def _kick_rollouts(self) -> None:
        """Run the rollout engine's tick now, if it runs in this replica.

        Elsewhere (another replica leads) the leader's next tick sees the
        change; an admin waits at most ``rollout_tick_s`` either way.
        """
        scheduler = self.scheduler
        if scheduler is None or not self._durable_attached:
            return
        try:
            job = scheduler.get_job(ROLLOUT_JOB_ID)
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))
        except Exception as exc:  # the API call succeeded; the tick comes anyway
            log.warning("could not bring the rollout tick forward: %s", exc)

    def _on_leadership(self, leading: bool) -> None:
        """Run (or stop running) the jobs only one replica may run at a time."""
        self._lead_retention(leading)
        scheduler, director, rollouts = self.scheduler, self.director, self.rollouts
        if scheduler is None or director is None or rollouts is None or self.engine is None:
            return
        if leading:
            epoch = self.leader.lease.epoch if self.leader is not None else 0
            log.info("leading the control planes (lease epoch %d): rollout engine and "
                     "re-signing run here", epoch)
            scheduler.add_jobstore(durable_jobstore(self.engine), DURABLE_JOBSTORE)
            self._durable_attached = True
            add_resign_job(scheduler, director, margin_s=self.settings.resign_margin,
                           interval_s=self.settings.resign_interval)
            add_rollout_job(scheduler, rollouts, interval_s=self.rollout_tick_s,
                            jobstore=DURABLE_JOBSTORE, key=self._engine_key)
            return
        # Expected on a clean stop; anywhere else the lease was lost (database
        # unreachable or too slow) and an operator may want to know.
        log.log(logging.INFO if self._stopping else logging.WARNING,
                "no longer leading: the rollout engine and re-signing stop here")
        if scheduler.get_job(RESIGN_JOB_ID) is not None:
            scheduler.remove_job(RESIGN_JOB_ID)
        if self._durable_attached:
            # shutdown=False: the store shares the control plane's engine. The
            # job row stays in the database for the next leader.
            scheduler.remove_jobstore(DURABLE_JOBSTORE, shutdown=False)
            self._durable_attached = False

    def _lead_retention(self, leading: bool) -> None:
        """Telemetry retention runs in the leader, with or without the registry's keys."""
        scheduler = self.scheduler
        if scheduler is None or self.engine is None:
            return
        if leading:
            add_retention_job(scheduler, self.engine, self.settings)
        elif scheduler.get_job(RETENTION_JOB_ID) is not None:
            scheduler.remove_job(RETENTION_JOB_ID)

    def _bind(self) -> socket.socket:
        # Bind here, not in uvicorn, so port 0 resolves before serving starts
        # and the chosen port is known without racing another process for it.
        family = socket.AF_INET6 if ":" in self.settings.api_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.api_host, self.settings.api_port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(
                f"cannot listen on {self.settings.api_host}:{self.settings.api_port}: {exc}"
            ) from exc
        self._port = sock.getsockname()[1]
        self._sock = sock
        return sock

    def _serve(self, app: object, sock: socket.socket) -> None:
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            log_config=None,  # leave logging to the process, not uvicorn's dictConfig
            access_log=False,
            lifespan="off",
            ssl_certfile=self.settings.api_tls_cert_file,
            ssl_keyfile=self.settings.api_tls_key_file,
        )
        server = uvicorn.Server(config)
        self._server = server
        # uvicorn installs signal handlers only on the main thread, so in this
        # thread it leaves SIGINT/SIGTERM to serve_forever().
        self._server_thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="api", daemon=True
        )
        self._server_thread.start()
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while not server.started:
            if not self._server_thread.is_alive():
                raise RuntimeError("the API server exited during start-up; see the log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start within {API_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the API, scheduler and ingest, then close the database. Idempotent."""
        server, self._server = self._server, None
        thread, self._server_thread = self._server_thread, None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(API_STOP_TIMEOUT_S)
            if thread.is_alive():
                server.force_exit = True  # type: ignore[union-attr]
                thread.join(API_STOP_TIMEOUT_S)
        self._stopping = True
        leader, self.leader = self.leader, None
        if leader is not None:
            # Hand over at once on a clean stop; a killed leader's lease runs out.
            leader.stop(release=True)
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=True)
        remove_rollout_engine(self._engine_key)
        self.rollouts = None
        self.director = None
        for attr, release in _RELEASED_LAST:
            # Detached before it is released, so a second stop() finds nothing.
            part = getattr(self, attr)
            setattr(self, attr, None)
            if part is not None:
                getattr(part, release)()
        self._port = None

    def serve_forever(self) -> None:
        """Start if needed, block until SIGINT or SIGTERM, then stop.

        Must run on the main thread (Python delivers signals there).
        """
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self._port is None:
                self.start()
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()
