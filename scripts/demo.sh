#!/usr/bin/env bash
# The main job: simulate ssQPM data, train a model on the CPU, segment the held-out test
# images and report Dice and IoU. Bootstraps first (idempotent; only what the engine needs:
# cargo, compilers, libtorch). Extra arguments go to `lumos demo` (see `lumos demo --help`);
# the output folder is demo-output unless they name one with --out.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh --minimal
[ -z "${HOME:-}" ] || export PATH="$HOME/.cargo/bin:$PATH"
out=(--out demo-output)
for a in "$@"; do
    case "$a" in --out|--out=*) out=() ;; esac
done
cargo run --release --quiet --bin lumos -- demo ${out[@]+"${out[@]}"} "$@"
