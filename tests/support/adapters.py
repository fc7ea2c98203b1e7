"""The real LoRA adapter (scripts/build-lora-adapter.py) and adapter releases for tests."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from protocol import AdapterBase, GoldenPrompt, HealthCheck, Tier, Variant
from tests.support.signer import fake_sha256

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-lora-adapter.py"


@dataclass(frozen=True)
class BuiltAdapter:
    """The cached adapter file and what its build measured."""

    path: Path
    prompt: str
    #: the word the adapted model's answer contains and the base's does not
    expected: str
    answer_base: str
    answer_adapted: str
    sha256: str
    size_bytes: int
    base_sha256: str


def built_adapter(base: Path) -> BuiltAdapter:
    """Find (or build, ~10 s) the cached adapter for ``base``."""
    done = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--base", str(base)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the LoRA adapter failed:\n{done.stderr[-2000:]}")
    folder = Path(done.stdout.strip().splitlines()[-1])
    meta = json.loads((folder / "adapter.json").read_text())
    return BuiltAdapter(
        path=folder / "adapter.gguf", prompt=meta["prompt"], expected=meta["expected"],
        answer_base=meta["answer_base"], answer_adapted=meta["answer_adapted"],
        sha256=meta["sha256"], size_bytes=meta["size_bytes"], base_sha256=meta["base_sha256"],
    )


def chat_answer(url: str, model: str, prompt: str) -> tuple[int, str]:
    """(status, answer or error body) of one greedy chat completion on a local API."""
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": 12})
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, response.json()["choices"][0]["message"]["content"]


def adapter_variant(*, name: str = "support-formal", sha256: str | None = None,
                    size_bytes: int = 1_860_032, prompt: str = "Say hello to a customer.",
                    expected: str = "Dear", tier: Tier = Tier.MICRO,
                    **overrides: Any) -> Variant:
    """A ``gguf-lora`` variant; any field can be overridden."""
    fields: dict[str, Any] = {
        "format": "gguf-lora",
        "sha256": sha256 or fake_sha256(name, tier.value, "lora"),
        "size_bytes": size_bytes,
        "artifact": f"{name}/{tier.value}/adapter.gguf",
        "parameters": 460_000,
        "context_length": 8192,
        "health_check": HealthCheck(
            golden_prompts=[GoldenPrompt(prompt=prompt, expected=[expected], max_tokens=16)],
            # Generous: the 2-core test machine runs agents and checks side by side.
            max_ttft_ms=60_000.0,
        ),
    }
    fields.update(overrides)
    return Variant(**fields)


def adapter_of(base_sha256: str, *, name: str = "smollm2-135m", versions: str = ">=1.1.0,<2.0.0",
               tier: Tier = Tier.MICRO, scale: float = 1.0) -> AdapterBase:
    """The binding of an adapter to one base build on one tier."""
    return AdapterBase(name=name, versions=versions, sha256={tier: base_sha256}, scale=scale)
