"""The resident memory a second decoding slot adds, against the KV cache it needs.

The worker's RSS (``VmRSS``) with one slot and with two, each after the
same warm-up (two callers at once, 128 tokens each), minus the KV cache one
slot needs: a second slot should cost its KV cache plus a little, not a
second copy of the weights. llama-server with ``-np 1`` and ``-np 2``
is measured the same way, and its log line ``llama_kv_cache: size = N
MiB`` cross-checks the KV size computed from the GGUF.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import llama_server
from _agent import CONTEXT, MODEL, THREADS, serving, spec, worker_pid
from concurrency import concurrent

MIB = 1024 * 1024


def kv_cache_bytes(model: Path, context: int) -> int:
    """One slot's K and V at f16 (llama.cpp's default): layers x context x KV heads x head dim."""
    import llama_cpp

    meta = llama_cpp.Llama(str(model), vocab_only=True, verbose=False).metadata
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    kv_heads = int(meta[f"{arch}.attention.head_count_kv"])
    heads = int(meta[f"{arch}.attention.head_count"])
    head_dim = int(meta.get(f"{arch}.attention.key_length")
                   or int(meta[f"{arch}.embedding_length"]) // heads)
    return 2 * layers * context * kv_heads * head_dim * 2  # K and V, 2 bytes each


def vm_rss(pid: int) -> int:
    """Resident bytes of ``pid`` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _warm(url: str, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await concurrent(client, 2, max_tokens)


async def agent_rss(parallel: int, max_tokens: int) -> int:
    """The agent's worker RSS with ``parallel`` slots, after the warm-up."""
    async with serving(spec("1.0.0", parallel)) as (runtime, url):
        await _warm(url, max_tokens)
        return vm_rss(worker_pid(runtime))


async def server_rss(slots: int, max_tokens: int, binary: Path) -> tuple[int, float]:
    """llama-server's RSS with ``slots`` slots after the warm-up, and its KV cache (MiB)."""
    settings = llama_server.ServerSettings(MODEL, THREADS, slots=slots, context=CONTEXT,
                                           log_verbosity=4)
    with llama_server.running(settings, binary) as server:
        await _warm(server.url, max_tokens)
        return vm_rss(server.pid), server.kv_cache_mib()


async def slot_memory(max_tokens: int, binary: Path) -> dict[str, float | str]:
    """RSS added by a second slot, for the agent and llama-server, in MB (10^6 bytes)."""
    kv = kv_cache_bytes(MODEL, CONTEXT)
    one, one_kv = await server_rss(1, max_tokens, binary)
    two, _ = await server_rss(2, max_tokens, binary)
    figures: dict[str, float | str] = {
        "kv_cache_per_slot_mb": round(kv / 1e6, 1),
        "llama_server_kv_cache_per_slot_mb": round(one_kv * MIB / 1e6, 1),
        "llama_server_rss_1_slot_mb": round(one / 1e6, 1),
        "llama_server_rss_2_slots_mb": round(two / 1e6, 1),
        "llama_server_second_slot_over_kv_mb": round((two - one - kv) / 1e6, 1),
    }
    one = await agent_rss(1, max_tokens)
    two = await agent_rss(2, max_tokens)
    figures |= {"agent_rss_1_slot_mb": round(one / 1e6, 1),
                "agent_rss_2_slots_mb": round(two / 1e6, 1),
                "agent_second_slot_over_kv_mb": round((two - one - kv) / 1e6, 1)}
    return figures
