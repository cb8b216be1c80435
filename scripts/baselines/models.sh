#!/usr/bin/env bash
# Write the baseline models with the engine's own generator: the medium preset, seed 0, with
# Tencent's real tokenizer (tests/fixtures/hunyuan-a13b-release: hy.tiktoken, 127,957 ranks)
# and therefore the real 128,167-token vocabulary (127,957 ranks + 210 specials), in f32 and
# bf16. llama.cpp's converter identifies Hunyuan's pre-tokenizer by hashing the encoding of a
# check text, which only the real ranks reproduce; a generated tokenizer is refused.
#
#   scripts/baselines/models.sh        # -> $BASELINE_DIR/models/medium-v128167-{f32,bf16}
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${BASELINE_DIR:-/work/scratch/baselines}
moectl=${MOECTL:-$repo/target/release/moectl}
if [[ ! -x $moectl ]]; then
  echo "models: no engine binary at $moectl (cargo build --release -p moectl, or set MOECTL)" >&2
  exit 1
fi
for dtype in f32 bf16; do
  out=$dir/models/medium-v128167-$dtype
  if [[ -f $out/model.safetensors && -f $out/hy.tiktoken ]]; then
    echo "models: $out exists" >&2
    continue
  fi
  "$moectl" gen-model --preset medium --seed 0 --dtype "$dtype" --vocab 128167 \
    --tokenizer "$repo/tests/fixtures/hunyuan-a13b-release" --out "$out"
done
