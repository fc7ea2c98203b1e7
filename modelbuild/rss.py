"""RAM a variant needs at a runtime context: the peak RSS of a fresh process serving it.

What the fit check's ``min_ram_bytes`` means (protocol/fit.py): the measured
peak resident size at the runtime context, KV cache and runtime overhead
included. Measured in a child process so the figure is the model's alone,
not the build's: it loads the file as the agent's worker does (mmap, the
context allocated up front), answers one short chat prompt, and reports
``ru_maxrss`` plus the whole f16 KV cache at the context. The cache's pages
become resident only as a conversation fills them, so a short prompt's peak
leaves most of it out; a device must have room for all of it.

Run as ``python -m modelbuild.rss PATH CONTEXT THREADS``.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_bytes(path: Path, context: int, threads: int) -> int:
    """Peak RSS of a fresh process that loads ``path`` at ``context`` and answers once."""
    done = subprocess.run([sys.executable, "-m", __name__, str(path), str(context), str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring RAM of {path.name} at context {context} failed: "
                           f"{done.stderr.strip()[-500:]}")
    return int(done.stdout.strip().splitlines()[-1])


def _main(path: str, context: int, threads: int) -> None:
    from .evaluate import answer, load_chat_model

    llm = load_chat_model(Path(path), context, threads)
    answer(llm, "What is the opposite of hot?", 8)
    # ru_maxrss is in KiB on Linux
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + kv_cache_bytes(llm, context))


def kv_cache_bytes(llm, context: int) -> int:
    """The f16 K and V caches of every layer at ``context`` (grouped-query heads counted)."""
    meta = llm.metadata
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    width = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    return 2 * layers * (width // heads * kv_heads) * context * 2


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
