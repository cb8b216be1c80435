#!/usr/bin/env bash
# Fetches NVIDIA's NVRTC (the run-time CUDA C++ compiler, no GPU or driver needed) from PyPI into
# a cache directory and prints the directory holding libnvrtc.so.12. CI uses it to check that
# the CUDA kernels (model/src/cuda/kernels.cu) compile on a machine without a GPU:
#   LD_LIBRARY_PATH="$(scripts/install-nvrtc.sh)" cargo test -p moe-model --features cuda --lib source:: -- --ignored
set -euo pipefail

version="12.8.93"
cache="${MOE_NVRTC_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-nvrtc/$version}"
lib="$cache/nvidia/cuda_nvrtc/lib"

if [ ! -e "$lib/libnvrtc.so.12" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "== installing pip (Debian package python3-pip) to fetch NVRTC" >&2
        SUDO=""
        if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-pip >&2
    fi
    echo "== fetching nvidia-cuda-nvrtc-cu12==$version from PyPI into $cache" >&2
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
        "nvidia-cuda-nvrtc-cu12==$version" >&2
    mkdir -p "$cache"
    python3 -m zipfile -e "$tmp"/nvidia_cuda_nvrtc_cu12-*.whl "$cache"
fi
test -e "$lib/libnvrtc.so.12"
echo "$lib"
