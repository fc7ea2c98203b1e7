"""Model build: quantize time per variant and evaluation time per item, on this machine.

Runs ``slmfleet models build`` (:func:`modelbuild.run_build`) on a build
spec (default ``examples/smollm2.build.yaml``: six candidates of the real
SmolLM2-135M, the example held-out text and 14-item evaluation set) into a
fresh build directory, so every variant is quantized and measured, then
builds it again into the same directory to time a build that reuses every
variant. Prints a table per variant (quantize seconds, eval seconds per
item, perplexity, eval score, size, the model's RAM at each tier context,
tokens/s, TTFT) and the JSON last line.

    .venv/bin/python bench/build.py [SPEC]
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelbuild import NoVariantFits, run_build

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Build twice (fresh, then reusing), print the figures."""
    spec = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples" / "smollm2.build.yaml"
    build_dir = Path(tempfile.mkdtemp(prefix="slmfleet-bench-build-"))
    out = build_dir / "release.yaml"
    started = time.perf_counter()
    try:
        first = run_build(spec, build_dir, out=out).report
        refused = ""
    except NoVariantFits as exc:
        first, refused = exc.report, str(exc)
    fresh_s = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.suppress(NoVariantFits):  # the same refusal as the first build
        run_build(spec, build_dir, out=out)
    reused_s = time.perf_counter() - started
    assert first is not None
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'variant':>12} {'quant s':>8} {'eval s/item':>11} {'ppl':>8} {'eval':>6} "
          f"{'MiB':>7} {'model RAM MiB':>15} {'tok/s':>6} {'TTFT ms':>8}")
    figures: dict[str, float | int | str] = {}
    for row in [first["source"], *first["variants"]]:
        m = row["measurement"]
        ram = " / ".join(f"{v / 2**20:.0f}" for _, v in
                         sorted(m["ram_bytes"].items(), key=lambda kv: int(kv[0])))
        quant = row.get("quantize_s", 0.0)
        print(f"{row['name']:>12} {quant:8.1f} {m['eval_s_per_item']:11.2f} "
              f"{m['perplexity']:8.2f} {m['eval_score']:6.3f} {m['size_bytes'] / 2**20:7.1f} "
              f"{ram:>15} {m['tokens_per_s']:6.1f} {m['ttft_ms']:8.0f}")
        figures[f"{row['name']}_quantize_s"] = round(quant, 2)
        figures[f"{row['name']}_eval_s_per_item"] = round(m["eval_s_per_item"], 3)
        figures[f"{row['name']}_perplexity"] = round(m["perplexity"], 3)
        figures[f"{row['name']}_eval_score"] = round(m["eval_score"], 4)
        for context, ram_bytes in m["ram_bytes"].items():
            figures[f"{row['name']}_ram_mib_at_{context}"] = round(ram_bytes / 2**20, 1)
    for tier, info in first["tiers"].items():
        print(f"tier {tier}: {info['chosen'] or 'refused'}")
        figures[f"tier_{tier}"] = info["chosen"] or "refused"
    if refused:
        print(refused)
    figures["fresh_build_s"] = round(fresh_s, 1)
    figures["reused_build_s"] = round(reused_s, 1)
    print(f"fresh build {fresh_s:.1f} s, second build (all reused) {reused_s:.1f} s")
    report(figures)


if __name__ == "__main__":
    main()
