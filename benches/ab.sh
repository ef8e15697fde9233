#!/usr/bin/env bash
# Engine against engine: two builds of the compare bench (benches/compare.rs, e.g. one from
# an older commit and one from HEAD: `cargo bench --bench compare --no-run`, then copy the
# executable), run alternately on the CPU rows (the five convolutional training steps and
# their float32 inference), ROUNDS rounds, with one work folder so that both use the same
# model files and inputs. Writes one JSON line per run to OUT and prints each side's median over all its timed repetitions.
#
#   benches/ab.sh BEFORE_EXE AFTER_EXE [OUT.jsonl] [ROUNDS]
#
# Used for docs/restructure.md. The PyTorch peers are scripts/bench.sh's business.
set -euo pipefail
before=$1; after=$2; out=${3:-target/bench/ab.jsonl}; rounds=${4:-2}
work=target/bench/ab-work
mkdir -p "$work" "$(dirname "$out")"; : > "$out"
plan="dm-qpmnet train_step 2
early-fusion train_step 2
nnunet train_step 2
musplit-unet train_step 4
musplit-hvae train_step 8
dm-qpmnet inference 4
early-fusion inference 4
nnunet inference 4
musplit-unet inference 8
musplit-hvae inference 16"
for round in $(seq "$rounds"); do
    while read -r model mode batch; do
        for side in before after; do
            exe=$before; [ "$side" = after ] && exe=$after
            r=$("$exe" --bench --model "$model" --mode "$mode" --size paper --device cpu --threads "$(nproc)" \
                --batch "$batch" --warmup 1 --reps 3 --frame 0 --steps 100,200 --precision float32 \
                --step-fraction 0.5 --work "$work" 2>/dev/null | grep '^{' | tail -1)
            echo "{\"side\":\"$side\",\"round\":$round,\"row\":$r}" >> "$out"
        done
    done <<< "$plan"
done
python3 - "$out" <<'PY'
import collections, json, statistics, sys
d = collections.defaultdict(lambda: {"before": [], "after": []})
for l in open(sys.argv[1]):
    r = json.loads(l); x = r["row"]
    d[(x["model"], x["mode"], x["batch"])][r["side"]].extend(x.get("times_s") or [x["median_s"]])
print("| row | before median s | after median s | after / before |\n|---|---|---|---|")
for k, v in d.items():
    b, a = statistics.median(v["before"]), statistics.median(v["after"])
    print(f"| {k[0]} {k[1]} batch {k[2]} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
PY
