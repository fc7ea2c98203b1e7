"""Which variant each tier gets: the best-scoring one that fits and meets the floors.

For each tier, every candidate is judged on its measured figures, in this
order (the first failure is the one reported):

1. **perplexity floor**: at most ``floors.max_perplexity_increase`` above
   the source's, on the same held-out text;
2. **eval floor**: its eval score at least ``floors.min_eval_ratio`` times
   the source's (a tier's own ``floors``, where it has them, replace the
   spec's);
3. **fit**: :func:`protocol.fit_check` of the variant as it would be
   published (its size, the RAM measured at the tier's context as
   ``min_ram_bytes``) against the tier's budget, as an agent checks it.

Only candidates of the format the tier's devices run are judged for it
(``tiers.<tier>.format``: an NPU laptop's tier takes ONNX folders, the
others GGUF files). Of those that pass, the highest eval score wins, then the lower
perplexity, then the smaller file. A tier no candidate passes is refused,
with each candidate's failing figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol import Tier, Variant, fit_check

from .measure import Measurement
from .spec import BuildSpec, Candidate


class NoVariantFits(RuntimeError):
    """Some tier has no candidate that meets the floors and fits its budget."""

    def __init__(self, refusals: dict[Tier, list[str]],
                 report: dict[str, object] | None = None) -> None:
        self.refusals = refusals
        #: the build's report (every figure), for the caller to show beside the refusal
        self.report = report
        lines = [f"tier {tier.value}: no candidate qualifies: " + "; ".join(reasons)
                 for tier, reasons in refusals.items()]
        super().__init__("\n".join(lines))


@dataclass(frozen=True, slots=True)
class Judged:
    """A candidate with its figures, as one tier sees it."""

    candidate: Candidate
    measurement: Measurement
    #: None when it qualifies, else the figure that failed
    refusal: str | None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def judge(spec: BuildSpec, tier: Tier, candidate: Candidate, measured: Measurement,
          source: Measurement, as_variant: Callable[[Candidate, Tier], Variant]) -> str | None:
    """Why ``candidate`` cannot serve ``tier``, or None when it can."""
    floors = spec.tiers[tier].floors or spec.floors
    ppl_limit = source.perplexity * (1 + floors.max_perplexity_increase)
    if measured.perplexity > ppl_limit:
        rise = measured.perplexity / source.perplexity - 1
        floor = floors.max_perplexity_increase
        return (f"{candidate.name}: perplexity {measured.perplexity:.2f} is {rise:+.1%} against "
                f"the source's {source.perplexity:.2f} (floor +{floor:.0%})")
    eval_limit = source.eval_score * floors.min_eval_ratio
    if measured.eval_score < eval_limit:
        ratio = measured.eval_score / source.eval_score if source.eval_score else 0.0
        return (f"{candidate.name}: eval score {measured.eval_score:.3f} is {ratio:.2f}x the "
                f"source's {source.eval_score:.3f} (floor {floors.min_eval_ratio:.2f}x)")
    budget = spec.tiers[tier]
    fit = fit_check(as_variant(candidate, tier), ram_bytes=budget.ram_bytes,
                    disk_free_bytes=budget.disk_free_bytes,
                    os_reserved_bytes=budget.os_reserved_bytes, slots=budget.slots)
    if not fit.ok:
        return (f"{candidate.name}: {fit.reason} at context {budget.context}: {fit.detail} "
                f"(RAM {_mib(measured.ram_at(budget.context))}, "
                f"file {_mib(measured.size_bytes)})")
    return None


def choose(spec: BuildSpec, measured: dict[str, Measurement], source: Measurement,
           as_variant: Callable[[Candidate, Tier], Variant],
           ) -> tuple[dict[Tier, Candidate], dict[Tier, list[Judged]], dict[Tier, list[str]]]:
    """Each tier's chosen candidate, every candidate's verdict per tier, and the
    refused tiers with each candidate's failing figure (raise :class:`NoVariantFits`
    with them once the report is out).
    """
    chosen: dict[Tier, Candidate] = {}
    verdicts: dict[Tier, list[Judged]] = {}
    refusals: dict[Tier, list[str]] = {}
    for tier in sorted(spec.tiers, key=lambda t: t.rank):
        # a tier's devices run one format: the others' candidates are not theirs to judge
        judged = [Judged(c, measured[c.name],
                         judge(spec, tier, c, measured[c.name], source, as_variant))
                  for c in spec.candidates if c.format == spec.tiers[tier].format]
        verdicts[tier] = judged
        passing = [j for j in judged if j.refusal is None]
        if not passing:
            refusals[tier] = [j.refusal for j in judged if j.refusal is not None]
            continue
        best = max(passing, key=lambda j: (j.measurement.eval_score, -j.measurement.perplexity,
                                           -j.measurement.size_bytes))
        chosen[tier] = best.candidate
    return chosen, verdicts, refusals
