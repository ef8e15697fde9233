#!/usr/bin/env bash
# Prepares target/gpu/ for a GPU machine that has python3 with torch 2.11.0+cu130 but no
# Rust toolchain and no network (the lent GPU machines of this workplace; platform.md):
#   target/gpu/compare   the engine's bench binary (cargo bench --bench compare --no-run)
#   target/gpu/lumos-tests  the library's unit tests (cargo test --release --lib --no-run)
#   target/gpu/whl/      diffusers 0.42.1 and importlib_metadata wheels (the peers' DDIM loop)
#   target/gpu/pydeps/   dynamic_network_architectures 0.4.4 (pure Python, nnU-Net's PlainConvUNet)
# About 10 MB. Then, on the GPU machine, from the repository root with target/gpu carried:
#   benches/gpu/run.sh [DEADLINE_S] [extra scripts/bench.sh options]
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
mkdir -p target/gpu/whl
cargo bench --bench compare --no-run 2>&1 | grep -v '^\s*Compiling' || true
# the newest compare bench executable (cargo names it compare-<hash>)
exe=$(ls -t target/release/deps/compare-* | grep -v '\.d$' | head -1)
[ -x "$exe" ] || { echo "prepare.sh: no compare bench binary was built" >&2; exit 1; }
cp "$exe" target/gpu/compare
# the library's unit tests (the CUDA-only ones run there: nn::cuda_norm)
texe=$(cargo test --release --lib --no-run 2>&1 | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))/\1/p' | tail -1)
[ -x "$texe" ] || { echo "prepare.sh: no unit test binary was built" >&2; exit 1; }
cp "$texe" target/gpu/lumos-tests
ls target/gpu/whl/diffusers-0.42.1-*.whl >/dev/null 2>&1 ||
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d target/gpu/whl diffusers==0.42.1 importlib_metadata
if [ ! -d target/gpu/pydeps/dynamic_network_architectures ]; then
    .venv/bin/python -m pip install --quiet --no-deps --target target/gpu/pydeps "dynamic-network-architectures==0.4.4"
fi
du -sh target/gpu
