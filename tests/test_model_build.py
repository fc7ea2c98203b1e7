"""``slmfleet models build`` on the real SmolLM2-135M: quantize, measure, choose, emit.

One build of three candidates is made per session (the ``built`` fixture);
the other tests rebuild from it, which reuses every variant, so only the
first pays for quantizing and measuring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from controlplane.release_spec import build_manifest, load_spec
from modelbuild import NoVariantFits, run_build
from modelbuild.imatrix import ImatrixError, load_imatrix
from modelbuild.quantize import quantize
from modelbuild.tensors import read_tensors
from protocol import Tier
from tests.support.build import ROOT, write_imatrix, write_spec

CANDIDATES = [
    {"name": "q8_0", "type": "Q8_0"},
    {"name": "q5_0", "type": "Q5_0"},
    {"name": "q4_0-mixed", "type": "Q4_0", "overrides": {"attn_v|ffn_down": "Q8_0"}},
]
#: loose floors and roomy budgets: every candidate qualifies everywhere
ROOMY = {"micro": {"ram_bytes": 8 << 30, "context": 512},
         "small": {"ram_bytes": 8 << 30, "context": 1024}}
LOOSE = {"max_perplexity_increase": 1.0, "min_eval_ratio": 0.5}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_path: Path):
    """(work dir, build dir, first build's result, its seconds)."""
    work = tmp_path_factory.mktemp("model-build")
    spec = write_spec(work, model_path, candidates=CANDIDATES, tiers=ROOMY, floors=LOOSE)
    started = time.monotonic()
    result = run_build(spec, work / "build")
    return work, work / "build", result, time.monotonic() - started


def _best(report: dict, names: list[str]) -> str:
    rows = {v["name"]: v["measurement"] for v in report["variants"]}
    return max(names, key=lambda n: (rows[n]["eval_score"], -rows[n]["perplexity"],
                                     -rows[n]["size_bytes"]))


def test_three_quantizations_are_made_measured_and_typed(built) -> None:
    _, _, result, _ = built
    report = result.report
    assert [v["name"] for v in report["variants"]] == [c["name"] for c in CANDIDATES]
    for variant in report["variants"]:
        m = variant["measurement"]
        assert Path(variant["file"]).is_file()
        assert m["size_bytes"] == Path(variant["file"]).stat().st_size
        assert 1 < m["perplexity"] < 1000
        assert 0 <= m["eval_score"] <= 1
        assert m["tokens_per_s"] > 0 and m["ttft_ms"] > 0
        assert set(m["ram_bytes"]) == {"512", "1024"}
        assert m["ram_bytes"]["1024"] > m["size_bytes"]
    by_name = {v["name"]: v for v in report["variants"]}
    # the types each tensor really holds, read back from the files
    assert by_name["q8_0"]["measurement"]["tensor_types"]["Q8_0"] > 200
    assert by_name["q5_0"]["measurement"]["tensor_types"]["Q5_0"] > 200
    mixed = read_tensors(Path(by_name["q4_0-mixed"]["file"]))
    types = {t.name: t.type for t in mixed}
    assert types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    # a smaller file for fewer bits
    sizes = {n: v["measurement"]["size_bytes"] for n, v in by_name.items()}
    assert sizes["q8_0"] > sizes["q5_0"]
    assert Path(report["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_emitted_spec_follows_the_figures_and_publishes(built) -> None:
    work, build_dir, result, _ = built
    report = result.report
    names = [c["name"] for c in CANDIDATES]
    # roomy budgets and loose floors: every tier gets the best-scoring variant
    best = _best(report, names)
    assert {t: info["chosen"] for t, info in report["tiers"].items()} == {
        "micro": best, "small": best}
    # now a micro budget only the smaller variants fit, set from the measured RAM
    rows = {v["name"]: v["measurement"] for v in report["variants"]}
    ram = {n: rows[n]["ram_bytes"]["512"] for n in names}
    # Peak RSS at a small context differs little between these variants and can
    # tie: the budget is the second-highest distinct figure, so whatever needs
    # the most does not fit and the rest do.
    ranked = sorted(set(ram.values()))
    assert len(ranked) >= 2, f"the variants' measured RAM does not differ: {ram}"
    budget = ranked[-2]
    fitting = [n for n in names if ram[n] <= budget]
    assert 0 < len(fitting) < len(names)
    spec = write_spec(work, Path(report["source"]["file"]), candidates=CANDIDATES,
                      tiers={"micro": {"ram_bytes": budget, "context": 512},
                             "small": ROOMY["small"]},
                      floors=LOOSE, name="tight.yaml")
    second = run_build(spec, build_dir, out=work / "tight.release.yaml")
    assert second.report["tiers"]["micro"]["chosen"] == _best(report, fitting)
    assert second.report["tiers"]["small"]["chosen"] == best
    refused = [n for n in names if n not in fitting]
    assert "insufficient_ram" in second.report["tiers"]["micro"]["verdicts"][refused[0]]
    # the emitted spec is one `models publish` reads; its RAM is the measured figure
    release = load_spec(second.release_spec)
    micro = release.variants[Tier.MICRO]
    chosen = second.report["tiers"]["micro"]["chosen"]
    files = {v["name"]: Path(v["file"]) for v in report["variants"]}
    assert micro.file == files[chosen]
    assert micro.min_ram_bytes == ram[chosen]
    assert micro.runtime_defaults.context == 512
    manifest = build_manifest(release, {t: ("0" * 64, 1) for t in release.variants},
                              released_at=0.0)
    assert set(manifest.variants) == {Tier.MICRO, Tier.SMALL}


def test_a_floor_nothing_meets_refuses_the_tier_naming_the_figure(built, model_path) -> None:
    work, build_dir, _, _ = built
    spec = write_spec(work, model_path, candidates=[CANDIDATES[2]],
                      tiers={"micro": ROOMY["micro"]},
                      floors={"max_perplexity_increase": 0.0, "min_eval_ratio": 0.5},
                      name="strict.yaml")
    out = work / "strict.release.yaml"
    with pytest.raises(NoVariantFits) as caught:
        run_build(spec, build_dir, out=out)
    message = str(caught.value)
    assert "tier micro" in message
    assert "q4_0-mixed: perplexity" in message and "floor +0%" in message
    assert not out.exists()
    # the command says the same and exits 1
    done = _cli(spec, build_dir, out)
    assert done.returncode == 1
    assert "perplexity" in done.stderr and "tier micro" in done.stderr


def _cli(spec: Path, build_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "slmfleet", "models", "build", str(spec), "--build-dir",
         str(build_dir), "--out", str(out), "--quiet", *extra],
        capture_output=True, text=True, env=env, check=False, timeout=600)


def test_building_twice_reuses_every_variant(built) -> None:
    work, build_dir, result, first_s = built
    spec = work / "spec.yaml"
    out = work / "again.release.yaml"
    started = time.monotonic()
    done = _cli(spec, build_dir, out, "--output", "json")
    again_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert all(v["reused"] for v in report["variants"])
    assert "3 of 3 variants reused" in done.stderr
    # the same figures, not new ones
    assert [v["measurement"] for v in report["variants"]] == [
        v["measurement"] for v in result.report["variants"]]
    assert again_s < first_s / 2
    files = {v["name"]: v["file"] for v in report["variants"]}
    emitted = yaml.safe_load(out.read_text())["variants"]["micro"]["file"]
    assert emitted == files[report["tiers"]["micro"]["chosen"]]


def test_a_bad_spec_is_refused_by_name(tmp_path: Path, model_path: Path) -> None:
    spec = write_spec(tmp_path, model_path, candidates=[{"name": "x", "type": "Q9_9"}],
                      tiers=ROOMY)
    done = _cli(spec, tmp_path / "build", tmp_path / "out.yaml")
    assert done.returncode == 2
    assert "unknown quantization type 'Q9_9'" in done.stderr
    assert not (tmp_path / "build").exists()


def test_an_importance_matrix_weighs_the_rounding(tmp_path: Path, model_path: Path) -> None:
    imatrix = write_imatrix(model_path, tmp_path / "imatrix.gguf")
    weights = load_imatrix(imatrix)
    assert len(weights) == 210 and all(len(w) in (576, 1536) for w in weights.values())
    plain, weighed = tmp_path / "plain.gguf", tmp_path / "weighed.gguf"
    quantize(model_path, plain, "Q4_0", {}, threads=1, log=tmp_path / "plain.log")
    quantize(model_path, weighed, "Q4_0", {}, threads=1, log=tmp_path / "weighed.log",
             imatrix=imatrix)
    # same tensors and types where no guard applies, different rounding
    assert read_tensors(weighed)[5].type == read_tensors(plain)[5].type == "Q4_0"
    assert plain.read_bytes() != weighed.read_bytes()
    # a file that is not an importance matrix is refused by name
    with pytest.raises(ImatrixError, match=r"no \.in_sum2 tensors"):
        load_imatrix(model_path)
