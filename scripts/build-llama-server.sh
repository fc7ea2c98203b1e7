#!/usr/bin/env bash
# Build one of llama.cpp's own tools from the llama.cpp sources that the pinned
# llama-cpp-python sdist vendors:
#
#   scripts/build-llama-server.sh                   llama-server, the peer the
#                                                   inference benchmark measures
#                                                   the agent against
#   scripts/build-llama-server.sh llama-perplexity  the reference that
#                                                   `slmfleet models build`'s
#                                                   perplexity is checked against
#
# Each is built once into the cache, with the same CPU flags
# scripts/bootstrap.sh gives the llama-cpp-python wheel, so both run the same
# kernels. Only benchmarks and the build's perplexity test call this: bootstrap
# does not pay for it. Prints the binary's path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SLMFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/slmfleet}"
LLAMA_VERSION="0.3.36"

TOOL="${1:-llama-server}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

case "$TOOL" in
    llama-server|llama-perplexity) ;;
    *) echo "unknown tool: $TOOL (llama-server or llama-perplexity)" >&2; exit 2 ;;
esac

# Same flavour as the wheel: native CPU features, and on x86_64 no AMX (CPUs
# behind some hypervisors advertise AMX tiles that trap on first use).
flavour="native"
cflags=""
if [ "$(uname -m)" = x86_64 ]; then
    flavour="$flavour-noamx"
    cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# The tool and the flavour are in the path, so a binary built another way is
# never taken for this one.
target="$CACHE/$TOOL/$LLAMA_VERSION-$flavour"
binary="$target/build/bin/$TOOL"
if [ -x "$binary" ] && [ -f "$target/.complete" ]; then
    echo "$binary"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "downloading llama-cpp-python $LLAMA_VERSION sources"
.venv/bin/pip download -q --no-binary :all: --no-deps -d "$work" \
    "llama-cpp-python==$LLAMA_VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"

rm -rf "$target"
mkdir -p "$target"
say "configuring $TOOL ($LLAMA_VERSION-$flavour)"
# Shared libraries like the wheel (BUILD_SHARED_LIBS): the binary finds them
# next to it in build/bin. No web UI: LLAMA_BUILD_UI=OFF builds none and
# LLAMA_USE_PREBUILT_UI=OFF stops the build from downloading a prebuilt one.
# No HTTPS (model downloads) and no curl: both tools read a local file.
CFLAGS="$cflags" CXXFLAGS="$cflags" cmake -S "$src" -B "$target/build" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
say "building $TOOL with $(nproc) jobs (one time, several minutes)"
cmake --build "$target/build" --target "$TOOL" -j"$(nproc)" >&2
# The objects are not needed to run it: only bin/ (the binary and its libraries).
find "$target/build" -name "*.o" -delete
touch "$target/.complete"
say "$TOOL ready at $binary"
echo "$binary"
