"""The adapter part of ``bench/update.py``: moving a device to a new LoRA adapter
against a full model update, and applying an adapter against loading the base.

Part A, end to end with real parts: one real agent serving the real
SmolLM2-135M (``smollm2-135m@1.1.0``) on its local API, the real LoRA adapter
of ``scripts/build-lora-adapter.py``. Each round publishes a set naming the
base and a new adapter version (the adapter downloads, is checked with its
golden prompt applied on the base's worker, and activates), then a set
naming a new base version (the whole model downloads, loads in a new
worker, is checked and swapped in). Clock: publish to ``activated``; bytes:
what the artifact server sent.

Part B, in one process: a worker serving the base; the time the worker
takes to load an adapter file (``llama_adapter_lora_init``; activation is
then a pointer in the agent), against the time a fresh worker takes to load
the base (process start and model load, what a full update or a
``lora_path`` reload pays).

Part C, in one process: the example evaluation set scored on the base alone
and with the adapter applied, in one worker, as the device's check scores
an adapter release for its quality gate.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import scratch_broker

DEVICE = "bench-adapter"
BASE = "smollm2-135m"
ROUNDS = 3
APPLY_ROUNDS = 5
#: the evaluation set of part C (the demo's)
EVAL_SET = Path(__file__).resolve().parents[1] / "examples" / "smollm2.eval.json"


def _adapter_set(rig: Any, server: Any, adapter: Any, model: Path, base_version: str,
                 adapter_version: str | None) -> tuple[bytes, str]:
    from protocol import HealthCheck
    from tests.support.adapters import adapter_of, adapter_variant
    from tests.support.updates import PASSING_PROMPTS, sign_set, variant_for

    sequence = rig.next_sequence()
    # No speed floor: on a busy machine a base check could fail on speed alone.
    check = HealthCheck(golden_prompts=list(PASSING_PROMPTS), max_ttft_ms=60_000.0)
    releases = {BASE: rig.release(base_version, variant_for(model, f"base-{base_version}.gguf",
                                                            health_check=check))}
    ids = {BASE: f"{BASE}-{base_version}"}
    if adapter_version is not None:
        variant = adapter_variant(sha256=adapter.sha256, size_bytes=adapter.size_bytes,
                                  artifact="adapter.gguf", prompt=adapter.prompt,
                                  expected=adapter.expected)
        releases["support-formal"] = rig.release(adapter_version, variant, name="support-formal",
                                                 adapter_of=adapter_of(adapter.base_sha256))
        ids["support-formal"] = f"adapter-{adapter_version}"
    rig.sim.now = time.time()
    payload = sign_set(rig.sim, rig.device_id, releases, sequence=sequence,
                       artifact_url_base=server.base_url, ids=ids)
    return payload, ids["support-formal" if adapter_version else BASE]


def _timed(rig: Any, server: Any, payload: bytes, aid: str) -> tuple[float, int]:
    import protocol as p

    sent = server.bytes_sent()
    started = time.monotonic()
    rig.publish(payload)
    final = rig.wait_final(aid, timeout=300)
    elapsed = time.monotonic() - started
    if final.type != p.EventType.ACTIVATED:
        raise SystemExit(f"{aid}: {final.type.value}: {final.reason}")
    return elapsed, server.bytes_sent() - sent


def fleet_move(work: Path, model: Path) -> dict[str, float]:
    """Part A: (seconds, bytes) of an adapter move and of a full model update, medians."""
    from controlplane.broker_auth import CONTROL_PLANE_USER
    from tests.support.adapters import built_adapter
    from tests.support.http_artifacts import ArtifactServer
    from tests.support.inference import ready_url
    from tests.support.signer import TrustSimulator
    from tests.support.updates import DeviceRig, link_or_copy, seed_active

    adapter = built_adapter(model)
    broker = scratch_broker([DEVICE])
    served = work / "adapter-artifacts"
    link_or_copy(adapter.path, served / "adapter.gguf")
    for i in range(ROUNDS + 1):
        link_or_copy(model, served / f"base-1.{i + 1}.0.gguf")
    moves: list[tuple[float, int]] = []
    updates: list[tuple[float, int]] = []
    try:
        with ArtifactServer(served) as server:
            rig = DeviceRig(work / DEVICE, broker,
                            (CONTROL_PLANE_USER, broker.users[CONTROL_PLANE_USER]),
                            DEVICE, broker.users[DEVICE], server, TrustSimulator(),
                            api_port=0)
            seed_active(rig.state_dir / "models", BASE, "1.1.0", model)
            try:
                rig.start()
                ready_url(rig)
                for i in range(ROUNDS):
                    base = f"1.{i + 1}.0"
                    payload, aid = _adapter_set(rig, server, adapter, model, base, f"1.0.{i}")
                    moves.append(_timed(rig, server, payload, aid))
                    payload, aid = _adapter_set(rig, server, adapter, model, f"1.{i + 2}.0",
                                                None)
                    updates.append(_timed(rig, server, payload, aid))
                    print(f"round {i + 1}/{ROUNDS}: adapter {moves[-1][0]:.2f} s, "
                          f"{moves[-1][1] / 1e6:.2f} MB; full model {updates[-1][0]:.2f} s, "
                          f"{updates[-1][1] / 1e6:.1f} MB", flush=True)
            finally:
                rig.close()
    finally:
        broker.stop()
    move_s, move_b = statistics.median(m[0] for m in moves), statistics.median(m[1] for m in moves)
    full_s = statistics.median(u[0] for u in updates)
    full_b = statistics.median(u[1] for u in updates)
    return {"adapter_move_s": round(move_s, 3), "adapter_move_mb": round(move_b / 1e6, 3),
            "full_update_s": round(full_s, 3), "full_update_mb": round(full_b / 1e6, 1),
            "adapter_bytes_ratio": round(move_b / full_b, 4)}


async def _apply_vs_load(model: Path, adapter_path: Path) -> tuple[list[float], list[float]]:
    from agent.inference.spec import ModelSpec
    from agent.inference.supervisor import Worker
    from agent.runtime_settings import EffectiveRuntime

    runtime = EffectiveRuntime(threads=2, gpu_layers=0, batch=None, context=2048, mmap=True,
                               embeddings=False, parallel=1)
    spec = ModelSpec(f"{BASE}@1.1.0-micro", BASE, "1.1.0", "gguf", model, runtime)
    apply_ms: list[float] = []
    load_s: list[float] = []
    serving = Worker(spec)
    await serving.start(120)
    try:
        for i in range(APPLY_ROUNDS):
            started = time.perf_counter()
            await serving.call("adapter_load", {"name": f"a{i}", "path": str(adapter_path),
                                                "scale": 1.0})
            apply_ms.append((time.perf_counter() - started) * 1000)
            await serving.call("adapter_drop", {"name": f"a{i}"})
            fresh = Worker(spec)
            started = time.perf_counter()
            await fresh.start(120)
            load_s.append(time.perf_counter() - started)
            await fresh.stop()
            print(f"apply round {i + 1}/{APPLY_ROUNDS}: adapter {apply_ms[-1]:.1f} ms, "
                  f"base in a fresh worker {load_s[-1]:.2f} s", flush=True)
    finally:
        await serving.stop()
    return apply_ms, load_s


def apply_vs_reload(model: Path) -> dict[str, float]:
    """Part B: milliseconds to apply an adapter against seconds to load the base, medians."""
    from tests.support.adapters import built_adapter

    adapter = built_adapter(model)
    apply_ms, load_s = asyncio.run(_apply_vs_load(model, adapter.path))
    return {"adapter_apply_ms": round(statistics.median(apply_ms), 1),
            "base_reload_s": round(statistics.median(load_s), 3),
            "adapter_file_mb": round(adapter.size_bytes / 1e6, 2)}


async def _scores_with_and_without(model: Path, adapter_path: Path,
                                   eval_file: Path) -> dict[str, dict[str, Any]]:
    from agent.healthcheck.evaluation import eval_request, score_in_worker
    from agent.inference.spec import ModelSpec
    from agent.inference.supervisor import Worker
    from agent.runtime_settings import EffectiveRuntime
    from protocol import EvalSet

    items = EvalSet.model_validate_json(eval_file.read_bytes())
    request = eval_request(items, time_budget_s=3600.0)
    runtime = EffectiveRuntime(threads=2, gpu_layers=0, batch=None, context=2048, mmap=True,
                               embeddings=False, parallel=1)
    worker = Worker(ModelSpec(f"{BASE}@1.1.0-micro", BASE, "1.1.0", "gguf", model, runtime))
    await worker.start(120)
    try:
        await worker.call("adapter_load", {"name": "support-formal@1.0.0",
                                           "path": str(adapter_path), "scale": 1.0})

        async def applied(op: str, payload: dict[str, Any]) -> dict[str, Any]:
            return await worker.call(op, {**payload, "adapter": "support-formal@1.0.0"})

        return {"base": await score_in_worker(worker.call, request),
                "adapter": await score_in_worker(applied, request)}
    finally:
        await worker.stop()


def adapter_eval(model: Path, eval_file: Path) -> dict[str, float]:
    """Part C: the evaluation set's score on the base alone and with the adapter applied
    (what an adapter release's quality gate compares on a device), and the time per item."""
    from tests.support.adapters import built_adapter

    adapter = built_adapter(model)
    scores = asyncio.run(_scores_with_and_without(model, adapter.path, eval_file))
    for role, s in scores.items():
        print(f"eval {role}: {s['score']:.3f} ({s['passed']}/{s['total']}) in "
              f"{s['elapsed_s']:.1f} s", flush=True)
    base, adapted = scores["base"], scores["adapter"]
    return {"eval_base_score": base["score"], "eval_adapter_score": adapted["score"],
            "eval_items": base["total"],
            "eval_base_item_s": round(base["elapsed_s"] / base["total"], 3),
            "eval_adapter_item_s": round(adapted["elapsed_s"] / adapted["total"], 3)}


def adapter_figures(work: Path, model: Path) -> dict[str, float]:
    """The three parts, as the figures ``bench/update.py`` reports."""
    figures = fleet_move(work, model)
    figures |= apply_vs_reload(model)
    figures |= adapter_eval(model, EVAL_SET)
    print("adapter: " + json.dumps(figures), flush=True)
    return figures
