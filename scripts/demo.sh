#!/usr/bin/env bash
# `kvgate demo` on a fresh machine, in one command: builds the pinned
# llama-server once if needed (scripts/build-llama-server.sh, which caches it
# in the user cache dir: about 8 minutes on 2 cores the first time), then
# builds and runs `kvgate demo` with it. Nothing else is installed, and the
# demo leaves nothing running.
#
#   bash scripts/demo.sh                  # temporary files, removed at the end
#   bash scripts/demo.sh --keep DIR       # keep the model and the saves in DIR
#   LLAMA_SERVER=/path bash scripts/demo.sh, or --llama-server /path: use that
#                                         binary, build none
#
# Needs: cargo; for the llama-server build, python3 with pip and venv, and a
# C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "demo.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi

given=""
for arg in "$@"; do
  case "$arg" in
    --llama-server | --llama-server=*) given=yes ;;
  esac
done
if [[ -z "$given" ]]; then
  # The script prints only the binary's path on stdout (LLAMA_SERVER, when
  # set, as is); its progress goes to stderr.
  LLAMA_SERVER="$(bash scripts/build-llama-server.sh)"
  export LLAMA_SERVER
fi
exec cargo run --locked --release -- demo "$@"
