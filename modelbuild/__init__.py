"""Model builds: tier variants of a model made by quantization and judged by measurement.

``slmfleet models build SPEC`` (docs/build.md): quantize a source GGUF
through llama.cpp into candidate variants, measure each on this machine
(perplexity as llama.cpp's own tool computes it, the release's evaluation
set, speed, size, RAM at each tier's context), choose per tier the best one
that fits and meets the quality floors, and emit a release spec for
``slmfleet models publish``. Imports ``protocol`` and the agent's chat
templating and file helpers; never the control plane.
"""

from __future__ import annotations

from .build import BuildResult, run_build
from .choose import NoVariantFits
from .perplexity import PerplexityError, perplexity, perplexity_of_file
from .quantize import QuantizeError
from .spec import BuildSpec, BuildSpecError, load_build_spec

__all__ = [
    "BuildResult",
    "BuildSpec",
    "BuildSpecError",
    "NoVariantFits",
    "PerplexityError",
    "QuantizeError",
    "load_build_spec",
    "perplexity",
    "perplexity_of_file",
    "run_build",
]
