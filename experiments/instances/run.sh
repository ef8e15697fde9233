#!/bin/bash
# Instance targets by measurement: boundary (background / interior / boundary, then seeded
# growth) against foreground (cells only, then connected regions), on the ssQPM and the
# QPI live/dead simulators, nnU-Net with the demo's budget (5 stages, 16-256 features,
# 12 epochs x 25 iterations of 4 patches of 128 x 128), two training seeds each.
# Resumable: a run whose result file exists is skipped. Results: one JSON per run in OUT.
#   experiments/instances/run.sh LUMOS_BINARY OUT [EPOCHS [SEEDS [SIMS]]]
set -euo pipefail
L=${1:?lumos binary}; OUT=${2:?output folder}; EPOCHS=${3:-12}; SEEDS=${4:-"0 1"}; SIMS=${5:-"ssqpm qpi"}
tag=""; [ "$EPOCHS" = 12 ] || tag="-e$EPOCHS"
mkdir -p "$OUT"
for sim in ssqpm qpi; do
  d="$OUT/data-$sim"
  if [ ! -f "$d/simulation.json" ]; then
    "$L" simulate "$sim" --out "$d" --train 24 --test 6 --size 256 --seed 7 >/dev/null
  fi
done
for seed in $SEEDS; do
  for sim in $SIMS; do
    for targets in boundary foreground; do
      name="$sim-$targets$tag-s$seed"
      [ -f "$OUT/$name.eval.json" ] && continue
      cat > "$OUT/$name.config.json" <<JSON
{"kind": "unet", "unet": {"n_stages": 5, "base_features": 16, "max_features": 256, "convs_per_stage": 2},
 "epochs": $EPOCHS, "iterations_per_epoch": 25, "batch_size": 4, "patch_size": [128, 128],
 "seed": $seed, "device": "cpu", "masks": "instances", "instance_targets": "$targets"}
JSON
      t0=$(date +%s)
      "$L" train --data "$OUT/data-$sim/train" --out "$OUT/$name.lumos" --config "$OUT/$name.config.json" > "$OUT/$name.train.log" 2>&1
      t1=$(date +%s)
      "$L" evaluate --model "$OUT/$name.lumos" --data "$OUT/data-$sim/test" --device cpu --json "$OUT/$name.eval.tmp" > "$OUT/$name.eval.log" 2>&1
      mv "$OUT/$name.eval.tmp" "$OUT/$name.eval.json"
      echo "$name trained in $((t1 - t0)) s"
    done
  done
done
