#!/usr/bin/env bash
# The engine, llama.cpp and transformers on the same model and loads, interleaved rounds,
# medians; for each model writes results.json and results.md (ratios engine / baseline) and
# prints the table.
#
#   scripts/baselines/compare.sh [MODEL_DIR ...] [-- compare.py options: --rounds N, --no-llama, ...]
#
# Without MODEL_DIR: the bf16 and f32 models of models.sh (written first if missing). Runs
# setup.sh first (a no-op once the environments exist). The engine binary is $MOECTL, default
# target/release/moectl of this checkout. Results go to
# $BASELINE_DIR/results/<model>-<UTC time>/.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${BASELINE_DIR:-/work/scratch/baselines}
export BASELINE_DIR=$dir
moectl=${MOECTL:-$repo/target/release/moectl}
if [[ ! -x $moectl ]]; then
  echo "compare: no engine binary at $moectl (cargo build --release -p moectl, or set MOECTL)" >&2
  exit 1
fi

models=()
while [[ $# -gt 0 && $1 != -- ]]; do
  if [[ $1 == -* ]]; then
    echo "usage: $0 [MODEL_DIR ...] [-- --rounds N --no-transformers --no-llama --no-exactness --llama-types f32,q8_0]" >&2
    exit 2
  fi
  models+=("$(cd "$1" && pwd)")
  shift
done
[[ $# -gt 0 ]] && shift # the --
if [[ ${#models[@]} -eq 0 ]]; then
  MOECTL=$moectl "$here/models.sh"
  models=("$dir/models/medium-v128167-bf16" "$dir/models/medium-v128167-f32")
fi

"$here/setup.sh"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
for model in "${models[@]}"; do
  out=$dir/results/$(basename "$model")-$stamp
  echo "compare: $model; load before: $(uptime)" >&2
  python3 "$here/compare.py" "$model" --moectl "$moectl" --baseline-dir "$dir" --out "$out" "$@"
  echo "compare: results in $out (load after: $(uptime))" >&2
done
