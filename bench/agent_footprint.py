"""Agent footprint: RSS and CPU after 60 s idle, connected, no model loaded.

Runs the real `slmfleet agent run` against a private Mosquitto with the real
hardware probe. For scale it also measures, in the same run, a bare Python
interpreter sleeping for the same time (the floor any Python agent pays).
Targets: RSS <= 40 MB, CPU <= 1 %.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import report, scratch_broker

IDLE_S = 60.0
DEVICE = "footprint-dev"


def measure(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """(RSS MB at the end, CPU % averaged over ``seconds``)."""
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    cpu = (after.user + after.system - before.user - before.system) / seconds * 100
    return proc.memory_info().rss / 1e6, cpu


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.agents import AgentProcess, write_agent_config

    broker = scratch_broker([DEVICE])
    work = Path(tempfile.mkdtemp(prefix="slmfleet-footprint-"))
    config = write_agent_config(work, DEVICE, broker.url, broker.users[DEVICE],
                                heartbeat_interval_s=30.0, log_level="INFO")
    agent = AgentProcess(config)
    baseline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        deadline = time.monotonic() + 20
        while "connected to" not in agent.log():
            if time.monotonic() > deadline or agent.proc.poll() is not None:
                raise SystemExit(f"agent did not connect:\n{agent.log()}")
            time.sleep(0.1)
        print(f"agent connected; idling {IDLE_S:.0f} s (one heartbeat every 30 s)...", flush=True)
        proc = psutil.Process(agent.pid)
        base = psutil.Process(baseline.pid)
        base_cpu0 = base.cpu_times()
        rss_mb, cpu_pct = measure(proc, IDLE_S)
        base_cpu1 = base.cpu_times()
        base_rss = base.memory_info().rss / 1e6
        base_used = base_cpu1.user + base_cpu1.system - base_cpu0.user - base_cpu0.system
        base_cpu = base_used / IDLE_S * 100
        print(f"agent: RSS {rss_mb:.1f} MB, CPU {cpu_pct:.2f} %  (target <= 40 MB, <= 1 %)")
        print(f"bare python: RSS {base_rss:.1f} MB, CPU {base_cpu:.2f} %")
        report({
            "agent_rss_mb": round(rss_mb, 1),
            "agent_cpu_percent": round(cpu_pct, 3),
            "bare_python_rss_mb": round(base_rss, 1),
            "agent_rss_over_bare_python": round(rss_mb / base_rss, 2),
            "idle_s": IDLE_S,
        })
    finally:
        baseline.kill()
        agent.stop()
        broker.stop()


if __name__ == "__main__":
    main()
