#!/usr/bin/env bash
# What the sliding window's step costs in accuracy (issue 7's GPU target: a 1024 x 1024
# DM-QPMNet frame in under 10 ms would need step 1.0, 16 tiles instead of nnU-Net's 49).
# Trains DM-QPMNet (stage-2 MHA, the `cpu` recipe: 25 x 16 iterations, 128 x 128 patches) for
# seeds 0, 1, 2 on simulated ssQPM (24 training + 6 test images of 512 x 512, data seed 1000),
# then segments the test images with the same models at step 0.5 (nnU-Net's default) and
# step 1.0, and writes docs/results/dmqpm/sliding_window_step.md (Dice, IoU, tiles).
#   scripts/step_study.sh     (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${HOME:-}" ] || export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet --bin lumos
LUMOS=target/release/lumos
work=target/step-study
rm -rf "$work"
mkdir -p "$work"
"$LUMOS" simulate ssqpm --out "$work/data" --train 24 --test 6 --size 512 --seed 1000 >/dev/null
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
for seed in 0 1 2; do
    "$LUMOS" train --recipe dm-qpmnet --size cpu --seed "$seed" --device cpu --data "$work/data/train" \
        --out "$work/dmqpm$seed.lumos" >/dev/null
    for step in 0.5 1.0; do
        "$LUMOS" evaluate --device cpu --model "$work/dmqpm$seed.lumos" --data "$work/data/test" --step "$step" \
            --json "$work/scores-$seed-$step.json" >/dev/null
    done
done
"$PY" - "$work" <<'PYEOF'
import json, math, os, platform, sys, time
work = sys.argv[1]


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


rows = []
for step in ("0.5", "1.0"):
    dice, iou = [], []
    for seed in (0, 1, 2):
        s = json.load(open(os.path.join(work, f"scores-{seed}-{step}.json")))
        for im in s["images"]:
            dice.append(im["per_class"][1]["dice"])
            iou.append(im["per_class"][1]["iou"])
    m = lambda v: sum(v) / len(v)
    sd = lambda v: math.sqrt(sum((x - m(v)) ** 2 for x in v) / (len(v) - 1))
    rows.append((step, m(dice), sd(dice), m(iou), sd(iou), len(dice)))
def tiles(size, tile, step):
    if size <= tile:
        return 1
    return math.ceil((size - tile) / (tile * float(step))) + 1
L = ["# Sliding-window step: what fewer tiles cost in accuracy", "",
     f"Written by `scripts/step_study.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
     f"({cpu_name()}, {os.cpu_count()} CPUs, CPU only). "
     "DM-QPMNet (stage-2 MHA, the `cpu` recipe: 25 epochs x 16 iterations, batch 4, 128 x 128 patches) "
     "trained for seeds 0, 1, 2 on simulated ssQPM (24 training images of 512 x 512, mixed confluence, data "
     "seed 1000); the same three models segment the 6 held-out test images at each step (Gaussian blending, "
     "no mirroring). Dice and IoU of the cell class, mean ± std over the 18 image-model pairs.", "",
     "| step (fraction of the tile) | tiles per 512 x 512 image | tiles per 1024 x 1024 frame at 256 x 256 | cell Dice | cell IoU | n |",
     "|---:|---:|---:|---|---|---:|"]
for step, d, dsd, i, isd, n in rows:
    L.append(f"| {step} | {tiles(512, 128, step) ** 2} | {tiles(1024, 256, step) ** 2} | {d:.4f} ± {dsd:.4f} | {i:.4f} ± {isd:.4f} | {n} |")
# paired: the same image and model at both steps
pairs = []
for seed in (0, 1, 2):
    a = {im["name"]: im["per_class"][1]["dice"] for im in json.load(open(os.path.join(work, f"scores-{seed}-0.5.json")))["images"]}
    b = {im["name"]: im["per_class"][1]["dice"] for im in json.load(open(os.path.join(work, f"scores-{seed}-1.0.json")))["images"]}
    pairs += [b[k] - a[k] for k in a]
pm = sum(pairs) / len(pairs)
psd = math.sqrt(sum((x - pm) ** 2 for x in pairs) / (len(pairs) - 1))
worse = sum(x < 0 for x in pairs)
L += ["", f"Paired (the same image and model at both steps): Dice changes by {pm:+.4f} ± {psd:.4f} "
      f"(mean ± std over the {len(pairs)} pairs; lower at step 1.0 in {worse} of {len(pairs)}, largest drop "
      f"{min(pairs):+.4f}). IoU: {rows[1][3] - rows[0][3]:+.4f} in the means.", "",
      "Reading: the overlap of nnU-Net's step 0.5 is not free to drop. Without it every pixel near a tile edge "
      "is predicted once, from a tile in which it sits at the border, with the least context; the Gaussian "
      "weighting has nothing to blend. On these models and data step 1.0 needs a third of the tiles (16 "
      "instead of 49) and costs the Dice above, on every image: it is not a free way to the issue's 10 ms GPU "
      "target. It stays a user option (`--step`, `step_fraction`) with this measured cost.", ""]
out = os.path.join("docs", "results", "dmqpm", "sliding_window_step.md")
open(out, "w").write("\n".join(L))
print("\n".join(L))
PYEOF
