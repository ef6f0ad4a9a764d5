#!/usr/bin/env bash
# Installs what kvgate's browser tests need, cached in the user cache dir
# beside the llama-server build, and prints where it is as shell assignments:
#
#   KVGATE_CHROMIUM=/usr/bin/chromium
#   KVGATE_NODE_MODULES=~/.cache/kvgate/browser-tools-<pins>/node_modules
#   KVGATE_SILLYTAVERN=~/.cache/kvgate/sillytavern-1.19.0/node_modules/sillytavern
#
# - Chromium from Debian (`apt-get install chromium`) when /usr/bin/chromium
#   is missing, as root or through sudo.
# - playwright-core from npm; it drives that Chromium and downloads no
#   browser.
# - SillyTavern from npm, pinned, production dependencies only. Its package
#   has no lock file, so the folder is reinstalled only when the pin changes.
#
# Each install lands in a temporary folder and is renamed into place when
# complete, so an interrupted run leaves nothing half-installed behind.
# Progress goes to stderr. Exits 1 if a part can't be had.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/llama-sdist.sh

SILLYTAVERN_VERSION=1.19.0
PLAYWRIGHT_VERSION=1.65.1
CHROMIUM="${KVGATE_CHROMIUM:-/usr/bin/chromium}"

log() { echo "browser-deps: $*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n "$@"
  else return 1; fi
}

ensure_chromium() {
  [[ -x "$CHROMIUM" ]] && return 0
  [[ "$CHROMIUM" == /usr/bin/chromium ]] || die "KVGATE_CHROMIUM=$CHROMIUM is not an executable"
  log "installing Debian's chromium (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
    && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium fonts-dejavu-core >&2 \
    || die "could not install chromium (apt-get install chromium, as root)"
  [[ -x "$CHROMIUM" ]] || die "apt-get installed chromium but $CHROMIUM is missing"
}

# npm_folder NAME SPEC...: installs SPEC... with npm into CACHE/NAME once.
npm_folder() {
  local name="$1"; shift
  local dest="$CACHE/$name"
  if [[ ! -f "$dest/install.ok" ]]; then
    command -v npm >/dev/null || die "npm is required (Debian: apt-get install nodejs npm)"
    log "installing $* into $dest (npm)"
    local work
    work="$(mktemp -d "$CACHE/.$name.XXXXXX")"
    (cd "$work" && echo '{"private":true}' > package.json \
      && npm install --omit=dev --no-audit --no-fund --loglevel=error "$@" >&2) \
      || { rm -rf "$work"; die "npm install $* failed"; }
    touch "$work/install.ok"
    rm -rf "$dest"
    mv "$work" "$dest"
  fi
  echo "$dest/node_modules"
}

main() {
  command -v node >/dev/null || die "node is required (Debian: apt-get install nodejs npm)"
  CACHE="$(llama_cache_root)"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.browser-deps.lock"
  flock 9
  ensure_chromium
  local tools st
  tools="$(npm_folder "browser-tools-playwright-$PLAYWRIGHT_VERSION" "playwright-core@$PLAYWRIGHT_VERSION")"
  st="$(npm_folder "sillytavern-$SILLYTAVERN_VERSION" "sillytavern@$SILLYTAVERN_VERSION")"
  [[ -f "$st/sillytavern/server.js" ]] || die "no server.js in $st/sillytavern"
  echo "KVGATE_CHROMIUM=$CHROMIUM"
  echo "KVGATE_NODE_MODULES=$tools"
  echo "KVGATE_SILLYTAVERN=$st/sillytavern"
  echo "KVGATE_SILLYTAVERN_VERSION=$SILLYTAVERN_VERSION"
}

main "$@"
