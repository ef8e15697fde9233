#!/usr/bin/env bash
# Issue 7's GPU target (a 1024 x 1024 DM-QPMNet frame in under 10 ms) in one device call,
# on a GPU machine prepared by benches/gpu/prepare.sh:
#   0. the library's unit tests of the CUDA paths (on the GPU: nn::cuda_norm, staging; the
#      tiling tests run on the CPU; unit.txt)
#   1. engine vs peer, benches/gpu/plan-frame.txt (scripts/bench.sh without the memory
#      sampler; benchmarks-cuda.md, results.json, bench.log)
#   2. the engine alone on the same model and frame (ab.jsonl), the bfloat16 step-1.0
#      frame: with --breakdown (host check, copy to the device, network, enqueue time),
#      with LUMOS_CUDA_STAGED_COPY=0 (the frame copied by libtorch from pageable memory),
#      with LUMOS_CUDA_FUSED_NORM=0 (libtorch's operators on channels-last maps), and the
#      step-0.5 frame with --breakdown
#   3. with PROBE=1: benches/gpu/probe_dmqpm.py on the same model file: the peer's forward in variants
#      (NHWC InstanceNorm, CUDA graph, float32), kernel tables, the frame's host-side costs
#      (probe.txt)
#   benches/gpu/frame.sh [DEADLINE_S for step 1 (default 150)]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-target/gpu/out}
mkdir -p "$out"
deadline=${1:-150}
source benches/gpu/env.sh || exit 1
# the fused kernels against libtorch first (a failure is reported, the benchmark still runs)
timeout 120 target/gpu/lumos-tests cuda_norm staging tiling --nocapture > "$out/unit.txt" 2>&1
tail -3 "$out/unit.txt"
bash scripts/bench.sh --device cuda --engine target/gpu/compare --python python3 --deadline "$deadline" \
    --gpumem-interval 0 --out "$out/benchmarks-cuda.md" --plan benches/gpu/plan-frame.txt 2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
cp target/bench/results.json "$out/" 2>/dev/null
work=target/bench/work-full-cuda
engine() {  # the engine alone on the bench's model and frame, one JSON line to ab.jsonl
    timeout 60 target/gpu/compare --bench --model dm-qpmnet --device cuda "$@" --work "$work" 2>> "$out/ab.err" | tail -1 >> "$out/ab.jsonl"
}
frame1="--mode segment_2048 --frame 1024 --batch 16 --warmup 5 --reps 30 --precision bfloat16 --step-fraction 1.0"
# shellcheck disable=SC2086
{
    engine $frame1 --breakdown
    LUMOS_CUDA_STAGED_COPY=0 engine $frame1 --breakdown
    LUMOS_CUDA_FUSED_NORM=0 engine $frame1
    engine $frame1
    engine ${frame1% --step-fraction 1.0} --breakdown
}
[ "${PROBE:-0}" = 1 ] && timeout 120 python3 benches/gpu/probe_dmqpm.py "$work/dm-qpmnet/model.lumos" > "$out/probe.txt" 2>&1
tar czf "$out/logs.tgz" target/bench/logs target/bench/measurements.jsonl target/bench/gpumem.log "$out/ab.err" "$out/smoke.txt" 2>/dev/null
rm -f "$out/ab.err" "$out/smoke.txt"
exit "$rc"
