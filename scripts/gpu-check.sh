#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CI has none): build with the `cuda` feature, run the GPU tests
# that are ignored elsewhere, and benchmark the in-process engine with its experts on the CPU and
# on the GPU. Prints the bench JSON of both; results belong in docs/perf.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L; then
    echo "scripts/gpu-check.sh: no NVIDIA GPU visible here; nothing to check" >&2
    exit 1
fi
cargo test -p moe-tests --features cuda --test gpu --test gpu_kernels -- --ignored --nocapture
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    cargo test -p moe-tests --features cuda --test gpu_nccl -- --ignored --nocapture
else
    echo "== skipped: the NCCL test needs two GPUs (NCCL refuses two ranks on one)"
fi
cargo build --release -p moectl --features cuda
moectl=target/release/moectl
for device in cpu cuda:0; do
    echo "== bench, experts on $device"
    "$moectl" bench --device "$device" --requests 16 --concurrency 8
done
echo "== GPU limits and the grouped expert GEMM (A13B expert shape)"
"$moectl" gpu-bench --device cuda:0
