#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need outside cargo when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each test binary runs its tests on 2 threads: the cluster tests start real processes and the
# machines this runs on have 2 cores.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --all-targets "$@"
