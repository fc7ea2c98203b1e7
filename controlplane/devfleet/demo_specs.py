"""What ``slmfleet dev`` publishes and rolls out: its devices, release specs and rollout specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: golden prompts SmolLM2-135M answers correctly and stably at temperature 0
#: through its chat template (see examples/smollm2.release.yaml). The speed
#: limits are loose on purpose (0 tokens/s: not gated): the demo's agents share
#: this machine's cores, and the bad release must fail on its answer, not on a
#: busy CPU
_DEMO_HEALTH_CHECK = {
    "max_ttft_ms": 60000,
    "min_tokens_per_s": 0,
    "golden_prompts": [
        {"prompt": "What is the capital of Germany?", "expected": ["Berlin"], "max_tokens": 32},
        {"prompt": "What is the opposite of hot?", "expected": ["cold"], "max_tokens": 32},
    ],
}

CHAT_MODEL = "smollm2"
GOOD_VERSION = "1.0.0"
#: the chat model's next version, rolled out while the embedder keeps serving
NEXT_VERSION = "1.0.1"
BAD_VERSION = "1.1.0"
#: healthy but answers fewer questions: stopped by the quality gate (devfleet/low_quality.py)
LOW_QUALITY_VERSION = "1.2.0"
#: the evaluation set the low-quality release ships, and the budget devices get for it
DEMO_EVAL_SET = Path(__file__).resolve().parents[2] / "examples" / "smollm2.eval.json"
DEMO_EVAL_BUDGET_S = 60.0
#: the demo's quality gate: the new version must score at least this share of the old one
DEMO_MIN_EVAL_RATIO = 0.9
#: the embedding model served beside the chat model: SmolLM2 with embeddings on
EMBED_MODEL = "smollm2-embed"
EMBED_VERSION = "1.0.0"
#: an embedding model has no golden prompts: it is checked on load and speed
_EMBED_HEALTH_CHECK = {"max_ttft_ms": 60000, "min_tokens_per_s": 0}
#: SmolLM2-135M answers this one wrongly ("L'Étoile, la Marseillaise, ..."), so a
#: release that ships it as a golden prompt fails its health check on every device
BAD_HEALTH_CHECK = {
    **_DEMO_HEALTH_CHECK,
    "golden_prompts": [
        {"prompt": "What is the capital of France?", "expected": ["paris"], "max_tokens": 32},
    ],
}
#: the ONNX build's golden prompt: both builds of SmolLM2 answer it right at
#: temperature 0 (the int4 ONNX build differs from the GGUF on the others)
_ONNX_HEALTH_CHECK = {
    **_DEMO_HEALTH_CHECK,
    "golden_prompts": [
        {"prompt": "What is the chemical symbol for water?", "expected": ["h2o"],
         "max_tokens": 24},
    ],
}
#: the engine's tick in the demo: quick enough to watch, slow enough to read
DEMO_TICK_S = 1.0


def demo_rollout_spec(version: str, model: str = CHAT_MODEL) -> dict[str, Any]:
    """Every demo device, a one-device canary then 100 %, rolled back on any failure.

    One download at a time: the demo's agents share this machine's cores,
    and health checks running side by side would fail on speed alone.
    """
    return {
        "model": model,
        "version": version,
        "target": {"all": True},
        "stages": [{"percent": 10, "bake_s": 3}, {"percent": 100, "bake_s": 3}],
        "gates": {"min_devices_reporting": 1, "max_failed": 0, "min_health_pass_rate": 1.0,
                  "min_eval_ratio": DEMO_MIN_EVAL_RATIO},
        "on_failure": "rollback",
        "max_concurrent_downloads": 1,
    }

#: (device id, simulated board preset, labels) of the demo fleet
DEMO_DEVICES: list[tuple[str, str, dict[str, str]]] = [
    ("pi4-kitchen", "raspberry-pi-4-4gb", {"site": "home", "room": "kitchen"}),
    ("npu-laptop", "x86_64-npu-laptop-16gb", {"site": "office"}),
    ("ws-render", "x86_64-gpu-workstation", {"site": "lab"}),
]


def demo_release_spec(
    model: Path,
    version: str = "1.0.0",
    *,
    health_check: dict[str, Any] | None = None,
    description: str = "SmolLM2-135M-Instruct Q4_1 (the demo's model for every tier)",
    name: str = CHAT_MODEL,
    embeddings: bool = False,
    onnx_folder: Path | None = None,
    quantization: str = "Q4_1",
    eval_set: Path | None = None,
) -> dict[str, Any]:
    """A release spec with a variant for every tier, for ``slmfleet models publish``.

    The demo has one real model, so every tier's variant is the same GGUF
    with that tier's runtime settings (a bigger context where there is more
    memory); a real release would ship a bigger model for bigger tiers.
    With ``embeddings`` the variants serve ``/v1/embeddings`` instead of
    completions; with ``eval_set`` the devices score the release on it. With
    ``onnx_folder`` (the onnxruntime-genai build of the same model) the
    ``small`` tier, the NPU laptop's, gets that folder instead: an ONNX
    variant beside GGUF ones in one release.
    """

    def variant(context: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {"context": context, "mmap": True}
        if embeddings:
            defaults["embeddings"] = True
        return {
            "file": str(model),
            "format": "gguf",
            "quantization": quantization,
            "parameters": 135_000_000,
            "context_length": 8192,
            "runtime_defaults": defaults,
            "health_check": health_check
            or (_EMBED_HEALTH_CHECK if embeddings else _DEMO_HEALTH_CHECK),
        }

    small = variant(4096)
    if onnx_folder is not None:
        small = {
            "file": str(onnx_folder),
            "format": "onnx",
            "quantization": "int4",
            "parameters": 135_000_000,
            "context_length": 8192,
            "runtime_defaults": {"context": 2048},
            "health_check": health_check or _ONNX_HEALTH_CHECK,
        }
    spec: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "variants": {"micro": variant(2048), "small": small, "medium": variant(8192)},
    }
    if eval_set is not None:
        spec["eval_set"] = {"path": str(eval_set), "time_budget_s": DEMO_EVAL_BUDGET_S}
    return spec
