"""Ingest throughput: simulated devices' telemetry (QoS 1) through the real
broker into SQLite, against the raw paho receive rate of the same stream.

N devices, each with its own broker credentials (ACLs on), publish K
telemetry messages each. Two consumers hold persistent MQTT v5 sessions on
the broker: the control plane's ingest (validate, batch, write to SQLite)
and a bare paho subscriber that only counts. Both are offline while the
devices publish, so the broker queues the same stream for each; then each
drains its queue alone on the machine. On 2 cores this keeps the Python
publishers from stealing the consumers' CPU, and measures what each
consumer can sustain, which is what a control plane restarting into a
backlog, or a fleet at peak, asks of it. ``INGEST_ROUNDS`` rounds (3) of
that, each with new sequence numbers; the figures are medians, the ratio
taken within each round, so a machine whose speed drifts between runs
weighs on both sides alike.
Targets: >= 5,000 msg/s ingested, ratio vs raw paho >= 0.7.

``INGEST_REPLICAS=N`` adds the same drain by N control-plane replicas, each
in a process of its own, on one PostgreSQL database (installed and started
by the test support), splitting the stream through an MQTT v5 shared
subscription: the broker queues each replica's share while they are
offline, then all of them start at once. Its figure is every row written
over the time from the first message any replica received to the last row
any replica wrote. Target: >= 10,000 msg/s with two replicas.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from _common import report, scratch_broker
from _roles import INGEST_REPLICA_PREFIX, RoleCpu, cpu_by_role
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEVICES = 200
PER_DEVICE = 150
PUBLISHERS = 2
TIMEOUT_S = 180.0
SESSION_EXPIRY_S = 3600
RAW_CLIENT_ID = "bench-raw-counter"
INGEST_CLIENT_ID = "bench-controlplane"
#: rounds of publish, raw drain, ingest drain; the figures are their medians (a
#: ratio is taken within each round, raw and ingest measured back to back)
ROUNDS = int(os.environ.get("INGEST_ROUNDS", "3"))
#: control-plane replicas for the shared-subscription drain on PostgreSQL; 0: skip it
REPLICAS = int(os.environ.get("INGEST_REPLICAS", "0"))
SHARED_GROUP = "slmfleet-cp"
#: a replica has drained when its written count stood still this long
SETTLED_S = 3.0

#: One replica. argv: root, data dir, broker URL, user, password, database URL,
#: client id, mode. "prepare" opens the persistent shared-subscription session and
#: leaves; "drain" starts, waits for "go" on stdin, and once its writes stand
#: still prints {"first", "last", "written"} (monotonic clock, shared by every
#: process on the machine).
REPLICA = """
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from controlplane.config import ControlPlaneSettings
from controlplane.service import ControlPlane
root, data, url, user, password, db, client_id, mode, group, settled = sys.argv[1:11]
settings = ControlPlaneSettings(
    data_dir=Path(data), mqtt_url=url, mqtt_username=user, mqtt_password=password,
    api_port=0, database_url=db, mqtt_client_id=client_id, mqtt_session_expiry_s=3600,
    mqtt_shared_group=group,
)
if mode == "prepare":
    ControlPlane(settings).start().stop()
    print("ok", flush=True)
    raise SystemExit
sys.stdin.readline()
cp = ControlPlane(settings)
stamp = []
def watch_first():
    # Started before the control plane: its start-up may outlast the first messages.
    while cp.ingest is None or cp.ingest.stats().received == 0:
        time.sleep(0.0005)
    stamp.append(time.monotonic())
threading.Thread(target=watch_first, daemon=True).start()
cp.start()
last, written = time.monotonic(), 0
deadline = last + 180  # bounded even if nothing ever arrives
while (time.monotonic() - last < float(settled) or not written) and time.monotonic() < deadline:
    now_written = cp.ingest.stats().written
    if now_written != written:
        written, last = now_written, time.monotonic()
    time.sleep(0.002)
cp.stop()
print(json.dumps({"first": stamp[0] if stamp else last, "last": last, "written": written}),
      flush=True)
"""


def _telemetry(device_id: str, seq: int) -> bytes:
    from protocol import InferenceStats, Telemetry, encode

    return encode(Telemetry(
        device_id=device_id, ts=time.time(), seq=seq, uptime_s=seq * 30.0,
        cpu_percent=12.5, ram_used_bytes=512 << 20, temp_c=48.0, active_model="smollm2@1.0.0",
        inference=[InferenceStats(model="smollm2", version="1.0.0", requests=20, tokens=900,
                                  ttft_p50_ms=35.0, ttft_p95_ms=60.0, latency_p50_ms=400.0,
                                  latency_p95_ms=700.0, tokens_per_s=85.0)],
    ))


def publisher(host: str, port: int, creds: list[tuple[str, str]], per_device: int,
              first_seq: int, start: mp.Event, done: mp.Queue) -> None:
    """Connect every device of this share, then publish round-robin at full speed."""
    clients = []
    for device_id, password in creds:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(device_id, password)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.connect(host, port)
        c.loop_start()
        clients.append((device_id, c))
    payloads = {d: [_telemetry(d, first_seq + s) for s in range(per_device)]
                for d, _ in clients}
    start.wait()
    infos = []
    for seq in range(per_device):
        for device_id, c in clients:
            infos.append(c.publish(f"slmfleet/v1/dev/{device_id}/telemetry",
                                   payloads[device_id][seq], qos=1))
    for info in infos:
        info.wait_for_publish(timeout=TIMEOUT_S)
    for _, c in clients:
        c.disconnect()
        c.loop_stop()
    done.put(len(infos))


class RawCounter:
    """A bare paho subscriber: counts telemetry messages, nothing else."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.count = 0
        self.first = self.last = 0.0
        self.host, self.port = host, port
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=RAW_CLIENT_ID,
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.on_message = self._on_message

    def connect(self, subscribe: bool) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.c.connect(self.host, self.port, clean_start=subscribe, properties=props)
        if subscribe:
            self.c.subscribe("slmfleet/v1/dev/+/telemetry", qos=1)
        self.c.loop_start()

    def disconnect(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def _on_message(self, *_args) -> None:
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now


def publish_all(broker, devices: list[str], first_seq: int = 0) -> float:
    """Every device publishes its share (sequence numbers from ``first_seq``);
    returns the publish rate (msg/s)."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    shares = [devices[i::PUBLISHERS] for i in range(PUBLISHERS)]
    procs = [ctx.Process(target=publisher, args=(broker.host, broker.port,
                                                  [(d, broker.users[d]) for d in share],
                                                  PER_DEVICE, first_seq, start, done))
             for share in shares]
    for p in procs:
        p.start()
    time.sleep(3.0)  # let every device connect before the clock starts
    t0 = time.monotonic()
    start.set()
    try:
        published = sum(done.get(timeout=TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return published / (time.monotonic() - t0)


def replica(root: Path, data: Path, broker, database_url: str, client_id: str,
            mode: str) -> subprocess.Popen[str]:
    """A control-plane replica in a process of its own (see :data:`REPLICA`)."""
    from controlplane.broker_auth import CONTROL_PLANE_USER

    return subprocess.Popen(
        [sys.executable, "-c", REPLICA, str(root), str(data), broker.url, CONTROL_PLANE_USER,
         broker.users[CONTROL_PLANE_USER], database_url, client_id, mode, SHARED_GROUP,
         str(SETTLED_S)],
        cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def replicas_drain(broker, devices: list[str], count: int) -> dict[str, float | int]:
    """``count`` replicas on PostgreSQL drain one queued stream through a shared subscription."""
    from tests.support.postgres import PostgresCluster

    root = Path(__file__).resolve().parents[1]
    total = len(devices) * PER_DEVICE
    postgres = PostgresCluster().start()
    try:
        url = postgres.create_database("ingest")
        work = Path(tempfile.mkdtemp(prefix="slmfleet-ingest-replicas-"))
        ids = [f"{INGEST_REPLICA_PREFIX}{i}" for i in range(count)]
        for client_id in ids:
            proc = replica(root, work / client_id, broker, url, client_id, "prepare")
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise SystemExit(f"replica {client_id} did not start: {out}")
        print(f"{count} replica(s) on PostgreSQL subscribed to $share/{SHARED_GROUP}/... "
              f"and offline; publishing {total} messages again", flush=True)
        publish_all(broker, devices)
        procs = [replica(root, work / client_id, broker, url, client_id, "drain")
                 for client_id in ids]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        roles = RoleCpu(broker.data_dir, postgres.root / "data")
        before, t0 = roles.snapshot(), time.monotonic()
        with MachineCpu() as cpu:
            for proc in procs:
                out, _ = proc.communicate(timeout=TIMEOUT_S)
                results.append(json.loads(out.strip().splitlines()[-1]))
        # Over the drain and the replicas' settling after it (SETTLED_S idle).
        per_role = cpu_by_role(before, roles.snapshot(), time.monotonic() - t0)
    finally:
        postgres.stop()
    written = sum(r["written"] for r in results)
    first, last = min(r["first"] for r in results), max(r["last"] for r in results)
    rate = written / (last - first)
    busy = cpu.busy_pct(first, last)
    shares = ", ".join(str(r["written"]) for r in results)
    print(f"{count} replica(s) wrote {written} of {total} rows ({shares}) in "
          f"{last - first:.2f} s ({rate:,.0f} msg/s); machine CPU {busy:.0f} % of "
          f"{100 * (psutil.cpu_count() or 1)}", flush=True)
    print(f"  CPU by role over the drain, % of one core: {per_role}", flush=True)
    return {**{f"replicas{count}_pg_cpu_pct_{role}": pct for role, pct in per_role.items()},
            f"replicas{count}_pg_ingest_msgs_per_s": round(rate),
            f"replicas{count}_pg_written": written,
            f"replicas{count}_pg_machine_cpu_pct": round(busy, 1)}


class MachineCpu:
    """Samples the machine's busy CPU time every 0.1 s, to read it back over any window."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MachineCpu:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            t = psutil.cpu_times()
            self._samples.append((time.monotonic(), t.user + t.nice + t.system + t.irq
                                  + t.softirq + t.steal))
            if self._stop.wait(0.1):
                return

    def busy_pct(self, start: float, end: float) -> float:
        """Busy CPU over [start, end] (monotonic) as % of one core, from the nearest samples."""
        a = min(self._samples, key=lambda s: abs(s[0] - start))
        b = min(self._samples, key=lambda s: abs(s[0] - end))
        return 100 * (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else 0.0


def drain_raw(raw: RawCounter, total: int) -> float:
    """The bare subscriber drains its queue alone; its receive rate (msg/s)."""
    raw.count = 0
    raw.connect(subscribe=False)
    deadline = time.monotonic() + TIMEOUT_S
    while raw.count < total and time.monotonic() < deadline:
        time.sleep(0.01)
    raw.disconnect()
    elapsed = raw.last - raw.first
    print(f"  raw paho drained {raw.count} in {elapsed:.2f} s ({raw.count / elapsed:,.0f} msg/s)",
          flush=True)
    return raw.count / elapsed


def drain_ingest(settings, total: int) -> tuple[float, int]:
    """The control plane's ingest drains the same stream into SQLite; (msg/s, rows).

    The clock starts at its first message, not at process start-up.
    """
    from controlplane.service import ControlPlane

    cp = ControlPlane(settings)
    first = threading.Event()
    stamp: list[float] = []

    def watch_first() -> None:
        while cp.ingest is None or cp.ingest.stats().received == 0:
            time.sleep(0.0005)
        stamp.append(time.monotonic())
        first.set()

    threading.Thread(target=watch_first, daemon=True).start()
    cp.start()
    try:
        settled = cp.ingest.flush(timeout=TIMEOUT_S, received_at_least=total)
        first.wait(5)
        elapsed = time.monotonic() - stamp[0]
        stats = cp.ingest.stats()
    finally:
        cp.stop()
    rate = stats.written / elapsed
    print(f"  ingest validated and wrote {stats.written} rows in {elapsed:.2f} s "
          f"({rate:,.0f} msg/s), rejected {stats.rejected_total}, {stats.batches} batches, "
          f"settled={settled}", flush=True)
    return rate, stats.written


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from controlplane.broker_auth import CONTROL_PLANE_USER
    from controlplane.config import ControlPlaneSettings
    from controlplane.service import ControlPlane

    devices = [f"bench-{i:05d}" for i in range(DEVICES)]
    total = DEVICES * PER_DEVICE
    broker = scratch_broker(devices)
    cp_pw = broker.users[CONTROL_PLANE_USER]
    settings = ControlPlaneSettings(
        data_dir=Path(tempfile.mkdtemp(prefix="slmfleet-ingest-")), mqtt_url=broker.url,
        mqtt_username=CONTROL_PLANE_USER, mqtt_password=cp_pw, api_port=0,
        mqtt_client_id=INGEST_CLIENT_ID, mqtt_session_expiry_s=SESSION_EXPIRY_S,
    )
    try:
        # Both consumers open persistent sessions, then go offline.
        ControlPlane(settings).start().stop()
        raw = RawCounter(broker.host, broker.port, CONTROL_PLANE_USER, cp_pw)
        raw.connect(subscribe=True)
        raw.subscribed.wait(10)
        raw.disconnect()
        rounds: list[dict[str, float]] = []
        written = 0
        for r in range(ROUNDS):
            # The fleet publishes (new sequence numbers each round: every row is
            # new); the broker queues it for both sessions; each drains alone.
            print(f"round {r + 1}/{ROUNDS}: {DEVICES} devices x {PER_DEVICE} telemetry "
                  f"messages = {total} (QoS 1)", flush=True)
            pub_rate = publish_all(broker, devices, first_seq=r * PER_DEVICE)
            print(f"  published at {pub_rate:,.0f} msg/s; both consumers offline, "
                  "broker queued it", flush=True)
            raw_rate = drain_raw(raw, total)
            ingest_rate, round_written = drain_ingest(settings, total)
            written += round_written
            rounds.append({"raw": raw_rate, "ingest": ingest_rate, "pub": pub_rate,
                           "ratio": ingest_rate / raw_rate})
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"median of {ROUNDS} rounds: ingest {med['ingest']:,.0f} msg/s, raw paho "
              f"{med['raw']:,.0f} msg/s, ratio {med['ratio']:.3f} (per round: "
              + ", ".join(f"{r['ratio']:.3f}" for r in rounds) + ")", flush=True)
        figures: dict[str, float | int | list[float]] = {}
        if REPLICAS:
            figures = replicas_drain(broker, devices, REPLICAS)
        report({
            **figures,
            "ingest_msgs_per_s": round(med["ingest"]),
            "raw_paho_msgs_per_s": round(med["raw"]),
            "ratio_vs_raw": round(med["ratio"], 3),
            "ratio_vs_raw_per_round": [round(r["ratio"], 3) for r in rounds],
            "publish_msgs_per_s": round(med["pub"]),
            "messages_per_round": total,
            "written": written,
            "rounds": ROUNDS,
            "devices": DEVICES,
        })
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
