"""``slmfleet models build``: quantize, measure, choose per tier, emit a release spec.

Steps, each variant resumable on its own (:mod:`.store`):

1. measure the source (the reference the floors compare against);
2. for each candidate: quantize it through llama.cpp (:mod:`.quantize`)
   unless its file is already in the build directory, then measure it
   unless its figures are (:mod:`.measure`);
3. judge every candidate for every tier (:mod:`.choose`);
4. write the report (JSON and a PNG chart) and, when every tier has a
   variant, the release spec (:mod:`.emit`); otherwise raise
   :class:`~.choose.NoVariantFits` naming each refused tier's figures.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from protocol import EvalSet, Tier, parse_eval_set_bytes

from .choose import NoVariantFits, choose
from .emit import as_variant, release_spec, write_release_spec
from .measure import Measurement, measure
from .onnx import folder_digest
from .quantize import quantize
from .report import write_chart
from .spec import BuildSpec, Candidate, load_build_spec
from .store import BuildStore, file_sha256
from .tensors import read_tensors


@dataclass
class BuildResult:
    """What a build produced."""

    report: dict[str, Any]
    #: the emitted release spec (None when a tier was refused)
    release_spec: Path | None
    report_path: Path
    chart_path: Path


class _Bars:
    """One progress bar per step of a variant (quiet when ``console`` is None)."""

    def __init__(self, console: Console | None) -> None:
        self.progress = None if console is None else Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def callback(self, variant: str):
        """A :data:`.measure.Progress` that draws ``variant``'s bars."""
        def update(step: str, done: int, total: int) -> None:
            if self.progress is None:
                return
            key = f"{variant} {step}"
            if key not in self.tasks:
                self.tasks[key] = self.progress.add_task(f"{variant:>16} {step}", total=total)
            self.progress.update(self.tasks[key], completed=done, total=total)
        return update

    def note(self, variant: str, text: str) -> None:
        """A finished step shown as a full bar (e.g. ``reused``)."""
        self.callback(variant)(text, 1, 1)


def _measured(store: BuildStore, directory: Path, path: Path, spec: BuildSpec, text: str,
              items: EvalSet, bars: _Bars, name: str) -> tuple[Measurement, bool]:
    """The figures of ``path``: read from the store, or measured and stored. (figures, reused)"""
    record_path = store.measurement_path(directory)
    record = store.read(record_path)
    if record is not None:
        bars.note(name, "measured (reused)")
        return Measurement.from_dict(record), True
    measured = measure(path, spec, text, items, progress=bars.callback(name))
    if not math.isfinite(measured.perplexity):
        # a wrecked quantization can overflow; JSON has no infinity
        measured.perplexity = 1e300
    store.write(record_path, measured.as_dict())
    return measured, False


def _quantized(store: BuildStore, spec: BuildSpec, candidate: Candidate,
               bars: _Bars) -> tuple[Path, dict[str, Any], bool]:
    """The candidate's file and its quantize record, made unless already there. (.., reused)

    An ONNX candidate is its folder as given, recorded once (its digest)."""
    directory = store.variant_dir(candidate)
    if candidate.folder is not None:
        record = store.read(directory / "quantize.json")
        if record is None:
            record = {"type": candidate.type, "format": "onnx", "folder": str(candidate.folder),
                      "seconds": 0.0, "sha256": folder_digest(candidate.folder), "tensors": {}}
            store.write(directory / "quantize.json", record)
        return candidate.folder, record, True
    file = directory / f"{spec.name}-{candidate.name}.gguf"
    record = store.read(directory / "quantize.json")
    if record is not None and file.is_file():
        bars.note(candidate.name, "quantized (reused)")
        return file, record, True
    directory.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".part")
    bars.callback(candidate.name)(f"quantize {candidate.type}", 0, 1)
    started = time.perf_counter()
    quantize(spec.source.file, partial, candidate.type, candidate.overrides,
             threads=spec.threads, log=directory / "quantize.log", imatrix=candidate.imatrix)
    seconds = time.perf_counter() - started
    os.replace(partial, file)
    record = {
        "type": candidate.type,
        "overrides": candidate.overrides,
        "imatrix": None if candidate.imatrix is None else str(candidate.imatrix),
        "seconds": seconds,
        "sha256": file_sha256(file),
        "tensors": {t.name: t.type for t in read_tensors(file)},
    }
    store.write(directory / "quantize.json", record)
    bars.callback(candidate.name)(f"quantize {candidate.type}", 1, 1)
    return file, record, False


def run_build(spec_path: Path, build_dir: Path, *, out: Path | None = None,
              console: Console | None = None) -> BuildResult:
    """Build ``spec_path``'s variants under ``build_dir``; see the module docstring.

    ``console`` draws progress bars (None: quiet). Raises
    :class:`~.spec.BuildSpecError`, :class:`~.quantize.QuantizeError`,
    :class:`~.perplexity.PerplexityError` or :class:`~.choose.NoVariantFits`
    (after the report is written).
    """
    spec = load_build_spec(spec_path)
    text = spec.held_out.text.read_text(encoding="utf-8")
    items = parse_eval_set_bytes(spec.eval_set.read_bytes())
    source_sha = file_sha256(spec.source.file)
    store = BuildStore.open(build_dir, spec, source_sha)
    files: dict[str, Path] = {}
    records: dict[str, dict[str, Any]] = {}
    measured: dict[str, Measurement] = {}
    reused: dict[str, bool] = {}
    with _Bars(console) as bars:
        source, _ = _measured(store, store.source_dir(), spec.source.file, spec, text, items,
                              bars, "source")
        for candidate in spec.candidates:
            file, record, file_reused = _quantized(store, spec, candidate, bars)
            figures, figures_reused = _measured(store, store.variant_dir(candidate), file, spec,
                                                text, items, bars, candidate.name)
            files[candidate.name], records[candidate.name] = file, record
            measured[candidate.name] = figures
            reused[candidate.name] = file_reused and figures_reused

    def variant_of(candidate: Candidate, tier: Tier):
        return as_variant(spec, tier, candidate, measured[candidate.name],
                          records[candidate.name]["sha256"])

    chosen, verdicts, refusals = choose(spec, measured, source, variant_of)
    stem = f"{spec.name}-{spec.version}"
    spec_out = out or store.root / f"{stem}.release.yaml"
    report_path = store.root / f"{stem}.report.json"
    chart_path = store.root / f"{stem}.quality.png"
    report = {
        "name": spec.name,
        "version": spec.version,
        "build_dir": str(store.root),
        "source": {"name": "source", "file": str(spec.source.file), "sha256": source_sha,
                   "measurement": source.as_dict()},
        "variants": [
            {"name": c.name, "type": c.type, "overrides": c.overrides,
             "file": str(files[c.name]), "sha256": records[c.name]["sha256"],
             "quantize_s": records[c.name]["seconds"], "reused": reused[c.name],
             "measurement": measured[c.name].as_dict()}
            for c in spec.candidates
        ],
        "tiers": {
            tier.value: {"chosen": chosen[tier].name if tier in chosen else None,
                         "verdicts": {j.candidate.name: j.refusal for j in verdicts[tier]},
                         "floors": (spec.tiers[tier].floors or spec.floors).model_dump()}
            for tier in verdicts
        },
        "floors": spec.floors.model_dump(),
        "chart": str(chart_path),
        "release_spec": None if refusals else str(spec_out),
    }
    write_chart(report, chart_path)
    BuildStore.write(report_path, report)
    if refusals:
        raise NoVariantFits(refusals, report)
    write_release_spec(spec_out, release_spec(spec, chosen, files, measured), spec_path)
    return BuildResult(report, spec_out, report_path, chart_path)
