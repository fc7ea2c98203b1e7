"""The build's perplexity against llama.cpp's own ``llama-perplexity`` on the same text.

Same model (the source GGUF), same text, same context and chunks, one
sequence per batch on both sides; ``llama-perplexity`` is built once from
the sources the pinned llama-cpp-python vendors, linked against the wheel's
own libllama and libggml (scripts/build-llama-server.sh llama-perplexity,
cached like llama-server), and run here as a process.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from modelbuild import PerplexityError, perplexity_of_file
from modelbuild.perplexity import load_scoring_model, perplexity
from tests.support.build import HELD_OUT, llama_perplexity_binary

CONTEXT = 128
CHUNKS = 4
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def test_perplexity_matches_llama_perplexity_within_one_percent(model_path: Path) -> None:
    binary = llama_perplexity_binary()
    done = subprocess.run(
        [str(binary), "-m", str(model_path), "-f", str(HELD_OUT), "-c", str(CONTEXT),
         "-b", str(CONTEXT), "--chunks", str(CHUNKS), "-t", "1"],
        capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = _FINAL.search(done.stdout + done.stderr)
    assert found, (done.stdout + done.stderr)[-2000:]
    reference = float(found.group(1))
    ours = perplexity_of_file(model_path, HELD_OUT.read_text(), CONTEXT, threads=1,
                              max_chunks=CHUNKS)
    assert ours.chunks == CHUNKS
    assert ours.scored_tokens == CHUNKS * (CONTEXT - 1 - CONTEXT // 2)
    assert abs(ours.perplexity / reference - 1) < 0.01, (ours.perplexity, reference)


def test_a_text_shorter_than_two_chunks_is_refused(model_path: Path) -> None:
    llm = load_scoring_model(model_path, CONTEXT, threads=1)
    try:
        with pytest.raises(PerplexityError, match="needs at least 256"):
            perplexity(llm, "Too short to measure.", CONTEXT)
    finally:
        llm.close()
