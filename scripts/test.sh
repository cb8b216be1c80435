#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need outside cargo when it is missing:
# etcd (Debian's etcd-server package) for the registry and failover tests; python3-venv (Debian)
# for the Python tools' virtual environments; kubectl (kustomize)
# and kubernetes-validate for the deploy/ tests (scripts/install-deploy-tools.sh says from
# where). protoc needs no install: scripts/protoc finds the vendored one.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, installed with apt when what they provide is missing.
apt_install() {
    local SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@"
}

if ! command -v etcd >/dev/null 2>&1; then
    echo "== installing etcd (Debian package etcd-server) for the etcd tests"
    apt_install etcd-server
fi

# Virtual environments (kubernetes-validate, the openai client): Debian's python3 lacks venv
# and ensurepip until python3-venv is installed.
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    echo "== installing python3-venv (Debian package) for the Python virtual environments"
    apt_install python3-venv
fi

# Stops here (set -e on the assignment) if they cannot be installed: the deploy tests would
# fail anyway.
deploy_tools="$(scripts/install-deploy-tools.sh)"
eval "$deploy_tools"
export MOE_KUBECTL MOE_KUBERNETES_VALIDATE

# The official `openai` Python client for the HTTP front end's test (cli/tests/http.rs), in a
# virtual environment of its own; made once, kept in target/.
PY_OPENAI="${MOE_PY_OPENAI:-$PWD/target/py-openai/bin/python}"
if ! "$PY_OPENAI" -c 'import openai' >/dev/null 2>&1; then
    INDEX="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || echo 'https://pypi.org/simple')}"
    echo "== installing the openai Python client into target/py-openai (pip, from $INDEX)"
    python3 -m venv target/py-openai
    target/py-openai/bin/pip install --quiet "openai>=1.40,<4"
    PY_OPENAI="$PWD/target/py-openai/bin/python"
fi
echo "== openai client: $("$PY_OPENAI" -c 'import openai; print(openai.__version__, openai.__file__)')"
export MOE_PY_OPENAI="$PY_OPENAI"

# Each test binary runs its tests on 2 threads: the cluster tests start real processes and the
# machines this runs on have 2 cores.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --workspace --all-targets "$@"
