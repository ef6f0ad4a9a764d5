#!/usr/bin/env bash
# LLAMA_SERVER_BIN_PATH for the run through kvgate. The suite starts "llama-
# server" on --host/--port and talks to that address; this wrapper starts the
# real llama-server on a private loopback port instead, and kvgate on the
# address the suite asked for, in front of it.
#
# What kvgate needs of llama-server (README, "Start llama-server for kvgate")
# is added only where the suite gave nothing:
#   --slot-save-path  a fresh directory, also kvgate's --save-dir
#   -np               4, the slot count llama-server's automatic default picks
#                     (without its unified KV cache, which kvgate warns about)
# CONF_KVGATE_WITH_SLOTS=1 also drops the suite's --no-slots: kvgate reads
# llama-server's /slots, and without it answers 503 "the upstream's slots are
# not known yet" (the suite's tinyllama2 preset passes --no-slots).
# CONF_KVGATE_WAIT_UPSTREAM=1 starts kvgate only once llama-server answers
# /health with 200. kvgate's own /health passes llama-server's through, so
# the suite may send its first request before kvgate has polled the slots
# (every 2 s by default) and get 503 "slots not known yet"; this setting
# takes that start-up race out, to show what else differs.
# CONF_KVGATE_ARGS: more kvgate flags (split on spaces), e.g.
# "--health-interval 0.1" to shorten the time after start-up in which kvgate
# does not know llama-server's slots yet.
# The suite's --api-key stays on llama-server and is given to kvgate as
# --upstream-api-key, so that kvgate can poll /health and /slots. (Whether a
# transparent proxy should also check the key itself is an open question.)
#
# The suite stops a server with SIGTERM, then SIGKILL after 5 s. SIGTERM is
# passed to kvgate (which shuts down gracefully), then llama-server is
# stopped; both children also carry --pdeathsig KILL, so a SIGKILL of this
# wrapper takes them with it.
#
# Env (set by conformance.sh): CONF_LLAMA_SERVER, CONF_KVGATE, CONF_MODEL,
# CONF_RUN_DIR (scratch space and logs).
set -euo pipefail
. "$(dirname "$0")/model-args.sh"
: "${CONF_LLAMA_SERVER:?}" "${CONF_KVGATE:?}" "${CONF_RUN_DIR:?}"

# Two distinct free loopback ports, for llama-server and kvgate's admin
# port. Chosen below the kernel's ephemeral range (32768 and up), so no
# port the kernel hands out meanwhile (to a client, or to another bind to
# port 0) can take them, and both sockets are held until both are chosen,
# so the two can't be the same port.
free_ports() {
  python3 - <<'PY'
import random, socket
held = []
while len(held) < 2:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(20000, 32000)))
        held.append(s)
    except OSError:
        s.close()
print(*(s.getsockname()[1] for s in held))
PY
}

# Pull out what kvgate has to know; everything else goes to llama-server.
host="127.0.0.1" port="8080" api_key="" save_path="" np=""
rewrite_model_args "$@"
rest=() i=0
while (( i < ${#ARGS[@]} )); do
  a="${ARGS[i]}" v="${ARGS[i+1]:-}"
  case "$a" in
    --host) host="$v"; i=$((i + 2)); continue ;;
    --port) port="$v"; i=$((i + 2)); continue ;;
    --api-key) api_key="$v" ;;
    --slot-save-path) save_path="$v" ;;
    -np | --parallel) np="$v" ;;
    --no-slots) if [[ "${CONF_KVGATE_WITH_SLOTS:-}" == 1 ]]; then i=$((i + 1)); continue; fi ;;
  esac
  rest+=("$a"); i=$((i + 1))
done

scratch="$(mktemp -d "$CONF_RUN_DIR/instance.XXXXXX")"
if [[ -z "$save_path" ]]; then
  save_path="$scratch/slots"; mkdir -p "$save_path"
  rest+=(--slot-save-path "$save_path")
fi
if [[ -z "$np" ]]; then rest+=(-np 4); fi

# kvgate listens where llama-server would: every address of --host.
listen=""
IFS=',' read -r -a hosts <<<"$host"
for h in "${hosts[@]}"; do
  if [[ "$h" == *:* ]]; then h="[$h]"; fi
  listen+="${listen:+,}$h:$port"
done
read -r private_port admin_port < <(free_ports)

echo "via-kvgate: llama-server on 127.0.0.1:$private_port (log $scratch/llama-server.log)," \
     "kvgate on $listen (log $scratch/kvgate.log)"
echo "via-kvgate: llama-server args: ${rest[*]}"

# GCP mode (AIP_MODE) makes llama-server take its port from AIP_HTTP_PORT.
# llama-server's output reaches the suite as it does directly: some tests
# read its log lines (and fail alike on what a random model writes there).
llama_env=()
if [[ -n "${AIP_HTTP_PORT:-}" ]]; then llama_env=(env "AIP_HTTP_PORT=$private_port"); fi
"${llama_env[@]}" setpriv --pdeathsig KILL "$CONF_LLAMA_SERVER" "${rest[@]}" \
  --host 127.0.0.1 --port "$private_port" > >(tee "$scratch/llama-server.log") 2>&1 &
llama_pid=$!

wait_for_upstream() {
  local url="http://127.0.0.1:$private_port/health"
  python3 - "$url" "$api_key" "$llama_pid" <<'PY' || { echo "via-kvgate: llama-server never became healthy"; exit 1; }
import os, sys, time, urllib.request
url, key, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 120
while time.time() < deadline:
    try:
        os.kill(pid, 0)  # llama-server gone (e.g. a bad flag): stop waiting
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(1)
    except (ProcessLookupError, FileNotFoundError):
        sys.exit(1)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        if urllib.request.urlopen(req, timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.02)
sys.exit(1)
PY
}
if [[ "${CONF_KVGATE_WAIT_UPSTREAM:-}" == 1 ]]; then wait_for_upstream; fi

kv_args=(--listen "$listen" --upstream "http://127.0.0.1:$private_port"
         --save-dir "$save_path")
if [[ -n "$api_key" ]]; then kv_args+=(--upstream-api-key "$api_key"); fi
# shellcheck disable=SC2206 # a word list on purpose
kv_args+=(${CONF_KVGATE_ARGS:-})
# kvgate's log goes to the suite's output too, so a failing test shows it.
start_kvgate() {
  setpriv --pdeathsig KILL "$CONF_KVGATE" "${kv_args[@]}" --admin-listen "127.0.0.1:$admin_port" \
    > >(tee -a "$scratch/kvgate.log") 2>&1 &
  kvgate_pid=$!
}
# The admin port is free when chosen, but another program on the machine may
# bind it before kvgate does (seen once while other test runs shared the
# machine): kvgate then exits at once, naming the address. Choose again.
start_kvgate
for _ in 1 2 3; do
  for _ in $(seq 50); do
    kill -0 "$kvgate_pid" 2>/dev/null || break
    grep -q "kvgate listening" "$scratch/kvgate.log" 2>/dev/null && break 2
    sleep 0.02
  done
  kill -0 "$kvgate_pid" 2>/dev/null && break
  grep -q "cannot listen on 127.0.0.1:$admin_port" "$scratch/kvgate.log" || break
  wait "$kvgate_pid" 2>/dev/null || true
  read -r _ admin_port < <(free_ports)
  echo "via-kvgate: the admin port was taken; kvgate again with admin port $admin_port"
  start_kvgate
done

stop() {
  kill -TERM "$kvgate_pid" 2>/dev/null || true
  wait "$kvgate_pid" 2>/dev/null || true
  kill -TERM "$llama_pid" 2>/dev/null || true
  wait "$llama_pid" 2>/dev/null || true
  exit 143
}
trap stop TERM INT HUP

# Whichever dies first ends the pair: the suite sees the exit as a crash.
set +e
wait -n "$kvgate_pid" "$llama_pid"
rc=$?
echo "via-kvgate: a child exited ($rc); stopping the other"
kill -TERM "$kvgate_pid" "$llama_pid" 2>/dev/null
wait
exit "$rc"
