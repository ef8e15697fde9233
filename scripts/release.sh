#!/usr/bin/env bash
# Builds every release artefact (Linux x86-64) into dist/:
#   lumos-VERSION-py3-none-manylinux_*.whl   the engine, its Python binding and the CLI
#   napari_lumos-VERSION-py3-none-any.whl    the napari plugin
#   lumos-fiji-VERSION.zip                   Fiji.app/ with the plugins, JNA and the CPU libtorch
#   lumos-sdk-VERSION-linux-x86_64.tar.gz    C/C++ headers, library, CMake and pkg-config files
#   SHA256SUMS, build-report.txt             checksums; auditwheel report, RUNPATHs, sizes
# and prints a table of their sizes. VERSION is Cargo.toml's.
#   scripts/release.sh [--profile release|debug] [--out DIR]
# --profile debug packages the test build (faster to build, slower to run). Bootstraps
# first (the full bootstrap: the packaging tools come with .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
out=dist
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: scripts/release.sh [--profile release|debug] [--out DIR]" >&2; exit 2 ;;
    esac
done
case "$profile" in
release) cargo_profile=release ;;
debug) cargo_profile=dev ;;
*) echo "release.sh: --profile is release or debug, not $profile" >&2; exit 2 ;;
esac
[ -z "${HOME:-}" ] || export PATH="$HOME/.cargo/bin:$PATH"
./scripts/bootstrap.sh
t=$(date +%s)
cargo build --quiet --profile "$cargo_profile" --lib --bin lumos
echo "release.sh: engine built ($profile) in $(($(date +%s) - t)) s"
.venv/bin/python scripts/release.py all --profile "$profile" --out "$out"
