"""RAM a variant costs at a runtime context, measured in a fresh process.

What the fit check's ``min_ram_bytes`` means (protocol/fit.py): the resident
memory serving the variant at the runtime context needs, KV cache and
runtime included. A fresh child process measures it, so nothing of the
build's own memory counts:

1. its resident size once Python and llama.cpp are loaded (the runtime's
   base, the same for every variant);
2. the model loaded at the context, its weights read into memory rather
   than mapped: llama.cpp repacks some types (Q4_0, IQ4_NL) for its CPU
   kernels into memory of its own, and with a mapped file the original
   pages of those tensors stay mapped though nothing reads them again, so
   a mapped load would count them twice; read in, every weight is counted
   once, as it is held while serving;
3. a prompt of :data:`PROMPT_TOKENS` tokens (or the context, when shorter)
   evaluated, so the compute buffers a prompt uses are resident; the KV
   cache is resident in full from the start (llama.cpp zeroes it when the
   context is made).

The model's cost is the resident size after 3 less the base after 1; both
come back, so the fit check can count the base too. Variants then differ by
what differs between them, their weights: a smaller file costs less.

Run as ``python -m modelbuild.rss PATH CONTEXT THREADS``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: tokens of the prompt evaluated before measuring (a long chat turn)
PROMPT_TOKENS = 256


@dataclass(frozen=True, slots=True)
class RamCost:
    """Resident bytes: the runtime's base, and what the model adds at a context."""

    base_bytes: int
    model_bytes: int


def model_ram(path: Path, context: int, threads: int) -> RamCost:
    """What serving ``path`` at ``context`` costs, measured in a fresh process."""
    done = subprocess.run([sys.executable, "-m", __name__, str(path), str(context), str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring RAM of {path.name} at context {context} failed: "
                           f"{done.stderr.strip()[-500:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return RamCost(base_bytes=figures["base"], model_bytes=figures["model"])


def resident_bytes() -> int:
    """This process's resident set size (``VmRSS`` of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _prompt(vocab: int, count: int) -> list[int]:
    # any token ids do: the cost of a prompt depends on its length, not its words
    return [(i * 7919) % (vocab - 256) + 128 for i in range(count)]


def _onnx_cost(folder: Path, context: int, threads: int) -> dict[str, int]:
    """An onnxruntime-genai folder loaded as the agent's worker loads it, a prompt evaluated."""
    import onnxruntime_genai as og

    from agent.inference.genai_backend import GenaiBackend  # noqa: F401 (in the base)

    from .onnx import load_backend

    base = resident_bytes()
    backend = load_backend(folder, context, threads)
    params = og.GeneratorParams(backend.model)
    params.set_search_options(max_length=context, batch_size=1)
    generator = og.Generator(backend.model, params)
    config = json.loads((folder / "genai_config.json").read_text())
    generator.append_tokens(_prompt(int(config["model"]["vocab_size"]),
                                    min(context, PROMPT_TOKENS)))
    return {"base": base, "model": resident_bytes() - base}


def _main(path: str, context: int, threads: int) -> None:
    if Path(path).is_dir():
        print(json.dumps(_onnx_cost(Path(path), context, threads)))
        return
    import llama_cpp

    base = resident_bytes()
    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads,
                          n_threads_batch=threads, use_mmap=False, verbose=False)
    llm.eval([llm.token_bos(), *_prompt(llm.n_vocab(), min(context, PROMPT_TOKENS) - 1)])
    print(json.dumps({"base": base, "model": resident_bytes() - base}))


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
