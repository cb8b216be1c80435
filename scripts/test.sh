#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need outside cargo when it is missing:
# etcd (Debian's etcd-server package) for the registry and failover tests; kubectl (kustomize)
# and kubernetes-validate for the deploy/ tests (scripts/install-deploy-tools.sh says from
# where). protoc needs no install: scripts/protoc finds the vendored one.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1; then
    echo "== installing etcd (Debian package etcd-server) for the etcd tests"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends etcd-server
fi

# Stops here (set -e on the assignment) if they cannot be installed: the deploy tests would
# fail anyway.
deploy_tools="$(scripts/install-deploy-tools.sh)"
eval "$deploy_tools"
export MOE_KUBECTL MOE_KUBERNETES_VALIDATE

# Each test binary runs its tests on 2 threads: the cluster tests start real processes and the
# machines this runs on have 2 cores.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --all-targets "$@"
