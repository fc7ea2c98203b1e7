"""The inference benchmark's figures as a Markdown table, to paste into docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Mapping

Figures = Mapping[str, float | int | str]

#: (figure, target, key for the agent, key for llama-server, key for the comparison)
_PEER_ROWS = [
    ("1 caller, tokens/s", ">= 1.0x llama-server", "agent_1_caller_tokens_per_s",
     "llama_server_1_caller_tokens_per_s", "agent_over_llama_server_1_caller"),
    ("1 caller, TTFT ms", "within 10 ms", "agent_1_caller_ttft_ms",
     "llama_server_1_caller_ttft_ms", "agent_minus_llama_server_ttft_ms"),
    ("4 callers, aggregate tokens/s", ">= 0.95x llama-server", "agent_4_callers_tokens_per_s",
     "llama_server_4_callers_tokens_per_s", "agent_over_llama_server_4_callers"),
    ("4 callers, median TTFT ms", "-", "agent_4_callers_ttft_ms",
     "llama_server_4_callers_ttft_ms", None),
    ("4 callers / 1 caller, tokens/s", "agent >= 1.2", "agent_4_over_1",
     "llama_server_4_over_1", None),
    ("short request alone, p95 TTFT ms", "-", "agent_short_ttft_alone_p95_ms",
     "llama_server_short_ttft_alone_p95_ms", None),
    ("short request behind a long one, p95 TTFT ms", "-",
     "agent_short_ttft_behind_long_p95_ms", "llama_server_short_ttft_behind_long_p95_ms", None),
    ("behind a long one / alone", "agent <= 3", "agent_short_ttft_ratio",
     "llama_server_short_ttft_ratio", None),
    ("free text, tokens/s", "-", "agent_free_tokens_per_s", "llama_server_free_tokens_per_s",
     None),
    ("JSON grammar, tokens/s", "-", "agent_json_tokens_per_s", "llama_server_json_tokens_per_s",
     None),
    ("JSON / free text", "agent >= 0.8", "agent_json_over_free", "llama_server_json_over_free",
     None),
    ("RSS with 1 slot / 2 slots, MB", "-", ("agent_rss_1_slot_mb", "agent_rss_2_slots_mb"),
     ("llama_server_rss_1_slot_mb", "llama_server_rss_2_slots_mb"), None),
    ("second slot's RSS minus its KV cache, MB", "agent <= 20",
     "agent_second_slot_over_kv_mb", "llama_server_second_slot_over_kv_mb", None),
]

_FIRST_ROWS = [
    ("llama-cpp-python direct / through the local API, tokens/s", ">= 0.95",
     ("direct_tokens_per_s", "api_tokens_per_s"), "throughput_ratio"),
    ("TTFT direct / through the API, ms", "added <= 10", ("direct_ttft_ms", "api_ttft_ms"),
     "added_ttft_ms"),
    ("failed requests during the swap", "0", ("swap_failed_requests", "swap_requests"), None),
    ("p99 latency steady / during the swap, ms", "<= 2x", ("steady_p99_ms", "swap_p99_ms"),
     "swap_p99_over_steady"),
]


def _cell(figures: Figures, key: str | tuple[str, ...] | None) -> str:
    if key is None:
        return "-"
    keys = key if isinstance(key, tuple) else (key,)
    return " / ".join(str(figures.get(k, "n/a")) for k in keys)


def summary_table(figures: Figures) -> str:
    """Two tables: the agent's own figures, then the agent against llama-server."""
    lines: list[str] = []
    if "throughput_ratio" in figures:
        lines += ["| figure | target | measured | ratio |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {target} | {_cell(figures, pair)} | {_cell(figures, ratio)} |"
                  for name, target, pair, ratio in _FIRST_ROWS]
    if "slots" in figures or "kv_cache_per_slot_mb" in figures:
        if "slots" in figures:
            lines += ["", f"{figures['slots']} slots for the agent and llama-server alike"]
        lines += ["", "| figure | target | agent | llama-server | agent vs llama-server |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {target} | {_cell(figures, agent)} | {_cell(figures, peer)} "
                  f"| {_cell(figures, versus)} |"
                  for name, target, agent, peer, versus in _PEER_ROWS]
    if "kv_cache_per_slot_mb" in figures:
        lines.append(f"KV cache per slot: {_cell(figures, 'kv_cache_per_slot_mb')} MB from "
                     f"the GGUF, {_cell(figures, 'llama_server_kv_cache_per_slot_mb')} MB in "
                     "llama.cpp's log")
    lines.append(f"load average (1 min) at the end: {_cell(figures, 'load_average_1m')}")
    return "\n".join(lines)
