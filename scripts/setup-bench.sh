#!/usr/bin/env bash
# Installs the peer stream processors the benchmark compares Rollstream's join with, in a venv of
# their own at ~/.cache/rollstream/bench-quix (never into .venv: quixstreams is no dependency of
# Rollstream, and it pins confluent-kafka and rocksdict versions of its own). Use it as:
#
#   ~/.cache/rollstream/bench-quix/bin/python bench/quix_peer.py --prefix <topic prefix> --out-topic <topic> ...
#
# Idempotent: when <venv>/.done holds the same package spec and the packages import, nothing is done.
# Usage: scripts/setup-bench.sh
# Env: ROLLSTREAM_BENCH_QUIX_DIR (default ~/.cache/rollstream/bench-quix),
#      PYTHON (default: the first Python 3.11 found: python3.11, then ~/.pyenv/versions/3.11.*)
set -euo pipefail

dir="${ROLLSTREAM_BENCH_QUIX_DIR:-$HOME/.cache/rollstream/bench-quix}"
# quixstreams 3.28.1 brings confluent-kafka 2.x and rocksdict (RocksDB) wheels for CPython 3.11 on
# x86_64 and aarch64 Linux. fastavro and orjson are what bench/quix_peer.py decodes and encodes with.
want="quixstreams==3.28.1 fastavro==1.13.1 orjson==3.13.0"

check='import quixstreams, fastavro, orjson, rocksdict, sys; sys.exit(sys.version_info[:2] != (3, 11))'
if [[ -f "$dir/.done" && "$(cat "$dir/.done")" == "$want" ]] && "$dir/bin/python" -c "$check" 2>/dev/null; then
  echo "setup-bench: quixstreams: up to date ($dir)"
  exit 0
fi

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  for candidate in python3.11 "$HOME"/.pyenv/versions/3.11.*/bin/python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      py="$candidate"
      break
    fi
  done
fi
if [[ -z "$py" ]]; then
  echo "setup-bench: no Python 3.11 with venv and ensurepip found; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

echo "setup-bench: quixstreams: creating $dir with $py ($("$py" -V 2>&1)), installing $want"
start=$SECONDS
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
"$py" -m venv "$dir"
# shellcheck disable=SC2086  # the spec is a list of words
if ! "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location $want; then
  echo "setup-bench: quixstreams: pip install FAILED for: $want" >&2
  exit 1
fi
# (quixstreams' import of authlib prints a DeprecationWarning about httpx on stderr: only shown on failure.)
if ! err=$("$dir/bin/python" -c "$check" 2>&1); then
  echo "$err" >&2
  echo "setup-bench: quixstreams: installed, but quixstreams, fastavro, orjson or rocksdict does not import" >&2
  exit 1
fi
printf '%s' "$want" > "$dir/.done"
versions=$("$dir/bin/python" -c 'import quixstreams, confluent_kafka, rocksdict, fastavro, orjson
print("quixstreams", quixstreams.__version__, "confluent-kafka", confluent_kafka.__version__,
      "librdkafka", confluent_kafka.libversion()[0], "fastavro", fastavro.__version__, "orjson", orjson.__version__)' 2>/dev/null)
echo "setup-bench: quixstreams: done in $((SECONDS - start))s, $(du -sh "$dir" | cut -f1) ($versions)"
