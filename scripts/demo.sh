#!/usr/bin/env bash
# The main job: simulate ssQPM data, train a model on the CPU, segment the held-out test
# images and report Dice and IoU. Bootstraps first (idempotent). Extra arguments go to
# `lumos demo` (see `lumos demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo run --release --quiet --bin lumos -- demo --out demo-output "$@"
