#!/usr/bin/env bash
# Build the ONNX (onnxruntime-genai, int4, CPU) SmolLM2-135M-Instruct from the
# same Q4_1 GGUF the tests use, once, into the cache:
#
#   $CACHE/models/onnx-genai-<key>/   model.onnx, model.onnx.data,
#                                     genai_config.json, tokenizer files
#
# onnxruntime-genai's model builder reads only float16/float32 GGUF, and
# fetches config and tokenizer from a hub unless it is given a local folder.
# So, as Olive does: transformers loads the Q4_1 GGUF (dequantizing it),
# save_pretrained writes a local folder, and the builder quantizes that
# folder to int4. <key> names every input of the result (torch, transformers,
# gguf, onnxruntime-genai and the GGUF's sha256): a folder with that name is
# the finished build, and a second run finds it and does nothing else.
#
# torch and transformers are needed for the conversion only: they live in a
# build environment under the cache, never in the project's .venv. PyPI's
# torch wheel is built against CUDA and links libcudnn and friends at import
# (`import torch` without its nvidia-* dependencies fails: "libcudnn.so.9:
# cannot open shared object file"), and only PyPI is reachable, so the build
# environment takes torch with its CUDA wheels (3-4 GB, one time; the
# conversion itself runs on the CPU).
#
# Prints a line per step; everything else goes to the log named at the start.
# Prints the model folder's path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SLMFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slmfleet}"
GGUF="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH="torch==2.14.1"
TRANSFORMERS="transformers==5.25.0"
GGUF_PY="gguf==0.19.0"
GENAI="onnxruntime-genai==0.18.0"
# accelerate: transformers loads a GGUF only with it; the rest is what the builder imports
# (onnxruntime's quantizer writes the int4 weights: pinned like the rest).
BUILD_REQS=("$TORCH" "$TRANSFORMERS" "$GGUF_PY" "$GENAI" accelerate==1.16.0 onnx==1.23.2
            onnx-ir==1.1.0 onnxruntime==1.32.0 safetensors==0.8.0)

started=$SECONDS
say() { printf '\033[1m==> [%3ds] %s\033[0m\n' "$((SECONDS - started))" "$*" >&2; }

if [ ! -s "$GGUF" ]; then
    echo "error: $GGUF is missing: run scripts/bootstrap.sh first" >&2
    exit 1
fi
version() { echo "${1#*==}"; }
gguf_sha="$(sha256sum "$GGUF" | cut -c1-16)"
key="torch$(version $TORCH)-tf$(version $TRANSFORMERS)-gguf$(version $GGUF_PY)"
key="$key-genai$(version $GENAI)-int4-cpu-$(echo "${BUILD_REQS[*]}" | sha256sum | cut -c1-8)"
key="$key-$gguf_sha"
target="$CACHE/models/onnx-genai-$key"
if [ -f "$target/genai_config.json" ]; then
    echo "$target"
    exit 0
fi

mkdir -p "$CACHE/logs" "$CACHE/build"
log="$CACHE/logs/build-onnx-genai-$key.log"
: > "$log"
say "building the ONNX SmolLM2 ($key); log: $log"

# The environment is keyed by its requirements alone: a new GGUF rebuilds the
# model without downloading torch again.
venv="$CACHE/build/onnx-genai-env-$(echo "${BUILD_REQS[*]}" | sha256sum | cut -c1-12)"
if [ ! -f "$venv/.complete" ]; then
    say "creating the build environment (torch with its CUDA wheels: 3-4 GB, one time)"
    rm -rf "$venv"
    python3 -m venv "$venv" >>"$log" 2>&1
    "$venv/bin/pip" install -q --upgrade pip >>"$log" 2>&1
    "$venv/bin/pip" install "${BUILD_REQS[@]}" >>"$log" 2>&1
    touch "$venv/.complete"
fi
say "checking torch runs on this CPU"
"$venv/bin/python" -c 'import torch; (torch.ones(2, 2) @ torch.ones(2, 2)).sum().item()' \
    >>"$log" 2>&1

work="$(mktemp -d "$CACHE/build/onnx-genai-work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say "dequantizing the Q4_1 GGUF to a float32 transformers folder"
HF_HUB_OFFLINE=1 "$venv/bin/python" - "$GGUF" "$work/hf" >>"$log" 2>&1 <<'PY'
import pathlib, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = pathlib.Path(sys.argv[1])
out = sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                             dtype=torch.float32)
# The weights are float32 now; transformers still marks the model as
# GGUF-quantized and refuses to save it until the mark is gone.
assert {p.dtype for p in model.parameters()} == {torch.float32}
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print("saved", out, "chat template:", bool(tokenizer.chat_template))
PY

say "quantizing to int4 with onnxruntime-genai's model builder"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m onnxruntime_genai.models.builder \
    -i "$work/hf" -o "$work/out" -p int4 -e cpu -c "$work/hf-cache" >>"$log" 2>&1

say "checking the built model answers"
"$venv/bin/python" - "$work/out" >>"$log" 2>&1 <<'PY'
import json, sys
import onnxruntime_genai as og

model = og.Model(sys.argv[1])
tokenizer = og.Tokenizer(model)
prompt = tokenizer.apply_chat_template(
    json.dumps([{"role": "user", "content": "What is the capital of France?"}]),
    add_generation_prompt=True)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done() and generator.token_count() < 48:
    generator.generate_next_token()
answer = tokenizer.decode(generator.get_sequence(0))
print(answer)
assert "Paris" in answer, answer
PY

# The folder appears whole or not at all: a build cut short leaves only $work.
rm -rf "$target.partial"
mkdir -p "$target.partial"
cp "$work/out"/* "$target.partial"/
mv "$target.partial" "$target"
say "ready in $((SECONDS - started)) s: $target"
echo "$target"
