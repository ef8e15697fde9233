#!/usr/bin/env bash
# Installs what lumos needs to build and test, when missing; a no-op when present.
# - libtorch 2.11.0 (CPU + CUDA libraries) from the PyPI torch wheel into .libtorch/
#   (git-ignored), as tch 0.24 expects; .cargo/config.toml points torch-sys at it.
# - a C and C++ compiler for the C API tests.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
MARKER=.libtorch/.lumos-torch-$TORCH_VERSION

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "bootstrap: cargo (Rust >= 1.85) is required; install it with rustup" >&2
        exit 1
    fi
fi

missing_pkgs=()
command -v gcc >/dev/null 2>&1 || missing_pkgs+=(gcc)
command -v g++ >/dev/null 2>&1 || missing_pkgs+=(g++)
command -v python3 >/dev/null 2>&1 || missing_pkgs+=(python3 python3-pip)
if [ ${#missing_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing ${missing_pkgs[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}" >/dev/null
    else
        echo "bootstrap: please install ${missing_pkgs[*]}" >&2
        exit 1
    fi
fi

if [ ! -f "$MARKER" ] || [ ! -f .libtorch/torch/lib/libtorch_cpu.so ]; then
    echo "bootstrap: installing libtorch $TORCH_VERSION from the PyPI torch wheel into .libtorch (about 1.2 GB) ..."
    tmp=$(mktemp -d .libtorch-partial.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
        "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
    rm -rf .libtorch
    mv "$tmp" .libtorch
    trap - EXIT
    touch "$MARKER"
    echo "bootstrap: libtorch ready in .libtorch"
fi

# Python test environment for the binding (numpy + pytest), in .venv (git-ignored).
if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c "import numpy" >/dev/null 2>&1; then
    echo "bootstrap: creating .venv with numpy and pytest ..."
    python3 -m venv .venv 2>/dev/null || { python3 -m pip install --quiet virtualenv && python3 -m virtualenv -q .venv; }
    .venv/bin/python -m pip install --quiet --disable-pip-version-check numpy pytest
fi
