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
    # A cluster on two GPUs with its layers over NCCL.
    cargo test -p moectl --features cuda --test device -- --ignored --nocapture
else
    echo "== skipped: the NCCL tests need two GPUs (NCCL refuses two ranks on one)"
fi
cargo build --release -p moectl --features cuda
moectl=target/release/moectl
for device in cpu cuda:0; do
    echo "== bench, experts on $device"
    "$moectl" bench --device "$device" --requests 16 --concurrency 8
done
echo "== GPU limits and the grouped expert GEMM (A13B expert shape)"
"$moectl" gpu-bench --device cuda:0
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    echo "== cluster on two GPUs: per layer round trip over NCCL (dispatch.layer_round_trip_ms)"
    log=$(mktemp)
    "$moectl" up --listen 127.0.0.1:0 --expert-workers 1 --gpus cuda:0,cuda:1 >"$log" 2>&1 &
    up=$!
    for _ in $(seq 1 300); do grep -q '^READY ' "$log" && break; sleep 1; done
    endpoint=$(grep '^READY ' "$log" | head -1 | cut -d' ' -f2)
    sleep 5 # the NCCL group forms over a few heartbeats
    "$moectl" bench --endpoint "$endpoint" --concurrency 1 --requests 2 --prompt-len 8 --gen-len 64
    kill "$up"; wait "$up" || true
fi
