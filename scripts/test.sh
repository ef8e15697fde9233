#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (including the C and C++ API programs
# and the header check), then the Python binding's tests against the built library.
# Bootstraps first (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
# the C tests link target/<profile>/deps/liblumos.so: build the cdylib first so that it
# is current even when only sources changed since the last build
cargo build --quiet --lib --bin lumos
cargo test --all-targets "$@"
LUMOS_LIBRARY="$PWD/target/debug/liblumos.so" PYTHONPATH="$PWD/bindings/python" \
    .venv/bin/python -m pytest -q bindings/python/tests
