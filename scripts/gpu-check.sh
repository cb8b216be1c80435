#!/usr/bin/env bash
# The first run on a GPU host (CI has no GPU). Runs every GPU check in order, each timed, each
# with its result on one line, stopping at nothing: a failed step is recorded and the next one
# runs. Writes the summary to $MOE_GPU_SUMMARY (default target/gpu-check/summary.txt, one
# screen) and each step's full output beside it. Exit status 0 when every step passed or was
# skipped with its reason, 1 otherwise.
#
# A GPU host may have no Rust toolchain and no network (the lent H200 has neither), so the
# binaries can be built elsewhere first:
#   scripts/gpu-check.sh --prebuild   # here: release build with `cuda`, binaries into
#                                     # target/gpu-check/bin (carry that folder to the host)
#   scripts/gpu-check.sh              # on the GPU host: uses target/gpu-check/bin if present,
#                                     # else builds with cargo
# MOE_GPU_STEP_TIMEOUT (default 120 s) bounds each step; MOE_GPU_OUT moves the summary and logs
# (e.g. to the device tool's $OUT), MOE_GPU_BIN the prebuilt binaries. The prebuilt folder is
# about 35 MiB stripped, within what the device tool carries (64 MiB).
set -uo pipefail
script="$(realpath "$0")"
cd "$(dirname "$script")/.."

out="${MOE_GPU_OUT:-target/gpu-check}"
bin="${MOE_GPU_BIN:-target/gpu-check/bin}"
summary="${MOE_GPU_SUMMARY:-$out/summary.txt}"
step_timeout="${MOE_GPU_STEP_TIMEOUT:-120}"
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
        note "PASS  $(printf '%-22s' "$name") ${secs}s  $what"
    else
        failures=$((failures + 1))
        [ "$rc" -eq 124 ] && what="timed out after ${step_timeout}s; $what"
        note "FAIL  $(printf '%-22s' "$name") ${secs}s  rc=$rc  $what  (see $log)"
    fi
}

skip() { note "SKIP  $(printf '%-22s' "$1") $2"; }

# The test executables the steps run, by name: cargo's --no-run output gives their paths.
prebuild() {
    set -e
    mkdir -p "$bin" "$out"
    local json="$out/build.json"
    cargo build --release -p moectl --features cuda
    cp target/release/moectl "$bin/moectl"
    : >"$json"
    cargo test --release --no-run --message-format=json -p moe-tests --features cuda \
        --test gpu_kernels --test gpu --test gpu_nccl >>"$json"
    cargo test --release --no-run --message-format=json -p moe-model --features cuda --lib >>"$json"
    cargo test --release --no-run --message-format=json -p moectl --features cuda --test device >>"$json"
    python3 - "$json" "$bin" <<'EOF'
import json, shutil, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and m["profile"]["test"]:
        name = m["target"]["name"].replace("-", "_")
        name = "model_lib" if name == "moe_model" else name
        shutil.copy(exe, f"{sys.argv[2]}/{name}")
        print(f"{sys.argv[2]}/{name}")
EOF
    strip "$bin"/* 2>/dev/null || true
    du -sh "$bin"
}

# Runs a test executable by name: prebuilt, or through cargo.
run_tests() {
    local name="$1"
    shift
    if [ -x "$bin/$name" ]; then
        "$bin/$name" "$@"
    elif command -v cargo >/dev/null; then
        case "$name" in
            model_lib) cargo test --release -p moe-model --features cuda --lib -- "$@" ;;
            device) cargo test --release -p moectl --features cuda --test device -- "$@" ;;
            *) cargo test --release -p moe-tests --features cuda --test "$name" -- "$@" ;;
        esac
    else
        echo "error: no prebuilt $bin/$name and no cargo here (run scripts/gpu-check.sh --prebuild elsewhere and carry $bin)"
        return 1
    fi
}

# cudarc looks for unversioned or .so.12 names (and libnccl.so, not .so.2); a CUDA 13 host
# (pip's nvidia-* wheels, or the toolkit) names them otherwise: link what is found.
# Sets LD_LIBRARY_PATH (exported to every step) and `libraries` (what was found).
link_cuda_libraries() {
    local dir="$out/lib"
    libraries=""
    mkdir -p "$dir"
    local search="${LD_LIBRARY_PATH:-}"
    local roots="${search//:/ } /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu"
    roots="$roots $(python3 -c 'import site; print(" ".join(p + "/nvidia" for p in site.getsitepackages()))' 2>/dev/null)"
    for lib in cublas cublasLt nvrtc nccl; do
        local hit
        hit=$(find $roots -maxdepth 3 -name "lib$lib.so*" 2>/dev/null | sort | tail -1)
        if [ -n "$hit" ]; then
            ln -sf "$hit" "$dir/lib$lib.so"
            export LD_LIBRARY_PATH="$(dirname "$hit"):${LD_LIBRARY_PATH:-}"
            libraries="$libraries lib$lib=$hit"
        else
            libraries="$libraries lib$lib=MISSING"
        fi
    done
    export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
}

# Starts a cluster on cuda:0 serving the fixture and checks the fixture through it.
cluster_check() {
    local log="$out/cluster-up.log" up endpoint rc
    "$moectl" up --model "$fixture" --listen 127.0.0.1:0 --expert-workers 1 --gpus cuda:0 >"$log" 2>&1 &
    up=$!
    for _ in $(seq 1 100); do
        grep -q '^READY ' "$log" && break
        kill -0 "$up" 2>/dev/null || break
        sleep 1
    done
    endpoint=$(grep '^READY ' "$log" | head -1 | cut -d' ' -f2)
    grep '^GPUS ' "$log"
    if [ -z "$endpoint" ]; then
        echo "error: the cluster never printed READY:"
        tail -5 "$log"
        kill "$up" 2>/dev/null
        return 1
    fi
    "$moectl" check-golden --fixture "$fixture" --endpoint "$endpoint" --tolerances bf16
    rc=$?
    kill "$up"
    wait "$up" 2>/dev/null
    return $rc
}

case "${1:-}" in
    --prebuild)
        prebuild
        exit $?
        ;;
    --cluster-check)
        moectl="${2:?}"
        cluster_check
        exit $?
        ;;
    --run-tests)
        shift
        run_tests "$@"
        exit $?
        ;;
esac
: >"$summary"

note "gpu-check $(date -u +%FT%TZ) on $(hostname)"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    note "no NVIDIA GPU visible here (nvidia-smi); nothing to check"
    exit 1
fi
gpus=$(nvidia-smi -L | wc -l)
note "GPUs: $gpus  $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
link_cuda_libraries
note "libraries:$libraries"
# Test binaries built elsewhere find the fixtures here, not where they were built.
export MOE_FIXTURES_DIR="$PWD/tests/fixtures"

if [ -x "$bin/moectl" ]; then
    moectl="$bin/moectl"
    skip build "prebuilt binaries in $bin"
elif command -v cargo >/dev/null; then
    step build cargo build --release -p moectl --features cuda
    moectl=target/release/moectl
else
    note "FAIL  build                  no prebuilt $bin and no cargo here: run scripts/gpu-check.sh --prebuild on a build machine and carry $bin"
    exit 1
fi

# 1. Each kernel against the CPU function it mirrors; the kernel build for this device.
step kernels "$script" --run-tests gpu_kernels --ignored --test-threads=1
step kernel-build "$script" --run-tests model_lib --include-ignored cuda::
# 2. Routed experts, then the whole engine, against the CPU.
step experts-and-engine "$script" --run-tests gpu --ignored --test-threads=1
# 3. The golden fixture in process on the GPU, at the bf16 tolerances (check-golden prints them).
step golden-on-gpu "$moectl" check-golden --fixture "$fixture" --device cuda:0
# 4. The card's limits and the grouped expert GEMM of one dispatch (A13B expert shape).
step gpu-bench "$moectl" gpu-bench --device cuda:0
# 5. The engine on the GPU: decode step against the HBM floor (gpu.decode_step_over_floor; the
#    dense weights that stay on the host make this a lower bound).
step engine-bench "$moectl" bench --model "$fixture" --device cuda:0 --requests 8 --concurrency 4
# 6. A one-GPU cluster: workers on cuda:0 over gRPC (NCCL needs a GPU per worker), serving the
#    golden fixture, checked at the bf16 tolerances.
step one-gpu-cluster "$script" --cluster-check "$moectl"
# 7. NCCL: two ranks on two GPUs (NCCL refuses two ranks on one).
if [ "$gpus" -ge 2 ]; then
    step nccl-two-ranks "$script" --run-tests gpu_nccl --ignored
    step nccl-cluster "$script" --run-tests device --ignored
else
    skip nccl-two-ranks "needs two GPUs; this host has $gpus"
    skip nccl-cluster "needs two GPUs; this host has $gpus"
fi

note "$failures step(s) failed; summary in $summary, logs in $out/"
[ "$failures" -eq 0 ]
