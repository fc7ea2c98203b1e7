"""ONNX (onnxruntime-genai) inference through the agent's local API against
onnxruntime-genai called directly, and the ONNX int4 build against the GGUF Q4_1.

Same model folder (the int4 SmolLM2-135M that scripts/build-onnx-genai.sh
builds from the test GGUF), same threads, same prompt, same run:
onnxruntime-genai in this process (greedy, streamed token by token) and the
agent's runtime (a real worker subprocess) behind its real local API,
streamed over HTTP, round for round in turn. Then the two builds of the
model side by side through the API, and each called directly (llama-cpp-python
for the GGUF): decode tokens/s, TTFT, and the serving worker's resident memory.

Targets: API/direct throughput ratio >= 0.95, added TTFT <= 10 ms.
Progress lines first; the last line is the figures as one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psutil
from _agent import MODEL as GGUF
from _agent import THREADS, serving, worker_pid
from _agent import spec as gguf_spec
from _common import report
from concurrency import chat_body, stream_chat
from inference import direct_round

from agent.inference.spec import ModelSpec
from tests.support.genai import onnx_genai_path, runtime

PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 64
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 15))
CONTEXT = 2048


def onnx_spec(folder: Path, version: str) -> ModelSpec:
    """The ONNX build as the benchmark's model (``smollm2``, what chat_body asks for)."""
    return ModelSpec(f"smollm2@{version}-onnx", "smollm2", version, "onnx", folder,
                     runtime(threads=THREADS, context=CONTEXT))


class Direct:
    """onnxruntime-genai in this process, configured as the worker configures it."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.clear_providers()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": THREADS, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)

    def round(self) -> tuple[float, float]:
        """One greedy chat answer, timed per token: (tokens/s after the first, TTFT ms)."""
        og, tokenizer = self.og, self.tokenizer
        start = time.perf_counter()
        text = tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": PROMPT}]), add_generation_prompt=True)
        tokens = tokenizer.encode(text)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(tokens) + MAX_TOKENS, do_sample=False)
        generator = og.Generator(self.model, params)
        stream = tokenizer.create_stream()
        generator.append_tokens(tokens)
        stamps = []
        while not generator.is_done() and len(stamps) < MAX_TOKENS:
            generator.generate_next_token()
            if stream.decode(int(generator.get_next_tokens()[0])):
                stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), (stamps[0] - start) * 1000


async def api_round(client: httpx.AsyncClient) -> tuple[float, float]:
    """The same answer streamed through the local API."""
    streamed = await stream_chat(client, chat_body(PROMPT, MAX_TOKENS))
    return streamed.decode_rate, streamed.ttft_ms


def _medians(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.median(r for r, _ in rounds), statistics.median(t for _, t in rounds))


async def measure(model: ModelSpec, direct: Any) -> dict[str, float]:
    """Median (tokens/s, TTFT) of ``direct()`` and of the API serving ``model``, alternated
    so drift on a shared machine falls on both alike; and the worker's RSS."""
    async with serving(model) as (rt, url), \
            httpx.AsyncClient(base_url=url, timeout=120) as client:
        # One round each first, not counted: a fresh session's first run is slower.
        direct()
        await api_round(client)
        direct_rounds, api_rounds = [], []
        for _ in range(ROUNDS):
            direct_rounds.append(direct())
            api_rounds.append(await api_round(client))
        rss = psutil.Process(worker_pid(rt)).memory_info().rss
    (d_rate, d_ttft), (a_rate, a_ttft) = _medians(direct_rounds), _medians(api_rounds)
    return {"direct_tokens_per_s": round(d_rate, 1), "direct_ttft_ms": round(d_ttft, 1),
            "api_tokens_per_s": round(a_rate, 1), "api_ttft_ms": round(a_ttft, 1),
            "throughput_ratio": round(a_rate / d_rate, 3),
            "added_ttft_ms": round(a_ttft - d_ttft, 1), "worker_rss_mb": round(rss / 2**20, 1)}


async def run_all(folder: Path) -> dict[str, Any]:
    """The ONNX figures, then the GGUF's, one after the other so that no two measure at once."""
    import llama_cpp

    figures: dict[str, Any] = {}
    direct = Direct(folder)
    onnx = await measure(onnx_spec(folder, "1.0.0"), direct.round)
    del direct
    print(f"onnx int4: direct {onnx['direct_tokens_per_s']} tokens/s TTFT "
          f"{onnx['direct_ttft_ms']} ms; API {onnx['api_tokens_per_s']} tokens/s TTFT "
          f"{onnx['api_ttft_ms']} ms (ratio {onnx['throughput_ratio']}, TTFT "
          f"{onnx['added_ttft_ms']:+} ms), worker {onnx['worker_rss_mb']} MB", flush=True)
    figures |= {f"onnx_{k}": v for k, v in onnx.items()}
    llm = llama_cpp.Llama(model_path=str(GGUF), n_ctx=CONTEXT, n_threads=THREADS,
                          n_threads_batch=THREADS, seed=0, verbose=False)
    gguf = await measure(gguf_spec("1.0.0"), lambda: direct_round(llm))
    print(f"gguf q4_1: direct {gguf['direct_tokens_per_s']} tokens/s TTFT "
          f"{gguf['direct_ttft_ms']} ms; API {gguf['api_tokens_per_s']} tokens/s TTFT "
          f"{gguf['api_ttft_ms']} ms (ratio {gguf['throughput_ratio']}, TTFT "
          f"{gguf['added_ttft_ms']:+} ms), worker {gguf['worker_rss_mb']} MB", flush=True)
    figures |= {f"gguf_{k}": v for k, v in gguf.items()}
    figures["onnx_over_gguf_api_tokens_per_s"] = round(
        onnx["api_tokens_per_s"] / gguf["api_tokens_per_s"], 3)
    return figures


def main() -> None:
    folder = onnx_genai_path()
    if folder is None or not GGUF.is_file():
        raise SystemExit("models missing: run scripts/bootstrap.sh")
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    print(f"onnx {folder.name} ({size:.0f} MB) against {GGUF.name} "
          f"({GGUF.stat().st_size / 2**20:.0f} MB), {THREADS} threads, {MAX_TOKENS} tokens x "
          f"{ROUNDS} rounds; load {os.getloadavg()[0]:.2f}", flush=True)
    figures = asyncio.run(run_all(folder))
    figures |= {"threads": THREADS, "rounds": ROUNDS, "onnx_folder_mb": round(size, 1),
                "load_average_1m": round(os.getloadavg()[0], 2)}
    report(figures)


if __name__ == "__main__":
    main()
