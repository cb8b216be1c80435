#!/usr/bin/env bash
# The first run on a GPU host (CI has no GPU). Builds with the `cuda` feature in release, then
# runs every GPU check in order, each timed, each with its result on one line, stopping at
# nothing: a failed step is recorded and the next one runs. Writes the summary to
# $MOE_GPU_SUMMARY (default target/gpu-check/summary.txt, one screen) and each step's full output
# beside it. Exit status: 0 when every step passed or was skipped with its reason, 1 otherwise.
#
#   scripts/gpu-check.sh            # everything (about 10 minutes on one H200 after the build)
#   MOE_GPU_STEP_TIMEOUT=300 scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

out="${MOE_GPU_OUT:-target/gpu-check}"
summary="${MOE_GPU_SUMMARY:-$out/summary.txt}"
step_timeout="${MOE_GPU_STEP_TIMEOUT:-600}"
fixture="${MOE_GPU_FIXTURE:-tests/fixtures/hunyuan-tiny}"
mkdir -p "$out"
failures=0

note() { echo "$*" | tee -a "$summary"; }

# step NAME COMMAND...: runs COMMAND with a timeout, its output in $out/NAME.log; one line.
step() {
    local name="$1"
    shift
    local log="$out/$name.log" start rc
    start=$(date +%s%N)
    timeout --kill-after=10 "$step_timeout" "$@" >"$log" 2>&1
    rc=$?
    local ms=$((($(date +%s%N) - start) / 1000000))
    local secs="$((ms / 1000)).$(((ms % 1000) / 100))"
    local what
    what=$(grep -E 'test result:|checks, [0-9]+ failed|"decode_step_over_floor"|error' "$log" | tail -1 | tr -s ' ' | cut -c1-110)
    if [ "$rc" -eq 0 ]; then
        note "PASS  $(printf '%-26s' "$name") ${secs}s  $what"
    else
        failures=$((failures + 1))
        [ "$rc" -eq 124 ] && what="timed out after ${step_timeout}s; $what"
        note "FAIL  $(printf '%-26s' "$name") ${secs}s  rc=$rc  $what  (see $log)"
    fi
}

skip() { note "SKIP  $(printf '%-26s' "$1") $2"; }

# Starts a cluster on cuda:0 serving the fixture and checks the fixture through it.
cluster_check() {
    local log="$out/cluster-up.log" up endpoint rc
    "$moectl" up --model "$fixture" --listen 127.0.0.1:0 --expert-workers 1 --gpus cuda:0 >"$log" 2>&1 &
    up=$!
    for _ in $(seq 1 240); do grep -q '^READY ' "$log" && break; sleep 1; done
    endpoint=$(grep '^READY ' "$log" | head -1 | cut -d' ' -f2)
    grep '^GPUS ' "$log"
    if [ -z "$endpoint" ]; then
        echo "error: the cluster never printed READY"
        kill "$up" 2>/dev/null
        return 1
    fi
    "$moectl" check-golden --fixture "$fixture" --endpoint "$endpoint" --tolerances bf16
    rc=$?
    kill "$up"
    wait "$up" 2>/dev/null
    return $rc
}

if [ "${1:-}" = "--cluster-check" ]; then
    moectl=target/release/moectl
    cluster_check
    exit $?
fi
: >"$summary"

note "gpu-check $(date -u +%FT%TZ) on $(hostname)"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    note "no NVIDIA GPU visible here (nvidia-smi); nothing to check"
    exit 1
fi
gpus=$(nvidia-smi -L | wc -l)
note "GPUs: $gpus  $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"

step build cargo build --release -p moectl -p moe-tests --features moectl/cuda,moe-tests/cuda --tests
moectl=target/release/moectl

# 1. Each kernel against the CPU function it mirrors; the kernel build for this device.
step kernels cargo test --release -p moe-tests --features cuda --test gpu_kernels -- --ignored --test-threads=1
step kernel-build cargo test --release -p moe-model --features cuda --lib cuda:: -- --include-ignored
# 2. Routed experts, then the whole engine, against the CPU.
step experts-and-engine cargo test --release -p moe-tests --features cuda --test gpu -- --ignored --test-threads=1
# 3. The golden fixture in process on the GPU, at the bf16 tolerances (check-golden prints them).
step golden-on-gpu "$moectl" check-golden --fixture "$fixture" --device cuda:0
# 4. The card's limits and the grouped expert GEMM of one dispatch (A13B expert shape).
step gpu-bench "$moectl" gpu-bench --device cuda:0
# 5. The engine on the GPU: decode step against the HBM floor (gpu.decode_step_over_floor).
step engine-bench "$moectl" bench --device cuda:0 --requests 16 --concurrency 8
# 6. A one-GPU cluster: workers on cuda:0 over gRPC (NCCL needs a GPU per worker), serving the
#    golden fixture, checked at the bf16 tolerances (cluster_check above, run as its own step).
step one-gpu-cluster "$0" --cluster-check
# 7. NCCL: two ranks on two GPUs (NCCL refuses two ranks on one).
if [ "$gpus" -ge 2 ]; then
    step nccl-two-ranks cargo test --release -p moe-tests --features cuda --test gpu_nccl -- --ignored
    step nccl-cluster cargo test --release -p moectl --features cuda --test device -- --ignored
else
    skip nccl-two-ranks "needs two GPUs; this host has $gpus"
    skip nccl-cluster "needs two GPUs; this host has $gpus"
fi

note "$failures step(s) failed; summary in $summary, logs in $out/"
[ "$failures" -eq 0 ]
