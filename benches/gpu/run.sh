#!/usr/bin/env bash
# Runs the CUDA benchmark (scripts/bench.sh --device cuda) on a GPU machine prepared by
# benches/gpu/prepare.sh: the engine binary built elsewhere runs against the machine's own
# libtorch (python3's torch 2.11.0+cu130, through LD_LIBRARY_PATH, as platform.md says),
# the peers run in that python3 with the carried wheels. Results go to $OUT (default
# target/gpu/out): benchmarks-cuda.md, results.json, bench.log, logs.tgz, nvidia-smi.txt.
#   benches/gpu/run.sh [DEADLINE_S (default 360)] [extra scripts/bench.sh options]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-target/gpu/out}
mkdir -p "$out"
deadline=${1:-360}
[ $# -gt 0 ] && shift
torchlib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || exit 1
export LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LUMOS_BENCH_LIBTORCH="$(python3 -c 'import torch; print(torch.__version__)') (python3's torch on this machine, through LD_LIBRARY_PATH)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lumos-site target/gpu/whl/*.whl || exit 1
export PYTHONPATH="/tmp/lumos-site:$PWD/target/gpu/pydeps"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# the engine must see the GPU: fail fast otherwise
if ! target/gpu/compare --bench --model dm-qpmnet --mode inference --size tiny --device cuda --batch 2 --warmup 1 --reps 2 \
        --work /tmp/lumos-smoke > "$out/smoke.txt" 2>&1; then
    cat "$out/smoke.txt"
    exit 1
fi
tail -1 "$out/smoke.txt"
bash scripts/bench.sh --device cuda --engine target/gpu/compare --python python3 --deadline "$deadline" \
    --out "$out/benchmarks-cuda.md" "$@" 2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
cp target/bench/results.json "$out/" 2>/dev/null
tar czf "$out/logs.tgz" target/bench/logs target/bench/measurements.jsonl target/bench/gpumem.log 2>/dev/null
exit "$rc"
