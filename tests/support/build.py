"""Build specs for the model-build tests, and llama.cpp's own perplexity tool."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT = ROOT / "examples" / "smollm2.heldout.txt"
EVAL_SET = ROOT / "examples" / "smollm2.evalset.json"
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server.sh"
#: the held-out text's chunks and the eval items a test build measures (kept small: cost)
TEST_CHUNKS = 2
TEST_EVAL_ITEMS = ("capital-germany", "water-symbol", "opposite-hot")
HEALTH_CHECK = {
    "max_ttft_ms": 2000,
    "min_tokens_per_s": 5,
    "golden_prompts": [{"prompt": "What is the capital of Germany?", "expected": ["Berlin"],
                        "max_tokens": 32}],
}


@contextmanager
def shared_build_dir() -> Iterator[Path]:
    """The model-build tests' build directory in the cache, held under a lock.

    Sessions and the tests of one session share it: the build's own keys
    (source sha256, type, overrides, llama-cpp-python version, measuring
    settings) say which variants and figures can be reused, so a change to
    any of them builds anew beside the old ones. The lock keeps two test
    sessions from writing one variant at once.
    """
    from controlplane.devfleet.model_cache import cache_dir

    root = cache_dir() / "model-builds-tests"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def small_eval_set(directory: Path) -> Path:
    """The example evaluation set cut to :data:`TEST_EVAL_ITEMS`, written in ``directory``."""
    data = json.loads(EVAL_SET.read_text())
    data["items"] = [item for item in data["items"] if item["id"] in TEST_EVAL_ITEMS]
    path = directory / "eval.json"
    path.write_text(json.dumps(data))
    return path


def write_spec(directory: Path, model_path: Path, *, candidates: list[dict[str, Any]],
               tiers: dict[str, dict[str, Any]], floors: dict[str, float] | None = None,
               name: str = "spec.yaml") -> Path:
    """A build spec over the real model, the example held-out text and a small eval set."""
    doc: dict[str, Any] = {
        "name": "smollm2",
        "version": "1.1.0",
        "source": {"file": str(model_path), "parameters": 135_000_000, "context_length": 8192},
        "held_out": {"text": str(HELD_OUT), "context": 128, "chunks": TEST_CHUNKS},
        "eval_set": str(small_eval_set(directory)),
        "candidates": candidates,
        "tiers": tiers,
        "release": {"description": "test build", "health_check": HEALTH_CHECK},
        "threads": 1,
    }
    if floors is not None:
        doc["floors"] = floors
    path = directory / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def llama_perplexity_binary() -> Path:
    """llama.cpp's ``llama-perplexity``, built once into the cache (build-llama-server.sh)."""
    done = subprocess.run([str(BUILD_SCRIPT), "llama-perplexity"], stdout=subprocess.PIPE,
                          stderr=sys.stderr, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} llama-perplexity failed (exit {done.returncode})")
    return Path(done.stdout.strip().splitlines()[-1])


def write_imatrix(model_path: Path, out: Path, seed: int = 0) -> Path:
    """A GGUF importance matrix for every block weight of ``model_path``, as llama-imatrix
    writes them (``<tensor>.in_sum2`` and ``<tensor>.counts``), with random column weights."""
    import gguf
    import numpy as np

    from modelbuild.tensors import read_tensors

    writer = gguf.GGUFWriter(str(out), arch="imatrix")
    rng = np.random.default_rng(seed)
    for tensor in read_tensors(model_path):
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            columns = tensor.shape[0]
            writer.add_tensor(f"{tensor.name}.in_sum2",
                              rng.random((1, columns), dtype=np.float32) * 10 + 0.01)
            writer.add_tensor(f"{tensor.name}.counts", np.array([[100.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
