#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (including the C and C++ API programs,
# the acquisition examples under AddressSanitizer and the header check), then the Python
# binding and napari plugin tests, then the Java binding and Fiji plugin tests, then the
# release artefacts as installed (scripts/release.sh, scripts/test-installed.sh).
# Bootstraps first (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${HOME:-}" ] || export PATH="$HOME/.cargo/bin:$PATH"
# what the tests run with, so that a failure on a new machine can be read from the log:
# printed after bootstrap, and also when bootstrap fails
./scripts/bootstrap.sh || { rc=$?; ./scripts/versions.sh; exit "$rc"; }
./scripts/versions.sh
# the C tests link target/<profile>/deps/liblumos.so: build the cdylib first so that it
# is current even when only sources changed since the last build
cargo build --quiet --lib --bin lumos
# formatting (rustfmt.toml) and lints, before any test runs
cargo fmt --all --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
# the blocked-layout training tests must not pass as skipped: bootstrap installs oneDNN
export LUMOS_REQUIRE_ONEDNN=1
# the fused CUDA kernels' source must compile (NVRTC, no GPU needed): NVRTC comes with the
# locked .venv's torch (nvidia-cuda-nvrtc; the build's libtorch has no nvrtc package)
nvrtc=$(ls .venv/lib/python3*/site-packages/nvidia/*/lib/libnvrtc.so.* 2>/dev/null | head -1 || true)
if [ -z "$nvrtc" ]; then
    echo "test: .venv has no libnvrtc.so (requirements/test.lock installs nvidia-cuda-nvrtc with torch)" >&2
    exit 1
fi
export LUMOS_NVRTC="$PWD/$nvrtc" LUMOS_REQUIRE_NVRTC=1
# the cross-checks with tifffile (in the locked .venv) and ImageJ must run, not skip
export LUMOS_TEST_PYTHON="$PWD/.venv/bin/python" LUMOS_REQUIRE_TEST_TOOLS=1
cargo test --workspace --all-targets "$@"
export LUMOS_LIBRARY="$PWD/target/debug/liblumos.so"
# the Python binding, then the napari plugin in real napari under Xvfb (pytest-xvfb)
# (a module that cannot be collected fails the run; the others still run and report)
.venv/bin/python -m pytest -q --continue-on-collection-errors -o xvfb_width=1600 -o xvfb_height=1000 bindings/python/tests napari-plugin/tests
# the Java binding and the Fiji/ImageJ plugins: JUnit headless + a macro in ImageJ under Xvfb
./fiji-plugin/test.sh
# the release artefacts, built as scripts/release.sh builds them and installed into pristine
# places: a fresh venv, a fresh ImageJ folder, a CMake project in a temporary folder
# (LUMOS_RELEASE_PROFILE=debug packages the test build instead of a release build)
./scripts/release.sh --profile "${LUMOS_RELEASE_PROFILE:-release}" --out target/dist
./scripts/test-installed.sh target/dist
# a short fuzzing run of the TIFF reader, the model loader and the JSON configs (the long
# run is reported in docs/reliability.md); LUMOS_SKIP_FUZZ=1 skips it
if [ "${LUMOS_SKIP_FUZZ:-0}" != 1 ]; then
    ./scripts/fuzz.sh 20
fi
