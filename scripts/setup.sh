#!/usr/bin/env bash
# Installs what Rollstream and its tests need, idempotently:
#   .venv with the package (Python 3.11), the Node packages of the interoperability test,
#   docker-compose (to validate infra/docker-compose.yml offline), and chromium + chromedriver
#   (the rollout viewer's browser test).
# The local stack's services download on first `rollstream stack up` (into ~/.cache/rollstream).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is missing: $2" >&2; exit 1; }
}

PY=${PYTHON:-python3}
need "$PY" "install Python 3.11"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: Python 3.11 is required ($PY is $("$PY" -V 2>&1)); set PYTHON=python3.11" >&2; exit 1; }
need java "install a JDK 17+ (Debian: apt-get install -y openjdk-17-jdk-headless)"
need mvn "install Maven (Debian: apt-get install -y maven)"
need go "install Go 1.25+"
need node "install Node.js 20+"
need npm "install npm"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  # torch comes with its CUDA libraries (there is no CPU-only torch wheel on PyPI): the first
  # install needs about 10 GiB (6.5 GiB installed, the wheels while they unpack).
  free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kib:-0}" -lt $((10 * 1024 * 1024)) ]; then
    say "WARNING: $((free_kib / 1024)) MiB free on $(df -P . | awk 'NR == 2 {print $6}'); installing torch needs about 10 GiB"
  fi
fi
say "installing the Python package, the model stack and the test tools into .venv"
# --no-cache-dir: the wheels are not kept a second time (3 GiB); .venv is what a rerun reuses.
.venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check -e ".[dev,ml,export]"

if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing docker-compose (validates the compose file without a Docker engine)"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null
  else
    echo "setup: docker-compose is missing; install it (Debian: apt-get install -y docker-compose)" >&2
    exit 1
  fi
fi

# The rollout viewer's browser test (tests/ui) drives a headless Chromium through chromedriver.
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium and chromium-driver (the rollout viewer's browser test)"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "setup: chromium and chromedriver are missing; install them (Debian: apt-get install -y chromium chromium-driver)" >&2
    exit 1
  fi
fi

# Confluent's JavaScript client builds its bundled librdkafka from source, linked against
# these system libraries (its prebuilt binaries and source-dependency downloads are not
# reachable from every machine).
NODE_BUILD_DEPS="libssl-dev zlib1g-dev libsasl2-dev libzstd-dev liblz4-dev libcurl4-openssl-dev pkg-config make g++"
missing_debs() { for p in $NODE_BUILD_DEPS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done; }

NODE_DIR=tests/interop/node
if [ ! -f "$NODE_DIR/node_modules/.rollstream-installed" ] \
   || [ "$NODE_DIR/package-lock.json" -nt "$NODE_DIR/node_modules/.rollstream-installed" ]; then
  if command -v dpkg >/dev/null 2>&1 && [ -n "$(missing_debs)" ]; then
    if [ "$(id -u)" = 0 ]; then
      say "installing build dependencies: $(missing_debs | tr '\n' ' ')"
      apt-get update -q >/dev/null
      # shellcheck disable=SC2046
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(missing_debs) >/dev/null
    else
      echo "setup: install these packages first: $(missing_debs | tr '\n' ' ')" >&2
      exit 1
    fi
  fi
  say "installing Confluent's JavaScript clients (builds librdkafka from source: ~2-3 minutes, once)"
  # node-gyp compiles against the installed Node headers instead of downloading them.
  nodedir=$(dirname "$(dirname "$(command -v node)")")
  [ -f "$nodedir/include/node/node.h" ] && export npm_config_nodedir="$nodedir"
  (cd "$NODE_DIR" && CKJS_LINKING=dynamic npm_config_build_from_source=true \
     npm ci --no-audit --no-fund --loglevel=error)
  touch "$NODE_DIR/node_modules/.rollstream-installed"
fi
say "done"
