#!/usr/bin/env bash
# Runs every kvgate test on a fresh machine: builds (or reuses the cached)
# pinned llama-server for the end-to-end tests, then `cargo test`.
# Under CI=true a llama-server that can't be had fails the run; it is never
# skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "test.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi

LLAMA_SERVER="$(bash scripts/build-llama-server.sh)"
export LLAMA_SERVER
echo "test.sh: using llama-server at $LLAMA_SERVER" >&2

# Two cores: keep test binaries from starving each other's real servers.
cargo test --locked --no-fail-fast -- --test-threads 4
