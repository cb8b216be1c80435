#!/usr/bin/env bash
# Make the baseline environments outside the repository (default /work/scratch/baselines,
# or $BASELINE_DIR): a Python venv with torch + transformers + llama.cpp's converter
# requirements, and llama.cpp built from the copy bundled in PyPI's llama-cpp-python source
# package. Each step is skipped when its result is already there, so a rerun is cheap.
# Not part of CI or scripts/test.sh. Needs PyPI and a C/C++ compiler.
#
#   scripts/baselines/setup.sh
#
# Environment: BASELINE_DIR; BASELINE_JOBS (compile jobs, default 2); BASELINE_NICE (default
# 19: the build shares the machine with other work).
set -euo pipefail

dir=${BASELINE_DIR:-/work/scratch/baselines}
jobs=${BASELINE_JOBS:-2}
nice_level=${BASELINE_NICE:-19}
# Versions (pinned; keep LLAMA_CPP_PYTHON in step with layout.py).
LLAMA_CPP_PYTHON=0.3.36
py_pins=(torch==2.15.0 transformers==5.23.0 safetensors==0.8.0 numpy==2.4.6 tiktoken==0.14.0
  sentencepiece==0.2.3 cmake==4.4.5 ninja==1.13.2)

venv=$dir/venv-hf
src=$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON
llama=$src/vendor/llama.cpp
tools=(llama-bench llama-batched-bench llama-debug)

mkdir -p "$dir/src"
# One setup at a time: two builds in one build directory would spoil each other's objects.
exec 9>"$dir/.setup.lock"
if ! flock -n 9; then
  echo "setup: another setup.sh is running in $dir (lock $dir/.setup.lock); wait for it" >&2
  exit 1
fi

# 1. Python: torch (PyPI's Linux wheel; it carries CUDA libraries, about 6 GB, and runs on
#    the CPU here), transformers with HunYuanMoEV1ForCausalLM, and the converter's needs.
if [[ ! -f $venv/.pinned ]] || [[ $(cat "$venv/.pinned") != "${py_pins[*]}" ]]; then
  echo "setup: Python venv at $venv (${py_pins[*]})" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${py_pins[@]}"
  echo "${py_pins[*]}" >"$venv/.pinned"
fi

# 2. llama.cpp source: the sdist of llama-cpp-python (its vendor/llama.cpp is the engine).
if [[ ! -f $llama/convert_hf_to_gguf.py ]]; then
  echo "setup: llama-cpp-python $LLAMA_CPP_PYTHON source" >&2
  (cd "$dir/src" && "$venv/bin/python" -m pip download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON" -d .)
  tar -xzf "$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$dir/src"
fi

# 3. The converter's Hunyuan class asserts head_dim == 128 (A13B's) before writing the NTK
#    alpha RoPE base; its formula base * alpha^(d/(d-2)) is the one transformers uses for any
#    head_dim, so the assertion is relaxed to let the medium shape (head_dim 64) through.
hunyuan=$llama/conversion/hunyuan.py
if [[ ! -f $hunyuan ]]; then
  echo "setup: $hunyuan is missing (another llama.cpp layout?): cannot relax its head_dim assertion" >&2
  exit 1
fi
if grep -q 'and dim == 128 and' "$hunyuan"; then
  sed -i 's/and dim == 128 and/and/' "$hunyuan"
fi
if grep -q 'dim == 128' "$hunyuan"; then
  echo "setup: could not relax the head_dim assertion in $hunyuan" >&2
  exit 1
fi

# 4. Build only the tools the baselines use, for this CPU (-march=native).
missing=0
for t in "${tools[@]}"; do [[ -x $llama/build/bin/$t ]] || missing=1; done
if ((missing)); then
  echo "setup: building llama.cpp (${tools[*]}) with $jobs jobs at nice $nice_level; tens of minutes on 2 cores" >&2
  export PATH=$venv/bin:$PATH
  nice -n "$nice_level" cmake -S "$llama" -B "$llama/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  nice -n "$nice_level" cmake --build "$llama/build" -j "$jobs" --target "${tools[@]}"
fi
echo "setup: ready: $venv, $llama/build/bin/{$(
  IFS=,
  echo "${tools[*]}"
)}" >&2
