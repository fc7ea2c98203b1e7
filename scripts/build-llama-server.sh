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
# Each is built once into the cache. llama-server is built whole, with the
# same CPU flags scripts/bootstrap.sh gives the llama-cpp-python wheel, so both
# run the same kernels. llama-perplexity is linked against the wheel's own
# libllama and libggml (the same sources, already built): only the tool and
# llama.cpp's common/ library are compiled, not ggml and libllama again. Only
# benchmarks and the build's perplexity test call this: bootstrap does not pay
# for it. Prints the binary's path as its last line.
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
wheel_lib=""
if [ "$TOOL" = llama-perplexity ]; then
    wheel_lib="$(.venv/bin/python -c 'import llama_cpp, os; print(os.path.join(os.path.dirname(os.path.realpath(llama_cpp.__file__)), "lib"))')"
    [ -f "$wheel_lib/libllama.so" ] || wheel_lib=""
    # the wheel's libraries carry its kernels and flags: the tool adds none
    [ -z "$wheel_lib" ] || flavour="wheel"
fi
# The tool and the flavour are in the path, so a binary built another way is
# never taken for this one.
target="$CACHE/$TOOL/$LLAMA_VERSION-$flavour"
binary="$target/build/bin/$TOOL"
# A binary linked against the wheel must still find it (a venv made anew
# elsewhere is rebuilt against). A llama-perplexity built whole, as this
# script once did, is used where it is already there.
for built in "$target" "$CACHE/$TOOL/$LLAMA_VERSION-native${cflags:+-noamx}"; do
    if [ -x "$built/build/bin/$TOOL" ] && [ -f "$built/.complete" ] \
            && "$built/build/bin/$TOOL" --version >/dev/null 2>&1; then
        echo "$built/build/bin/$TOOL"
        exit 0
    fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "downloading llama-cpp-python $LLAMA_VERSION sources"
.venv/bin/pip download -q --no-binary :all: --no-deps -d "$work" \
    "llama-cpp-python==$LLAMA_VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"

rm -rf "$target"
mkdir -p "$target"
if [ -n "$wheel_lib" ]; then
    # A project of llama.cpp's vendor/, common/ and tools/perplexity/ only, its
    # `llama` target the wheel's libllama (with libggml behind it).
    wrap="$work/wrap"
    mkdir -p "$wrap"
    cat > "$wrap/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.14)
project(llama-tool-on-wheel C CXX)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(LLAMA_VERSION_MAJOR 0)
set(LLAMA_VERSION_MINOR 5)
set(LLAMA_VERSION_PATCH 0)
set(LLAMA_VERSION_BASE 0.5.0)
set(LLAMA_BUILD_COMMON ON)
set(LLAMA_BUILD_NUMBER 0)
set(LLAMA_BUILD_COMMIT "llama-cpp-python-wheel")
set(BUILD_SHARED_LIBS OFF)
# no HTTPS: the tool reads a local file
set(LLAMA_OPENSSL OFF)
include(${LLAMA_SRC}/cmake/license.cmake)
function(llama_add_compile_flags)
endfunction()
find_package(Threads REQUIRED)
add_library(llama SHARED IMPORTED)
set_target_properties(llama PROPERTIES
    IMPORTED_LOCATION ${WHEEL_LIB}/libllama.so
    INTERFACE_INCLUDE_DIRECTORIES "${LLAMA_SRC}/include;${LLAMA_SRC}/ggml/include"
    INTERFACE_LINK_LIBRARIES "${WHEEL_LIB}/libggml.so;${WHEEL_LIB}/libggml-base.so")
add_subdirectory(${LLAMA_SRC}/vendor vendor)
add_subdirectory(${LLAMA_SRC}/common common)
add_subdirectory(${LLAMA_SRC}/tools/perplexity perplexity)
CMAKE
    say "configuring $TOOL against the wheel's libllama ($wheel_lib)"
    cmake -S "$wrap" -B "$target/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_SRC="$src" \
        -DWHEEL_LIB="$wheel_lib" -DCMAKE_BUILD_RPATH="$wheel_lib" >&2
    say "building $TOOL with $(nproc) jobs (one time, a few minutes)"
    cmake --build "$target/build" --target "$TOOL" -j"$(nproc)" >&2
    find "$target/build" -name "*.o" -delete
    touch "$target/.complete"
    say "$TOOL ready at $binary"
    echo "$binary"
    exit 0
fi
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
