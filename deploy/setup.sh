#!/usr/bin/env bash
# Install everything GradProbe needs on a fresh Debian machine, idempotently:
# system packages, a virtualenv in .venv, and the project with its Python packages.
# Fast when nothing changed: each step checks before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist prometheus)
# TorchServe's frontend is Java (17 or newer); the tests run a real TorchServe.
command -v java >/dev/null || APT_PACKAGES+=(openjdk-17-jre-headless)
# The Node client's tests (clients/node) need node and npm; nodesource's nodejs brings its npm.
command -v node >/dev/null || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null || APT_PACKAGES+=(npm)
PYTHON=${PYTHON:-python3}
VENV=.venv

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*  (re-run as root, or install these packages first)"; exit 1
  fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y -q "${missing[@]}" >/dev/null \
    || { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the dependency list changed.
stamp="$VENV/.gradprobe-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing Python packages (torch is large: a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -e '.[fit,torchserve,dev]' 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, torchvision, service.cli" \
    || { log "the Python install failed; see the pip output above"; exit 1; }
  echo "$want" > "$stamp"
fi

# The Node client's packages, again only when its lock file changed (npm ci empties
# node_modules first, so the stamp inside it never outlives the packages).
node_stamp=clients/node/node_modules/.gradprobe-installed
want=$(sha256sum clients/node/package-lock.json | cut -d' ' -f1)
if [ ! -f "$node_stamp" ] || [ "$(cat "$node_stamp")" != "$want" ]; then
  log "installing the Node client's packages (clients/node)"
  (cd clients/node && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null)
  echo "$want" > "$node_stamp"
fi
log "ready: $VENV/bin/gradprobe"
