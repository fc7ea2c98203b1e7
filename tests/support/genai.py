"""The ONNX (onnxruntime-genai) SmolLM2 that scripts/build-onnx-genai.sh builds, and specs
that serve it or the GGUF it was built from in a worker of this test's runtime."""

from __future__ import annotations

from pathlib import Path

from agent.inference.spec import ModelSpec
from agent.runtime_settings import EffectiveRuntime
from controlplane.devfleet.model_cache import onnx_genai_path  # noqa: F401 (tests and benches find it here)

#: what the tests and benchmarks call both builds of SmolLM2-135M-Instruct
MODEL = "smollm2-135m"
#: a golden prompt both builds answer right at temperature 0 (they differ on others: the
#: GGUF answers "What is the capital of France?" wrong, the int4 build "What is 2 + 2?")
HEALTH_CHECK = {
    "golden_prompts": [
        {"prompt": "What is the chemical symbol for water?", "expected": ["h2o"],
         "max_tokens": 24},
    ],
    "max_ttft_ms": 5000.0,
    "min_tokens_per_s": 0.0,
}


def runtime(threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",),
            context: int = 2048) -> EffectiveRuntime:
    """Runtime settings for one test worker (one thread: the machine is shared)."""
    return EffectiveRuntime(threads=threads, gpu_layers=0, batch=None, context=context,
                            mmap=True, embeddings=False, onnx_providers=providers)


def onnx_spec(folder: Path, version: str, **settings: object) -> ModelSpec:
    """The ONNX build served as ``MODEL``@``version``."""
    return ModelSpec(f"{MODEL}@{version}-onnx", MODEL, version, "onnx", folder,
                     runtime(**settings))  # type: ignore[arg-type]


def gguf_spec(path: Path, version: str, **settings: object) -> ModelSpec:
    """The GGUF served as ``MODEL``@``version``."""
    return ModelSpec(f"{MODEL}@{version}-gguf", MODEL, version, "gguf", path,
                     runtime(**settings))  # type: ignore[arg-type]
