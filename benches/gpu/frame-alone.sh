#!/usr/bin/env bash
# The engine alone on the 1024 x 1024 DM-QPMNet frame (bfloat16, 16 tiles per pass, step
# 1.0 and nnU-Net's 0.5) and the network on 16 tiles, no peer: a short device call for a
# second GPU kind (session 13: an H100 after the H200 rows of frame.sh). JSON lines in
# $OUT/alone.jsonl.   benches/gpu/frame-alone.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-target/gpu/out}
mkdir -p "$out"
source benches/gpu/env.sh || exit 1
w=/tmp/lumos-alone
for s in 1.0 0.5; do
    timeout 60 target/gpu/compare --bench --model dm-qpmnet --mode segment_2048 --device cuda --frame 1024 --batch 16 \
        --warmup 5 --reps 30 --precision bfloat16 --step-fraction "$s" --work "$w" | tail -1 >> "$out/alone.jsonl"
done
timeout 60 target/gpu/compare --bench --model dm-qpmnet --mode inference --device cuda --batch 16 --warmup 3 --reps 20 \
    --precision bfloat16 --work "$w" | tail -1 >> "$out/alone.jsonl"
cat "$out/alone.jsonl" | cut -c1-200
