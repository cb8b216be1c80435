#!/usr/bin/env bash
# The engine, llama.cpp and transformers on the same model and loads, interleaved rounds,
# medians; writes results.json and results.md (ratios engine / baseline) and prints the table.
#
#   scripts/baselines/compare.sh MODEL_DIR [compare.py options: --rounds N, --no-llama, ...]
#
# MODEL_DIR: written by `scripts/baselines/models.sh` (medium shape, Tencent's tokenizer,
# f32 or bf16). Runs setup.sh first (a no-op once the environments exist). The engine binary
# is $MOECTL, default target/release/moectl of this checkout. Results go to $BASELINE_OUT,
# default $BASELINE_DIR/results/<model>-<UTC time>.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: $0 MODEL_DIR [--rounds N] [--no-transformers] [--no-llama] [--no-exactness] [--llama-types f32,q8_0]" >&2
  exit 2
fi
model=$(cd "$1" && pwd)
shift
dir=${BASELINE_DIR:-/work/scratch/baselines}
moectl=${MOECTL:-$repo/target/release/moectl}
if [[ ! -x $moectl ]]; then
  echo "compare: no engine binary at $moectl (cargo build --release -p moectl, or set MOECTL)" >&2
  exit 1
fi
out=${BASELINE_OUT:-$dir/results/$(basename "$model")-$(date -u +%Y%m%dT%H%M%SZ)}

BASELINE_DIR=$dir "$here/setup.sh"
echo "compare: load before: $(uptime)" >&2
BASELINE_DIR=$dir python3 "$here/compare.py" "$model" --moectl "$moectl" --baseline-dir "$dir" --out "$out" "$@"
echo "compare: results in $out (load after: $(uptime))" >&2
