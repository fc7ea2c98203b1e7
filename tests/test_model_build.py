"""``slmfleet models build`` on the real SmolLM2-135M: quantize, measure, choose, emit.

One build of three candidates is shared by every test (the ``built``
fixture). It goes into the cache (:func:`tests.support.build.shared_build_dir`),
where the build's own keys (source, types, llama-cpp-python version, the
measuring settings) decide what is reused: the first session on a machine
quantizes and measures, later ones and the other tests here reuse those
variants, as a second `models build` of the same spec does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from controlplane.release_spec import build_manifest, load_spec
from modelbuild import BuildSpecError, NoVariantFits, load_build_spec, run_build
from modelbuild.imatrix import ImatrixError, load_imatrix
from modelbuild.quantize import quantize
from modelbuild.tensors import read_tensors
from protocol import Tier
from tests.support.auth import ADMIN_HEADERS
from tests.support.build import ROOT, shared_build_dir, write_imatrix, write_spec
from tests.support.updates import built_onnx_folder

CANDIDATES = [
    {"name": "q8_0", "type": "Q8_0"},
    {"name": "q5_0", "type": "Q5_0"},
    {"name": "q4_0-mixed", "type": "Q4_0", "overrides": {"attn_v": "Q8_0"}},
]
#: loose floors and roomy budgets: every candidate qualifies everywhere
ROOMY = {"micro": {"ram_bytes": 8 << 30, "context": 512},
         "small": {"ram_bytes": 8 << 30, "context": 1024}}
LOOSE = {"max_perplexity_increase": 1.0, "min_eval_ratio": 0.5}
LOOSE_ONNX = {"max_perplexity_increase": 1.0, "min_eval_ratio": 0.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_path: Path):
    """(work dir, build dir, the build's result, its seconds), the build dir shared."""
    work = tmp_path_factory.mktemp("model-build")
    spec = write_spec(work, model_path, candidates=CANDIDATES, tiers=ROOMY, floors=LOOSE)
    with shared_build_dir() as build_dir:
        started = time.monotonic()
        result = run_build(spec, build_dir, out=work / "spec.release.yaml")
        yield work, build_dir, result, time.monotonic() - started


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
        # the weights, the KV cache and the compute buffers: more than the file
        assert m["ram_bytes"]["512"] > m["size_bytes"]
        assert 0 < m["runtime_base_bytes"] < 200 << 20
    by_name = {v["name"]: v for v in report["variants"]}
    # the types each tensor really holds, read back from the files
    assert by_name["q8_0"]["measurement"]["tensor_types"]["Q8_0"] > 200
    assert by_name["q5_0"]["measurement"]["tensor_types"]["Q5_0"] > 200
    mixed = read_tensors(Path(by_name["q4_0-mixed"]["file"]))
    types = {t.name: t.type for t in mixed}
    assert types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    # a smaller file for fewer bits
    sizes = {n: v["measurement"]["size_bytes"] for n, v in by_name.items()}
    assert sizes["q8_0"] > sizes["q5_0"] > sizes["q4_0-mixed"]
    assert Path(report["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ram_is_the_models_own_and_follows_the_file_size(built) -> None:
    _, _, result, _ = built
    rows = [v["measurement"] for v in result.report["variants"]]
    by_size = sorted(rows, key=lambda m: m["size_bytes"])
    for context in ("512", "1024"):
        ram = [m["ram_bytes"][context] for m in by_size]
        # smaller file, less RAM (Q4_0's repacked weights counted once, not twice)
        assert ram == sorted(ram) and len(set(ram)) == len(ram), (context, ram)
        # the weights' difference shows in RAM: not swamped by the process around them
        gap = by_size[-1]["size_bytes"] - by_size[0]["size_bytes"]
        assert ram[-1] - ram[0] > gap * 0.8, (ram, gap)
    for m in rows:
        # a longer context costs more: a larger KV cache
        assert m["ram_bytes"]["1024"] > m["ram_bytes"]["512"]


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
    ram = {n: rows[n]["ram_bytes"]["512"] + rows[n]["runtime_base_bytes"] for n in names}
    # the budget is the second-highest figure: whatever needs the most does not fit
    budget = sorted(ram.values())[-2]
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


def test_published_build_pins_its_eval_set_in_the_signed_manifest(
        built, tmp_path: Path, broker, cp_credentials) -> None:
    from typer.testing import CliRunner

    from controlplane.service import ControlPlane
    from slmfleet.app import build_app
    from tests.support.controlplane import cp_settings

    work, _, result, _ = built
    emitted = yaml.safe_load(result.release_spec.read_text())
    eval_file = Path(emitted["eval_set"]["path"])
    assert eval_file == work / "eval.json"
    runner = CliRunner()

    def cli(*args: str) -> str:
        done = runner.invoke(build_app(args[0]), list(args))
        assert done.exit_code == 0, done.output
        return done.output

    keyid = cli("keys", "generate", "--role", "release", "--out", str(tmp_path / "k")).split()[1]
    key = tmp_path / "k" / f"{keyid}.key"
    pinned = tmp_path / "release-keys.json"
    cli("keys", "list", "--role", "release", "--key", str(key), "--out", str(pinned))
    plane = ControlPlane(cp_settings(tmp_path / "cp", broker, cp_credentials,
                                     release_keys_file=pinned)).start()
    try:
        server = plane.api_url
        cli("models", "publish", "--spec", str(result.release_spec), "--key", str(key),
            "--server", server)
        detail = httpx.get(f"{server}/v1/models/smollm2/versions/1.1.0",
                           headers=ADMIN_HEADERS).json()
        pinned_set = detail["manifest"]["eval_set"]
        assert pinned_set["sha256"] == hashlib.sha256(eval_file.read_bytes()).hexdigest()
        assert pinned_set["items"] == len(json.loads(eval_file.read_text())["items"])
        # the file itself is served from the store under the pinned path
        served = httpx.get(f"{server}/v1/artifacts/{pinned_set['artifact']}")
        assert served.status_code == 200 and served.content == eval_file.read_bytes()
    finally:
        plane.stop()


def test_a_floor_nothing_meets_refuses_the_tier_naming_the_figure(built, model_path) -> None:
    work, build_dir, _, _ = built
    spec = write_spec(work, model_path, candidates=[CANDIDATES[2]],
                      tiers=ROOMY,
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
    work, build_dir, result, _ = built
    spec = work / "spec.yaml"
    out = work / "again.release.yaml"
    done = _cli(spec, build_dir, out, "--output", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert all(v["reused"] for v in report["variants"])
    assert "3 of 3 variants reused" in done.stderr
    # the same figures, not new ones
    assert [v["measurement"] for v in report["variants"]] == [
        v["measurement"] for v in result.report["variants"]]
    files = {v["name"]: v["file"] for v in report["variants"]}
    emitted = yaml.safe_load(out.read_text())["variants"]["micro"]["file"]
    assert emitted == files[report["tiers"]["micro"]["chosen"]]


def test_an_onnx_candidate_is_measured_and_chosen_for_the_onnx_tier(built, model_path) -> None:
    work, build_dir, _, _ = built
    folder = built_onnx_folder()
    candidates = [CANDIDATES[0], {"name": "onnx-int4", "format": "onnx", "type": "int4",
                                  "folder": str(folder)}]
    # the shared build's contexts, so the source and q8_0 are reused and only the folder
    # is measured
    # the int4 build is judged against floors of its own tier: it is far below the GGUF's
    tiers = {"micro": ROOMY["micro"],
             "small": {**ROOMY["small"], "format": "onnx", "floors": LOOSE_ONNX}}
    spec = write_spec(work, model_path, candidates=candidates, tiers=tiers, name="onnx.yaml")
    done = run_build(spec, build_dir, out=work / "onnx.release.yaml")
    rows = {v["name"]: v for v in done.report["variants"]}
    onnx = rows["onnx-int4"]["measurement"]
    # the same figures as a GGUF gets, from onnxruntime-genai
    assert onnx["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir()
                                     if p.is_file() and not p.name.startswith("."))
    assert 1 < onnx["perplexity"] < 1000
    assert 0 <= onnx["eval_score"] <= 1 and set(onnx["answers"]) == set(
        rows["q8_0"]["measurement"]["answers"])
    assert onnx["tokens_per_s"] > 0 and onnx["ttft_ms"] > 0
    assert onnx["ram_bytes"]["1024"] > onnx["ram_bytes"]["512"] > 0
    assert rows["q8_0"]["reused"]
    # each tier judged only on its own format
    small_tier = done.report["tiers"]["small"]
    assert (small_tier["chosen"], small_tier["verdicts"]) == ("onnx-int4", {"onnx-int4": None})
    assert done.report["tiers"]["micro"]["chosen"] == "q8_0"
    # a folder variant `models publish` reads
    release = load_spec(done.release_spec)
    small = release.variants[Tier.SMALL]
    assert (small.format, small.quantization, small.file) == ("onnx", "int4", folder)
    assert small.min_ram_bytes == onnx["ram_bytes"]["1024"] + onnx["runtime_base_bytes"]
    assert small.runtime_defaults.mmap is None and small.runtime_defaults.context == 1024
    assert release.variants[Tier.MICRO].format == "gguf"
    # under the spec's floors (+10 % perplexity, 0.95x the eval score) it is refused
    del tiers["small"]["floors"]
    strict = write_spec(work, model_path, candidates=candidates, tiers=tiers,
                        name="onnx-strict.yaml")
    with pytest.raises(NoVariantFits, match=r"tier small: no candidate qualifies: onnx-int4: "
                                            r"perplexity .* \(floor \+10%\)"):
        run_build(strict, build_dir, out=work / "onnx-strict.release.yaml")


def test_a_bad_spec_is_refused_by_name(tmp_path: Path, model_path: Path) -> None:
    spec = write_spec(tmp_path, model_path, candidates=[{"name": "x", "type": "Q9_9"}],
                      tiers=ROOMY)
    done = _cli(spec, tmp_path / "build", tmp_path / "out.yaml")
    assert done.returncode == 2
    assert "unknown quantization type 'Q9_9'" in done.stderr
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize(("candidates", "tiers", "message"), [
    ([{"name": "o", "format": "onnx", "type": "int4"}], ROOMY, "names its folder"),
    ([{"name": "o", "format": "onnx", "type": "int4", "folder": "."}], ROOMY,
     "not an onnxruntime-genai model folder"),
    ([{"name": "q", "type": "Q8_0", "folder": "."}], ROOMY, "folder is for onnx candidates"),
    ([{"name": "q", "type": "Q8_0"}], {"small": {"ram_bytes": 1 << 30, "format": "onnx"}},
     "tiers.small: its devices run onnx and no candidate is onnx"),
])
def test_onnx_settings_are_checked_before_anything_runs(
        tmp_path: Path, model_path: Path, candidates, tiers, message) -> None:
    spec = write_spec(tmp_path, model_path, candidates=candidates, tiers=tiers)
    with pytest.raises(BuildSpecError, match=message):
        load_build_spec(spec)


def test_models_help_lists_build() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "slmfleet", "models", "--help"],
                          capture_output=True, text=True, env=env, check=True, timeout=60)
    assert re.search(r"│ build +Quantize a model into tier variants", done.stdout), done.stdout


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
