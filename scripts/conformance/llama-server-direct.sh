#!/usr/bin/env bash
# LLAMA_SERVER_BIN_PATH for the direct run: the pinned llama-server itself,
# with the model flags rewritten to the tiny local model (model-args.sh).
set -euo pipefail
. "$(dirname "$0")/model-args.sh"
rewrite_model_args "$@"
exec "${CONF_LLAMA_SERVER:?CONF_LLAMA_SERVER is not set}" "${ARGS[@]}"
