# Sourced by the two llama-server wrappers of scripts/conformance.sh.
#
# llama.cpp's suite names its models on Hugging Face (-hf/--hf-repo, ...) or
# by URL, and this machine has no internet. rewrite_model_args drops every
# model flag (with its value) and, when there was one, adds `-m $CONF_MODEL`,
# the tiny model that conformance.sh wrote. A command line without a model
# (llama-server's router mode) stays without one. The result is in ARGS.
rewrite_model_args() {
  ARGS=()
  local had_model="" skip=""
  for a in "$@"; do
    if [[ -n "$skip" ]]; then skip=""; continue; fi
    case "$a" in
      -m | --model | -mu | --model-url | -hf | -hfr | --hf-repo | -hff | --hf-file | \
      -md | --model-draft | -hfd | -hfrd | --hf-repo-draft | -hffd | --hf-file-draft)
        [[ "$a" == -md || "$a" == --model-draft || "$a" == -hf*d || "$a" == --hf-*-draft ]] || had_model=yes
        skip=yes ;;
      --model=* | --model-url=* | --hf-repo=* | --hf-file=*) had_model=yes ;;
      --model-draft=* | --hf-repo-draft=* | --hf-file-draft=*) ;;
      *) ARGS+=("$a") ;;
    esac
  done
  if [[ -n "$had_model" ]]; then ARGS+=(-m "${CONF_MODEL:?CONF_MODEL is not set}"); fi
}
