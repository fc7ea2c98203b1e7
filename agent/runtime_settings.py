"""The runtime settings a model actually runs with on this device.

Two sources: the variant's ``runtime_defaults`` (what the release author
measured the model with) and the firmware profile's ``runtime`` (what this
hardware class can do). The profile wins where it states a value, because
it knows the hardware (RuntimeDefaults: "a firmware profile may override
them"); otherwise the variant's default applies, then the profile's own
default. The inference worker loads every model (and runs its health check)
with these settings.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from protocol import RuntimeDefaults, Variant

from .profiles import RuntimeSettings


@dataclass(frozen=True, slots=True)
class EffectiveRuntime:
    """Settings handed to the runtime (llama.cpp or onnxruntime)."""

    threads: int
    gpu_layers: int
    batch: int | None
    context: int
    mmap: bool
    embeddings: bool
    #: onnxruntime execution providers in preference order (ONNX only)
    onnx_providers: tuple[str, ...] = ()
    #: generations decoded at once, each with ``context`` tokens of KV cache (llama.cpp only)
    parallel: int = 1

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for the worker's load request."""
        values = asdict(self)
        values["onnx_providers"] = list(self.onnx_providers)
        return values


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def effective_runtime(profile: RuntimeSettings, variant: Variant) -> EffectiveRuntime:
    """Merge ``profile`` over ``variant.runtime_defaults`` (module docstring)."""
    return runtime_from_defaults(profile, variant.runtime_defaults, variant.runtime_context,
                                 onnx=variant.format == "onnx")


def runtime_from_defaults(
    profile: RuntimeSettings, defaults: RuntimeDefaults, context: int, *, onnx: bool = False
) -> EffectiveRuntime:
    """:func:`effective_runtime` from the parts (also for a model stored without
    its release, which runs with ``RuntimeDefaults()``)."""
    stated = profile.model_fields_set
    threads = profile.threads if "threads" in stated else defaults.threads
    # Never more threads than CPUs this process may use: oversubscribing slows
    # llama.cpp sharply, and a simulated board's profile may name more cores
    # than the machine running it has.
    threads = min(threads or _cpu_count(), _cpu_count())
    gpu_layers = profile.gpu_layers if "gpu_layers" in stated else defaults.gpu_layers
    batch = profile.batch if "batch" in stated else defaults.batch
    mmap = profile.mmap if "mmap" in stated else defaults.mmap
    providers: list[str] = []
    if onnx:  # execution providers mean nothing to llama.cpp
        providers = (profile.onnx_providers if "onnx_providers" in stated
                     else defaults.onnx_providers or profile.onnx_providers)
    if profile.context_cap is not None:
        context = min(context, profile.context_cap)
    return EffectiveRuntime(
        threads=threads,
        gpu_layers=profile.gpu_layers if gpu_layers is None else gpu_layers,
        batch=batch,
        context=context,
        mmap=profile.mmap if mmap is None else mmap,
        embeddings=defaults.embeddings,
        onnx_providers=tuple(providers),
        # The profile's alone: how many callers a device serves at once is a
        # property of the hardware, not of the model. ONNX models run one at a time.
        parallel=1 if onnx else profile.parallel,
    )
