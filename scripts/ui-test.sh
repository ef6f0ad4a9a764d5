#!/usr/bin/env bash
# Runs the browser tests (tests/ui/): the real SillyTavern web UI in headless
# Chromium, through kvgate, to the real llama-server with a tiny model.
#
#   bash scripts/ui-test.sh                      # every tests/ui/*.test.mjs
#   bash scripts/ui-test.sh tests/ui/sillytavern.test.mjs
#
# Gets its parts first: Chromium, playwright-core and SillyTavern
# (scripts/browser-deps.sh, cached), the pinned llama-server
# (scripts/build-llama-server.sh, cached; about 8 min the first time), and
# kvgate itself (cargo build --release --locked). Under CI=true a part that
# can't be had fails the run; outside CI it prints `SKIP: …` and exits 0.
#
# Environment:
#   KVGATE_UI_SCREENSHOTS=DIR  where each run saves its PNG screenshots
#                              (default: the run's folder under $TMPDIR)
#   KVGATE_UI_RECORD=DIR|F.jsonl  record every request SillyTavern's server
#                              sends to kvgate (tests/ui/lib/recorder.mjs);
#                              `node tests/ui/fixture.mjs REC > FIXTURE`
#                              turns a recording into a fixture
#   KVGATE_UI_KEEP=1           keep every run's folder (failed ones are kept)
#   KVGATE_LOG=FILTER          kvgate's log filter in the runs (default info)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "ui-test: $*" >&2; }
# A missing part: fatal under CI=true, a skip elsewhere.
missing() {
  if [[ "${CI:-}" == true ]]; then
    log "$* (CI=true: not skipping)"
    exit 1
  fi
  echo "SKIP: ui tests: $*"
  exit 0
}

command -v node >/dev/null || missing "node is not installed (Debian: apt-get install nodejs npm)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
(( node_major >= 20 )) || missing "node $(node --version) is too old (the tests need 20 or later)"
command -v cargo >/dev/null || missing "cargo is not installed (https://rustup.rs)"

# browser-deps.sh prints KVGATE_CHROMIUM=…, KVGATE_NODE_MODULES=…,
# KVGATE_SILLYTAVERN=…, KVGATE_SILLYTAVERN_VERSION=…; nothing else is taken
# from its output.
deps="$(bash scripts/browser-deps.sh)" || missing "Chromium, playwright-core or SillyTavern could not be installed (scripts/browser-deps.sh)"
while IFS= read -r line; do
  if [[ "$line" =~ ^(KVGATE_[A-Z_]+)=(.*)$ ]]; then
    export "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
  fi
done <<<"$deps"
[[ -x "${KVGATE_CHROMIUM:-}" ]] || missing "no Chromium (KVGATE_CHROMIUM=${KVGATE_CHROMIUM:-})"
[[ -d "${KVGATE_NODE_MODULES:-}/playwright-core" ]] || missing "no playwright-core in KVGATE_NODE_MODULES=${KVGATE_NODE_MODULES:-}"
[[ -f "${KVGATE_SILLYTAVERN:-}/server.js" ]] || missing "no SillyTavern in KVGATE_SILLYTAVERN=${KVGATE_SILLYTAVERN:-}"

KVGATE_LLAMA_SERVER="$(bash scripts/build-llama-server.sh)" || missing "the pinned llama-server could not be built (scripts/build-llama-server.sh)"
export KVGATE_LLAMA_SERVER

log "building kvgate (release)"
cargo build --release --locked
export KVGATE_BIN="$PWD/target/release/kvgate"

log "Chromium $KVGATE_CHROMIUM, SillyTavern ${KVGATE_SILLYTAVERN_VERSION:-?} in $KVGATE_SILLYTAVERN, llama-server $KVGATE_LLAMA_SERVER"
if (( $# == 0 )); then set -- tests/ui/*.test.mjs; fi
start=$SECONDS
status=0
node --test --test-concurrency=1 "$@" || status=$?
log "done in $((SECONDS - start)) s (exit $status)"
exit "$status"
