# Sourced by the GPU scripts (benches/gpu/run.sh, benches/gpu/frame.sh) on a GPU machine
# prepared by benches/gpu/prepare.sh, from the repository root, with $out set: the engine
# binary built elsewhere runs against the machine's own libtorch (python3's torch
# 2.11.0+cu130, through LD_LIBRARY_PATH, as platform.md says), the peers run in that
# python3 with the carried wheels; writes $out/nvidia-smi.txt and $out/smoke.txt and fails
# (returns 1) when the engine does not see the GPU.
torchlib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || return 1
export LD_LIBRARY_PATH="$torchlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVRTC (the engine's fused CUDA kernels, nn::cuda_norm): torch's wheel takes it from the
# nvidia-* packages beside it, where the engine finds it by itself (cuda_norm::ensure_nvrtc)
nvrtc=$(python3 -c 'import glob, os, torch; r = os.path.dirname(os.path.dirname(torch.__file__)); c = sorted(glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so*"), recursive=True)); print(c[0] if c else "")')
echo "env.sh: NVRTC at ${nvrtc:-nowhere}"
export LUMOS_BENCH_LIBTORCH="$(python3 -c 'import torch; print(torch.__version__)') (python3's torch on this machine, through LD_LIBRARY_PATH)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lumos-site target/gpu/whl/*.whl || return 1
export PYTHONPATH="/tmp/lumos-site:$PWD/target/gpu/pydeps"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# the engine must see the GPU: fail fast otherwise
if ! target/gpu/compare --bench --model dm-qpmnet --mode inference --size tiny --device cuda --batch 2 --warmup 1 --reps 2 \
        --work /tmp/lumos-smoke > "$out/smoke.txt" 2>&1; then
    cat "$out/smoke.txt"
    return 1
fi
tail -1 "$out/smoke.txt"
