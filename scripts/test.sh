#!/usr/bin/env bash
# Runs every kvgate test on a fresh machine: builds (or reuses the cached)
# pinned llama-server for the end-to-end tests, then `cargo test`, then
# llama.cpp's own server tests straight and through kvgate, then the
# SillyTavern extension's own tests and the browser tests (the real
# SillyTavern in headless Chromium; scripts/ui-test.sh installs and caches
# Chromium, playwright-core and SillyTavern).
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

# Unit, integration and end-to-end tests (there are no doc-tests). The last
# line sums cargo's per-binary results so the run closes on its real total.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --no-fail-fast --lib --bins --tests -- --test-threads 4 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [[ "$status" -ne 0 ]]; then
  echo "test.sh: cargo test exited $status (a failing test, or a test binary that crashed or did not build)" >&2
fi
# llama.cpp's own server test suite, straight and through kvgate: a test
# whose outcome differs fails the run (scripts/conformance.sh).
conformance_out="$(mktemp -d "${TMPDIR:-/tmp}/kvgate-conformance.XXXXXX")"
set +e
CONF_OUT="$conformance_out" bash scripts/conformance.sh
conformance=$?
set -e
if [[ "$conformance" -ne 0 ]]; then
  echo "test.sh: llama.cpp's server tests differ through kvgate (or could not run): see $conformance_out" >&2
  status=1
else
  rm -rf "$conformance_out"
fi
# The SillyTavern extension's unit tests (node, no browser), then the browser
# tests. node's test runner prints TAP here (not a terminal): `# pass N`,
# `# fail N`, summed below with cargo's results.
set +e
if ! command -v node >/dev/null; then
  echo "test.sh: node is not installed (Debian: apt-get install nodejs npm)" >&2
  status=1
else
  (cd clients/sillytavern && node --test test/*.test.js) 2>&1 | tee -a "$log"
  [[ "${PIPESTATUS[0]}" -eq 0 ]] || { echo "test.sh: the extension's tests failed" >&2; status=1; }
fi
bash scripts/ui-test.sh 2>&1 | tee -a "$log"
[[ "${PIPESTATUS[0]}" -eq 0 ]] || { echo "test.sh: the browser tests failed" >&2; status=1; }
set -e
# Skipped end-to-end tests say SKIP (only possible outside CI).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^# pass [0-9]+$/ { p += $3 }
     /^# fail [0-9]+$/ { f += $3 }
     /^SKIP:/ { s += 1 }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
if [[ "$conformance" -eq 0 ]]; then
  echo "llama.cpp server suite: no test differs through kvgate"
else
  echo "llama.cpp server suite: FAILED (see above)"
fi
exit "$status"
