#!/usr/bin/env bash
# Installs what the deploy/ tests (cli/tests/deploy) need, when missing, and prints where they
# are as shell assignments for scripts/test.sh to eval:
#   MOE_KUBECTL=...              kubectl with kustomize v5 (renders deploy/k8s/overlays/*)
#   MOE_KUBERNETES_VALIDATE=...  kubernetes-validate (offline Kubernetes schema validation)
# kubectl: the one on PATH if it has kustomize v5, otherwise (fallback) the official Kubernetes
# release binary downloaded from dl.k8s.io, checked against its published SHA-256 (Debian's
# kubernetes-client package lags several releases behind). kubernetes-validate needs python3 -m
# venv (Debian: python3-venv, which scripts/test.sh installs when missing). kubernetes-validate: from PyPI into a virtual environment. Both go to
# a cache directory, so a second run downloads nothing. Any failure exits non-zero.
set -euo pipefail

kubectl_version="v1.32.4"
validate_version="1.37.0"
cache="${MOE_DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-deploy-tools}"
mkdir -p "$cache"

kustomize_v5() {
    "$1" version --client 2>/dev/null | grep -q '^Kustomize Version: v5\.'
}

kubectl="$(command -v kubectl || true)"
if [ -z "$kubectl" ] || ! kustomize_v5 "$kubectl"; then
    kubectl="$cache/kubectl-$kubectl_version"
    if [ ! -x "$kubectl" ]; then
        case "$(uname -m)" in
            x86_64) arch=amd64 ;;
            aarch64 | arm64) arch=arm64 ;;
            *) echo "install-deploy-tools: no kubectl release for $(uname -m)" >&2; exit 1 ;;
        esac
        url="https://dl.k8s.io/release/$kubectl_version/bin/linux/$arch/kubectl"
        echo "== fetching kubectl $kubectl_version from $url" >&2
        tmp="$(mktemp)"
        trap 'rm -f "$tmp"' EXIT
        curl -fsSL --retry 3 -o "$tmp" "$url"
        want="$(curl -fsSL --retry 3 "$url.sha256")"
        echo "$want  $tmp" | sha256sum --check --quiet -
        chmod +x "$tmp"
        mv "$tmp" "$kubectl"
    fi
    kustomize_v5 "$kubectl" || { echo "install-deploy-tools: $kubectl has no kustomize v5" >&2; exit 1; }
fi

venv="$cache/venv-kubernetes-validate-$validate_version"
validate="$venv/bin/kubernetes-validate"
if [ ! -x "$validate" ]; then
    echo "== installing kubernetes-validate==$validate_version from PyPI into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet "kubernetes-validate==$validate_version" >&2
fi
"$validate" --version >/dev/null

# Quoted for the caller's eval: a cache path with spaces or shell characters stays one value.
printf 'MOE_KUBECTL=%q\n' "$kubectl"
printf 'MOE_KUBERNETES_VALIDATE=%q\n' "$validate"
