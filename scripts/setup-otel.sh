#!/usr/bin/env bash
# Installs real OpenTelemetry GenAI instrumentations for the `openai` client, each in its own
# directory under ~/.cache/rollstream/otel/<name> (never into .venv: they pin opentelemetry
# versions of their own). Use one with PYTHONPATH=<dir> so that its packages win over .venv's:
#
#   PYTHONPATH=~/.cache/rollstream/otel/openai-v2 .venv/bin/python tests/producers/otel_agent.py ...
#
# Idempotent: a variant whose <dir>/.done holds the same package spec is skipped.
# Usage: scripts/setup-otel.sh [variant ...]   (default: all variants)
# Env: ROLLSTREAM_OTEL_DIR (default ~/.cache/rollstream/otel), PYTHON (default <repo>/.venv/bin/python)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
base="${ROLLSTREAM_OTEL_DIR:-$HOME/.cache/rollstream/otel}"

# The SDK and the OTLP/HTTP exporter, the same in every variant. protobuf is pinned because
# `--pre` (needed by openai-v2) would otherwise pick a protobuf release candidate.
# openai-v2 2.4b0 asks for opentelemetry-util-genai>=0.4b0.dev, but imports
# opentelemetry.util.genai.instruments, which util-genai 1.2b0 renamed to _instruments:
# 1.1b0 is the newest util-genai it works with.
otel_sdk="opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 protobuf==7.36.2"

declare -A spec=(
  [openai-v2]="--pre opentelemetry-instrumentation-openai-v2==2.4b0 opentelemetry-util-genai==1.1b0 $otel_sdk"
  # The same 2.4b0 with util-genai 0.4b0, the last one whose is_experimental_mode() reads
  # OTEL_SEMCONV_STABILITY_OPT_IN: without it, the v1.30 conventions (content in gen_ai.*.message
  # and gen_ai.choice log events). With util-genai >= 1.0 that path is unreachable.
  [openai-v2-legacy]="--pre opentelemetry-instrumentation-openai-v2==2.4b0 opentelemetry-util-genai==0.4b0 $otel_sdk"
  [openllmetry]="opentelemetry-instrumentation-openai==0.62.4 $otel_sdk"
  [openllmetry-054]="opentelemetry-instrumentation-openai==0.54.0 $otel_sdk"
  [openinference]="openinference-instrumentation-openai==0.1.66 $otel_sdk"
  # ~150 packages (litellm[proxy], agentops, polars, grpcio, ...), several hundred MB.
  [agentlightning]="agentlightning==0.3.0 $otel_sdk"
)
# The module that must import from the variant's directory.
declare -A module=(
  [openai-v2]="opentelemetry.instrumentation.openai_v2"
  [openai-v2-legacy]="opentelemetry.instrumentation.openai_v2"
  [openllmetry]="opentelemetry.instrumentation.openai"
  [openllmetry-054]="opentelemetry.instrumentation.openai"
  [openinference]="openinference.instrumentation.openai"
  [agentlightning]="agentlightning"
)
order=(openai-v2 openai-v2-legacy openllmetry openllmetry-054 openinference agentlightning)

if [[ $# -gt 0 ]]; then
  variants=("$@")
else
  variants=("${order[@]}")
fi

failed=()
for name in "${variants[@]}"; do
  if [[ -z "${spec[$name]+x}" ]]; then
    echo "setup-otel: unknown variant '$name' (known: ${order[*]})" >&2
    exit 2
  fi
  dir="$base/$name"
  want="${spec[$name]}"
  if [[ -f "$dir/.done" && "$(cat "$dir/.done")" == "$want" ]]; then
    echo "setup-otel: $name: up to date ($dir)"
    continue
  fi
  echo "setup-otel: $name: installing $want into $dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  start=$SECONDS
  # shellcheck disable=SC2086  # the spec is a list of words
  if ! "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-warn-conflicts \
      --target "$dir" $want; then
    echo "setup-otel: $name: pip install FAILED for: $want" >&2
    failed+=("$name")
    continue
  fi
  if ! LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONPATH="$dir" "$python" -c "
import importlib, sys
m = importlib.import_module('${module[$name]}')
import opentelemetry.sdk.trace as t, opentelemetry.exporter.otlp.proto.http.trace_exporter as e
for mod in (m, t, e):
    assert mod.__file__.startswith('$dir'), f'{mod.__name__} imported from {mod.__file__}, not $dir'
"; then
    echo "setup-otel: $name: installed, but '${module[$name]}' does not import from $dir" >&2
    failed+=("$name")
    continue
  fi
  printf '%s' "$want" > "$dir/.done"
  echo "setup-otel: $name: done in $((SECONDS - start))s, $(du -sh "$dir" | cut -f1)"
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "setup-otel: FAILED: ${failed[*]}" >&2
  exit 1
fi
