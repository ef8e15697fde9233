#!/usr/bin/env bash
# The engine against its PyTorch peers (issue 7), in one run on one machine:
# every measurement of the plan below runs twice, in fresh processes, first through the
# engine (benches/compare.rs, built by `cargo bench --bench compare --no-run`), then
# through its PyTorch peer (benches/peers/bench_peers.py, .venv's torch), with the same
# weights, inputs, batch, tile, threads and hyperparameters; the JSON lines are collected
# into target/bench/results.json and benches/peers/report.py writes docs/benchmarks.md
# (machine, versions, command, one table per mode with engine, peer, engine/peer and
# whether the 0.9x goal is met).
#
#   ./scripts/bench.sh                 the benchmark on the CPU, at the papers' network sizes
#   ./scripts/bench.sh --device cuda   the benchmark on a CUDA GPU (the papers' batch sizes);
#                                      on a GPU machine without cargo: benches/gpu/prepare.sh
#                                      here, benches/gpu/run.sh there
#   ./scripts/bench.sh --quick         a tiny smoke configuration (tiny networks, 1-2 minutes):
#                                      proves the harness end to end; NOT a benchmark
#
# Options: --threads N (intra-op threads for both sides; default: the usable CPUs),
#          --out FILE (default docs/benchmarks.md), --only REGEX (run the plan lines whose
#          "model mode" matches, e.g. --only 'train_step'), --keep-work (reuse the model files
#          and inputs of an earlier run of the same profile), --engine EXE (a compare bench
#          binary built elsewhere: no cargo needed, as on a GPU machine without a Rust
#          toolchain), --python PY (the peers' interpreter instead of .venv/bin/python;
#          relative paths given to --engine, --plan and --out start at the repository root),
#          --deadline SECONDS (start no new plan line after this long; the report covers
#          what ran), --plan FILE (plan lines "model mode key=value ..." from FILE instead
#          of the profile's plan; see plan_cuda below for the keys, rounds=R above, and step=F:
#          segment_2048's sliding-window step as a fraction of the tile, default 0.5),
#          --gpumem-interval S (on a GPU, nvidia-smi samples the device memory every S
#          seconds, default 0.1; 0 samples nothing: each sample is an nvidia-smi process
#          querying the driver, which may perturb millisecond timings).
#
# Duration of the CPU benchmark on 2 cores (Xeon, ~150 GFLOP/s fp32 through oneDNN): about
# 35 minutes, both sides together, plus the release build when it is stale. The papers'
# networks are big for a CPU (DM-QPMNet 40 GFLOP per 256x256 tile forward, the LC U-Net 68
# GFLOP per 64x64 tile with its lateral context, PG-DiffSeg's LDM-P 202 and LDM-S 114 GFLOP per
# evaluation, 300 evaluations per tile at the paper's 100 + 200 steps), so the CPU plan keeps
# the papers' network sizes, patch sizes and step counts but uses small batches (1 to 16) and
# 1 warm-up + 3 timed repetitions (1 + 1 for whole frames and the 100 + 200-step PG-DiffSeg
# tile, about 5 minutes per side on its own); the training steps but PG-DiffSeg's run in 3
# alternating engine/peer rounds of 1 + 4 (plan key rounds=R: the pair of processes runs R
# times, engine first each time, and the report pools each side's timed repetitions). The GPU plan uses the papers' training batch
# sizes (12, 12, 10, 32, 32, 10) and more repetitions. Run it on an otherwise idle machine.
# Network sizes come from `lumos::recipes::recipe(model, "paper")` (`tiny` for --quick). The
# PG-DiffSeg processes need about 7 GB of RAM at paper size and the run writes its 1.7 GB model
# file under target/bench/work-*.
#
# Needs: cargo (libtorch in .libtorch, see scripts/bootstrap.sh), .venv with torch 2.11.0,
# diffusers 0.42.1 (installed into .venv with its dependencies on first use) and
# dynamic_network_architectures (installed on first use with pip --no-deps into
# target/bench/pydeps, so that its torch requirement cannot touch .venv's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"

profile=full
device=cpu
threads=""
out=docs/benchmarks.md
only=""
keep_work=0
engine=""
python=""
deadline=0
planfile=""
gpumem_interval=0.1
cmdline="scripts/bench.sh${*:+ $*}"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) profile=quick ;;
        --device) device="$2"; shift ;;
        --threads) threads="$2"; shift ;;
        --out) out="$2"; shift ;;
        --only) only="$2"; shift ;;
        --keep-work) keep_work=1 ;;
        --engine) engine="$2"; shift ;;
        --python) python="$2"; shift ;;
        --deadline) deadline="$2"; shift ;;
        --plan) planfile="$2"; shift ;;
        --gpumem-interval) gpumem_interval="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$threads" ] || threads=$(nproc)
case "$deadline" in ''|*[!0-9]*) echo "bench.sh: --deadline takes whole seconds, not '$deadline'" >&2; exit 2 ;; esac
if [ -n "$planfile" ] && [ ! -f "$planfile" ]; then
    echo "bench.sh: --plan $planfile: no such file (relative paths start at the repository root)" >&2
    exit 2
fi
case "$device" in cpu|cuda|cuda:*) ;; *) echo "bench.sh: --device cpu or cuda[:N]" >&2; exit 2 ;; esac
devclass=${device%%:*}

# ---------------------------------------------------------------------------------------
# The plan: one line per measurement, "model mode key=value ...". Both sides get the same
# arguments. size=paper (the recipes' paper size) unless the profile says tiny.

plan_quick() {
    for m in dm-qpmnet early-fusion nnunet musplit-unet musplit-hvae pg-diffseg; do
        echo "$m train_step batch=2 warmup=1 reps=2 breakdown"
    done
    for m in dm-qpmnet early-fusion nnunet musplit-unet musplit-hvae pg-diffseg; do
        echo "$m inference batch=2 warmup=1 reps=2"
    done
    echo "dm-qpmnet segment_2048 batch=4 frame=128 warmup=1 reps=1"
    echo "early-fusion segment_2048 batch=4 frame=128 warmup=1 reps=1"
    echo "musplit-unet decompose batch=16 frame=64 warmup=1 reps=1"
    echo "musplit-hvae decompose batch=16 frame=64 warmup=1 reps=1"
    echo "pg-diffseg pgdiff_tiles batch=2 steps=5,10 warmup=1 reps=1"
    echo "pg-diffseg pgdiff_tiles batch=2 steps=100,200 warmup=1 reps=1"
}

plan_cpu() {
    # training steps: small batches at the papers' patch sizes (see the header), in 3
    # alternating rounds (engine, peer, engine, peer, engine, peer) of 4 timed steps each:
    # on a shared 2-core VM single engine-then-peer pairs of these rows moved by up to 0.15
    echo "dm-qpmnet train_step batch=2 warmup=1 reps=4 rounds=3 breakdown"
    echo "early-fusion train_step batch=2 warmup=1 reps=4 rounds=3 breakdown"
    echo "nnunet train_step batch=2 warmup=1 reps=4 rounds=3 breakdown"
    echo "musplit-unet train_step batch=4 warmup=1 reps=4 rounds=3 breakdown"
    echo "musplit-hvae train_step batch=8 warmup=1 reps=4 rounds=3 breakdown"
    echo "pg-diffseg train_step batch=1 warmup=1 reps=3"
    echo "dm-qpmnet inference batch=4 warmup=1 reps=3"
    echo "early-fusion inference batch=4 warmup=1 reps=3"
    echo "nnunet inference batch=4 warmup=1 reps=3"
    echo "musplit-unet inference batch=8 warmup=1 reps=3"
    echo "musplit-hvae inference batch=16 warmup=1 reps=3"
    echo "pg-diffseg inference batch=1 warmup=1 reps=3"
    # bfloat16 autocast inference (fast on CPUs with AVX-512 BF16 or AMX)
    for m in "dm-qpmnet 4" "early-fusion 4" "nnunet 4" "musplit-unet 8" "musplit-hvae 16" "pg-diffseg 1"; do
        set -- $m
        echo "$1 inference batch=$2 warmup=1 reps=3 precision=bfloat16"
    done
    echo "dm-qpmnet segment_2048 batch=4 frame=2048 warmup=1 reps=1"
    echo "early-fusion segment_2048 batch=4 frame=2048 warmup=1 reps=1"
    echo "musplit-unet decompose batch=16 frame=256 warmup=1 reps=1"
    echo "musplit-hvae decompose batch=16 frame=256 warmup=1 reps=1"
    echo "pg-diffseg pgdiff_tiles batch=1 steps=5,10 warmup=1 reps=2"
    echo "pg-diffseg pgdiff_tiles batch=1 steps=100,200 warmup=1 reps=1"
}

plan_cuda() {
    # first the 1024 x 1024 DM-QPMNet frame (the issue's < 10 ms target) and the inference
    # rows in float32 and bfloat16, then the papers' training batch sizes (12, 12, 10, 32,
    # 32, 10), then the whole-frame and diffusion rows
    for p in float32 bfloat16; do
        echo "dm-qpmnet segment_2048 batch=8 frame=1024 warmup=2 reps=10 precision=$p"
        echo "early-fusion segment_2048 batch=8 frame=1024 warmup=2 reps=10 precision=$p"
    done
    for p in float32 bfloat16; do
        echo "dm-qpmnet inference batch=12 warmup=3 reps=20 precision=$p"
        echo "early-fusion inference batch=12 warmup=3 reps=20 precision=$p"
        echo "nnunet inference batch=10 warmup=3 reps=20 precision=$p"
        echo "musplit-unet inference batch=32 warmup=3 reps=20 precision=$p"
        echo "musplit-hvae inference batch=32 warmup=3 reps=20 precision=$p"
        echo "pg-diffseg inference batch=10 warmup=3 reps=20 precision=$p"
        # the 49 tiles of a 1024 x 1024 frame in one forward pass: the frame's compute floor
        echo "dm-qpmnet inference batch=49 warmup=3 reps=10 precision=$p"
    done
    echo "dm-qpmnet train_step batch=12 warmup=3 reps=10"
    echo "early-fusion train_step batch=12 warmup=3 reps=10"
    echo "nnunet train_step batch=10 warmup=3 reps=10"
    echo "musplit-unet train_step batch=32 warmup=3 reps=10"
    echo "musplit-hvae train_step batch=32 warmup=3 reps=10"
    echo "pg-diffseg train_step batch=10 warmup=3 reps=10"
    for p in float32 bfloat16; do
        echo "dm-qpmnet segment_2048 batch=8 frame=2048 warmup=1 reps=3 precision=$p"
        echo "musplit-unet decompose batch=16 frame=2048 warmup=1 reps=3 precision=$p"
        echo "pg-diffseg pgdiff_tiles batch=10 steps=5,10 warmup=1 reps=3 precision=$p"
    done
    echo "early-fusion segment_2048 batch=8 frame=2048 warmup=1 reps=3"
    echo "musplit-hvae decompose batch=16 frame=2048 warmup=1 reps=3"
    echo "pg-diffseg pgdiff_tiles batch=10 steps=100,200 warmup=1 reps=2"
}

case "$profile/$devclass" in
    quick/*) plan=$(plan_quick); size=tiny ;;
    full/cpu) plan=$(plan_cpu); size=paper ;;
    full/cuda) plan=$(plan_cuda); size=paper ;;
esac
if [ -n "$planfile" ]; then
    plan=$(grep -v '^[[:space:]]*\(#\|$\)' "$planfile") || { echo "bench.sh: --plan $planfile has no plan lines" >&2; exit 2; }
fi
if [ -n "$only" ]; then
    plan=$(printf '%s\n' "$plan" | awk -v re="$only" '{ if (($1 " " $2) ~ re) print }')
    [ -n "$plan" ] || { echo "bench.sh: --only '$only' matches no measurement" >&2; exit 2; }
fi

# ---------------------------------------------------------------------------------------
# Build the engine side, find the peers' Python

PY="${python:-$ROOT/.venv/bin/python}"
command -v "$PY" >/dev/null 2>&1 || { echo "bench.sh: $PY is missing; run scripts/bootstrap.sh (or pass --python)" >&2; exit 1; }
BENCH=target/bench
mkdir -p "$BENCH/logs"
work="$BENCH/work-$profile-${device//:/}"
[ "$keep_work" = 1 ] || rm -rf "$work"
mkdir -p "$work"

if [ -n "$engine" ]; then
    exe=$engine
    [ -x "$exe" ] || { echo "bench.sh: --engine $exe is not an executable" >&2; exit 1; }
else
    echo "bench.sh: building the engine's bench binary (cargo bench --bench compare --no-run) ..."
    exe=$(cargo bench --bench compare --no-run --message-format=json 2>"$BENCH/logs/build.err" \
        | "$PY" -c 'import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "compare" and m.get("executable"):
        print(m["executable"])') || true
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        cat "$BENCH/logs/build.err" >&2
        echo "bench.sh: could not build the compare bench" >&2
        exit 1
    fi
fi
echo "bench.sh: engine: $exe"

pydeps="$ROOT/$BENCH/pydeps"
export PYTHONPATH="$pydeps${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import dynamic_network_architectures" 2>/dev/null; then
    echo "bench.sh: installing dynamic-network-architectures 0.4.4 into $BENCH/pydeps (pip --no-deps) ..."
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$pydeps" "dynamic-network-architectures==0.4.4"
fi
if ! "$PY" -c "import diffusers, safetensors" 2>/dev/null; then
    # with its dependencies (huggingface_hub, safetensors, ...); pip keeps .venv's torch and numpy
    echo "bench.sh: installing diffusers 0.42.1 and its dependencies into .venv ..."
    "$PY" -m pip install --quiet --disable-pip-version-check "diffusers==0.42.1" safetensors
fi
"$PY" benches/peers/bench_peers.py --versions > "$BENCH/versions.json"

# ---------------------------------------------------------------------------------------
# GPU memory: sampled from outside, the same way for both sides

gpumem="$BENCH/gpumem.log"
: > "$gpumem"
sampler=""
gpu_base=0
if [ "$devclass" = cuda ] && [ "$gpumem_interval" != 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
    gidx=${device#cuda}; gidx=${gidx#:}; gidx=${gidx:-0}
    gpu_base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gidx" | head -1 | tr -d ' ')
    ( while :; do
          v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gidx" 2>/dev/null | head -1 | tr -d ' ')
          echo "$(date +%s.%N) $v"
          sleep "$gpumem_interval"
      done ) >> "$gpumem" &
    sampler=$!
fi
cleanup() { [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true; }
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
# Run the plan

lines="$BENCH/measurements.jsonl"
: > "$lines"
failures=()
start=$SECONDS
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
date_str=$(date -u +"%Y-%m-%d %H:%M UTC")
n=$(printf '%s\n' "$plan" | wc -l)
i=0
while read -r model mode rest; do
    [ -n "$model" ] || continue
    i=$((i + 1))
    if [ "$deadline" -gt 0 ] && [ $((SECONDS - start)) -ge "$deadline" ]; then
        failures+=("$model $mode $rest: not run (--deadline $deadline s reached)")
        echo "bench.sh: [$i/$n] $model $mode: skipped, --deadline $deadline s reached"
        continue
    fi
    batch=2; warmup=1; reps=3; frame=0; steps=100,200; bd=(); precision=float32; rounds=1; step=0.5
    for kv in $rest; do
        case "$kv" in
            batch=*) batch=${kv#batch=} ;;
            warmup=*) warmup=${kv#warmup=} ;;
            reps=*) reps=${kv#reps=} ;;
            frame=*) frame=${kv#frame=} ;;
            steps=*) steps=${kv#steps=} ;;
            precision=*) precision=${kv#precision=} ;;
            rounds=*) rounds=${kv#rounds=} ;;
            step=*) step=${kv#step=} ;;
            breakdown) bd=(--breakdown) ;;
        esac
    done
    case "$rounds" in ''|*[!0-9]*|0) echo "bench.sh: plan line '$model $mode $rest': rounds= takes a whole number >= 1, not '$rounds'" >&2; exit 2 ;; esac
    args=(--model "$model" --mode "$mode" --size "$size" --device "$device" --threads "$threads"
          --batch "$batch" --warmup "$warmup" --reps "$reps" --frame "$frame" --steps "$steps"
          --precision "$precision" --step-fraction "$step" --work "$work" "${bd[@]}")
    tag0="$model-$mode-b$batch-f$frame-s${steps/,/-}-$precision"
    [ "$step" = 0.5 ] || tag0="$tag0-step$step"
    for round in $(seq "$rounds"); do
    tag=$tag0; rlabel=""
    [ "$rounds" = 1 ] || { tag="$tag0.r$round"; rlabel=" round $round/$rounds"; }
    for side in engine peer; do
        t0=$SECONDS
        if [ "$side" = engine ]; then
            cmd=("$exe" --bench "${args[@]}")
        else
            cmd=("$PY" benches/peers/bench_peers.py "${args[@]}")
        fi
        if "${cmd[@]}" < /dev/null > "$BENCH/logs/$tag.$side.out" 2> "$BENCH/logs/$tag.$side.err"; then
            grep '^{' "$BENCH/logs/$tag.$side.out" >> "$lines" || failures+=("$model $mode $rest: $side printed no JSON line")
            med=$(grep '^{' "$BENCH/logs/$tag.$side.out" | tail -1 | "$PY" -c 'import json,sys; print("%.4g" % json.load(sys.stdin)["median_s"])' 2>/dev/null || echo "?")
            printf 'bench.sh: [%d/%d] %-13s %-13s %-6s median %8s s  (%d s)%s\n' "$i" "$n" "$model" "$mode" "$side" "$med" $((SECONDS - t0)) "$rlabel"
        else
            rc=$?
            failures+=("$model $mode $rest: $side exit $rc (see $BENCH/logs/$tag.$side.err)")
            printf 'bench.sh: [%d/%d] %-13s %-13s %-6s FAILED (exit %d), see %s\n' "$i" "$n" "$model" "$mode" "$side" "$rc" "$BENCH/logs/$tag.$side.err"
            # the peer needs the engine's model file and inputs
            [ "$side" = engine ] && { failures+=("$model $mode $rest: peer skipped (engine failed)"); break 2; }
        fi
    done
    done
done <<< "$plan"
elapsed=$((SECONDS - start))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
cleanup
sampler=""

# ---------------------------------------------------------------------------------------
# Collect and report

export B_PROFILE=$profile B_DEVICE=$device B_THREADS=$threads B_CMD="$cmdline" B_DATE="$date_str" \
    B_ELAPSED=$elapsed B_LOAD0="$load_start" B_LOAD1="$load_end" B_GPUBASE="$gpu_base" B_LINES="$lines" \
    B_GPUMEM="$gpumem" B_VERSIONS="$BENCH/versions.json" B_OUT="$BENCH/results.json" B_ROOT="$ROOT"
printf '%s\n' "${failures[@]+"${failures[@]}"}" > "$BENCH/failures.txt"
"$PY" - <<'EOF'
import json, os
e = os.environ
rows = [json.loads(l) for l in open(e["B_LINES"]) if l.strip()]
gpu = []
for l in open(e["B_GPUMEM"]):
    p = l.split()
    if len(p) == 2:
        try:
            gpu.append([float(p[0]), float(p[1])])
        except ValueError:
            pass
fails = [l.strip() for l in open(os.path.join(os.path.dirname(e["B_OUT"]), "failures.txt")) if l.strip()]
import sys
sys.path.insert(0, os.path.join(e["B_ROOT"], "benches", "peers"))
import report
mach = report.machine({})
mach["libtorch"] = e.get("LUMOS_BENCH_LIBTORCH") or report.libtorch_version(e["B_ROOT"])
run = {"profile": e["B_PROFILE"], "device": e["B_DEVICE"], "threads": int(e["B_THREADS"]), "command": e["B_CMD"],
       "date": e["B_DATE"], "elapsed_s": float(e["B_ELAPSED"]), "loadavg_start": e["B_LOAD0"],
       "loadavg_end": e["B_LOAD1"], "gpu_memory_baseline_mib": float(e["B_GPUBASE"] or 0), "failures": fails,
       "machine": mach}
json.dump({"run": run, "versions": json.load(open(e["B_VERSIONS"])), "measurements": rows, "gpu_memory": gpu},
          open(e["B_OUT"], "w"), indent=1)
EOF
"$PY" benches/peers/report.py --results "$BENCH/results.json" --out "$out" --root "$ROOT"
echo "bench.sh: $BENCH/results.json, $out (${elapsed} s)"
if [ ${#failures[@]} -gt 0 ]; then
    printf 'bench.sh: failed: %s\n' "${failures[@]}" >&2
    exit 1
fi
