#!/usr/bin/env bash
# Runs the CUDA benchmark (scripts/bench.sh --device cuda) on a GPU machine prepared by
# benches/gpu/prepare.sh (environment: benches/gpu/env.sh). Results go to $OUT (default
# target/gpu/out): benchmarks-cuda.md, results.json, bench.log, logs.tgz, nvidia-smi.txt.
#   benches/gpu/run.sh [DEADLINE_S (default 360)] [extra scripts/bench.sh options]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-target/gpu/out}
mkdir -p "$out"
deadline=${1:-360}
[ $# -gt 0 ] && shift
source benches/gpu/env.sh || exit 1
bash scripts/bench.sh --device cuda --engine target/gpu/compare --python python3 --deadline "$deadline" \
    --out "$out/benchmarks-cuda.md" "$@" 2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
cp target/bench/results.json "$out/" 2>/dev/null
tar czf "$out/logs.tgz" target/bench/logs target/bench/measurements.jsonl target/bench/gpumem.log 2>/dev/null
exit "$rc"
