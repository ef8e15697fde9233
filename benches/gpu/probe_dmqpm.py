"""Where a DM-QPMNet forward pass spends its time on a CUDA GPU, and what would cut it.

Runs the PyTorch peer of an engine model file (benches/peers/models.py, same weights) on
batches of 256 x 256 tiles (16 = a 1024 x 1024 frame at sliding-window step 1.0, 49 = at
nnU-Net's step 0.5) in these variants, and prints one JSON line per variant (median of
the timed repetitions, CUDA events) and a kernel table of one of them:

  autocast        the benchmark's peer recipe: bfloat16 autocast, channels-last net/input
  autocast_nhwc   the same with the InstanceNorm computed on the channels-last map (what
                  the engine's CUDA path does, blocks::InstanceNorm::forward_nhwc)
  graph_nhwc      autocast_nhwc captured once in a CUDA graph and replayed (launch cost gone)
  fp32_nhwc       float32 (TF32 convolutions), channels-last, NHWC InstanceNorm
  autocast_nchw   bfloat16 autocast on NCHW maps (no channels-last)

and, first, the host side of a 1024 x 1024 frame (copy to the device, finiteness check),
the InstanceNorm's parts per stage (statistics three ways, the affine map, LeakyReLU) and
the fusion's attention on each SDPA backend.

  python3 benches/gpu/probe_dmqpm.py MODEL.lumos [--reps 20] > probe.jsonl
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "peers"))
import models  # noqa: E402


def nhwc_instance_norm(self, x):
    n, c, h, w = x.shape
    t = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
    var, mean = torch.var_mean(t, dim=1, correction=0, keepdim=True)
    scale = (var.float() + 1e-5).rsqrt() * self.weight.float()
    shift = self.bias.float() - mean.float() * scale
    y = torch.addcmul(shift.to(x.dtype), t, scale.to(x.dtype))
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


def time_it(fn, warmup, reps):
    """Median and all times (ms) of `reps` calls after `warmup`: CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if not cuda:  # the CPU dry run (checks the script, times nothing of interest)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times


def split_var_mean(t):
    """blocks::nhwc_var_mean: (N, L, C) -> float32 (var, mean) over L, L split in k parts."""
    n, l, c = t.shape
    k = 1
    while 2 * k * c <= 1024 and l % (2 * k) == 0 and l // (2 * k) >= 64:
        k *= 2
    var, mean = torch.var_mean(t.view(n, l // k, k * c), dim=1, correction=0)
    var, mean = var.float().view(n, k, c), mean.float().view(n, k, c)
    mv, mm = torch.var_mean(mean, dim=1, correction=0, keepdim=True)
    return var.mean(1, keepdim=True) + mv, mm


def micro(dev, reps):
    """The InstanceNorm's parts on channels-last bfloat16 maps of a 16-tile batch, per stage,
    and the fusion's attention (16 x 4096 tokens, 8 heads of 16) on each SDPA backend."""
    for c, hw in [(32, 256), (64, 128), (128, 64), (256, 32)]:
        x = torch.randn(16, hw * hw, c, device=dev, dtype=torch.bfloat16)
        scale = torch.randn(16, 1, c, device=dev, dtype=torch.bfloat16)
        ones = torch.ones(16, 1, hw * hw, device=dev, dtype=torch.bfloat16)
        row = {"micro": "norm", "shape": [16, c, hw, hw]}
        row["var_mean_ms"] = round(time_it(lambda: torch.var_mean(x, dim=1, correction=0), 3, reps)[0], 4)
        row["split_var_mean_ms"] = round(time_it(lambda: split_var_mean(x), 3, reps)[0], 4)
        try:
            row["bmm_sums_ms"] = round(time_it(lambda: (torch.bmm(ones, x, out_dtype=torch.float32),
                                                        torch.bmm(x.transpose(1, 2), x, out_dtype=torch.float32)), 3, reps)[0], 4)
        except Exception as e:
            row["bmm_sums_error"] = str(e)[:120]
        row["sum_f32_ms"] = round(time_it(lambda: x.sum(1, dtype=torch.float32), 3, reps)[0], 4)
        row["addcmul_ms"] = round(time_it(lambda: torch.addcmul(scale, x, scale), 3, reps)[0], 4)
        k = max(1, min(1024 // c, hw * hw // 64))
        xs, ss = x.view(16, hw * hw // k, k * c), scale.repeat(1, 1, k)
        row["addcmul_split_ms"] = round(time_it(lambda: torch.addcmul(ss, xs, ss), 3, reps)[0], 4)
        row["leaky_relu_ms"] = round(time_it(lambda: F.leaky_relu(x, 0.01, inplace=True), 3, reps)[0], 4)
        row["copy_ms"] = round(time_it(lambda: x.clone(), 3, reps)[0], 4)
        print(json.dumps(row), flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(16, 8, 4096, 16, device=dev, dtype=torch.bfloat16)
    row = {"micro": "sdpa", "shape": [16, 8, 4096, 16]}
    for name, be in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            if be is None:
                row[name + "_ms"] = round(time_it(lambda: F.scaled_dot_product_attention(q, q, q), 3, reps)[0], 4)
            else:
                with sdpa_kernel(be):
                    row[name + "_ms"] = round(time_it(lambda: F.scaled_dot_product_attention(q, q, q), 3, reps)[0], 4)
        except Exception as e:
            row[name + "_error"] = str(e)[:120]
    print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", default="16,49")
    ap.add_argument("--profile-batch", type=int, default=16)
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, meta = models.load_peer(a.model, dev)
    tile = meta.get("patch_size", [256, 256])
    th, tw = (tile[0], tile[1]) if isinstance(tile, list) else (256, 256)
    orig = models.InstanceNorm.forward
    print(json.dumps({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                      "cudnn": torch.backends.cudnn.version(), "tile": [th, tw],
                      "parameters": models.count_parameters(net)}), flush=True)
    # the host side of a 1024 x 1024 frame: its copy to the device from pageable memory
    # (the engine copies the caller's buffer as it is) and a finiteness check on the host
    frame = np.random.default_rng(0).random((5, 1024, 1024), dtype=np.float32)
    pinned = None
    if dev.type == "cuda":
        h2d, _ = time_it(lambda: torch.from_numpy(frame).to(dev), 2, 10)
        pinned = torch.empty(frame.shape, dtype=torch.float32, pin_memory=True)

        def staged():  # host copy into a page-locked buffer (libtorch's parallel copy), then DMA
            pinned.copy_(torch.from_numpy(frame))
            return pinned.to(dev, non_blocking=True)
        h2d_staged, _ = time_it(staged, 2, 10)
        h2d_pinned, _ = time_it(lambda: pinned.to(dev, non_blocking=True), 2, 10)
    else:
        h2d = h2d_staged = h2d_pinned = float("nan")
    fin, _ = time_it(lambda: bool(np.isfinite(frame).all()), 2, 10)
    print(json.dumps({"frame": [5, 1024, 1024], "h2d_pageable_ms": round(h2d, 3), "h2d_staged_ms": round(h2d_staged, 3),
                      "h2d_from_pinned_ms": round(h2d_pinned, 3), "threads": torch.get_num_threads(), "host_isfinite_ms": round(fin, 3)}), flush=True)
    if dev.type == "cuda":
        micro(dev, a.reps)
    for batch in [int(b) for b in a.batches.split(",")]:
        x = torch.randn(batch, 5, th, tw, device=dev)
        xcl = x.contiguous(memory_format=torch.channels_last)

        def fwd(net_, inp, bf16):
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                return net_(inp)[0]

        def report(name, fn, ref=None):
            med, ts = time_it(fn, 3, a.reps)
            row = {"variant": name, "batch": batch, "median_ms": round(med, 3), "ms_per_tile": round(med / batch, 4)}
            if ref is not None:
                row["argmax_agreement_with_fp32"] = round((fn().float().argmax(1) == ref.float().argmax(1)).float().mean().item(), 5)
            row["times_ms"] = [round(t, 3) for t in ts]
            print(json.dumps(row), flush=True)

        models.InstanceNorm.forward = orig
        net.to(memory_format=torch.contiguous_format)
        report("autocast_nchw", lambda: fwd(net, x, True))
        cl = net.to(memory_format=torch.channels_last)
        report("autocast", lambda: fwd(cl, xcl, True))
        ref = fwd(cl, xcl, False)
        models.InstanceNorm.forward = nhwc_instance_norm
        report("autocast_nhwc", lambda: fwd(cl, xcl, True), ref)
        report("fp32_nhwc", lambda: fwd(cl, xcl, False), ref)
        if dev.type != "cuda":
            continue
        # CUDA graph of the bfloat16 NHWC forward
        try:
            static_x = xcl.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fwd(cl, static_x, True)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = fwd(cl, static_x, True)
            med, ts = time_it(g.replay, 3, a.reps)
            print(json.dumps({"variant": "graph_nhwc", "batch": batch, "median_ms": round(med, 3),
                              "ms_per_tile": round(med / batch, 4), "times_ms": [round(t, 3) for t in ts]}), flush=True)
            del g, static_out
        except Exception as e:  # report, go on
            print(json.dumps({"variant": "graph_nhwc", "batch": batch, "error": str(e)[:300]}), flush=True)
        # launch-bound or GPU-bound: host time to enqueue one forward without waiting
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd(cl, xcl, True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(json.dumps({"variant": "autocast_nhwc_enqueue", "batch": batch, "host_ms": round((t1 - t0) * 1e3, 3),
                          "total_ms": round((time.perf_counter() - t0) * 1e3, 3)}), flush=True)
        if batch == a.profile_batch:
            from torch.profiler import ProfilerActivity, profile
            for label, norm in [("autocast", orig), ("autocast_nhwc", nhwc_instance_norm)]:
                models.InstanceNorm.forward = norm
                fwd(cl, xcl, True)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fwd(cl, xcl, True)
                    torch.cuda.synchronize()
                print(f"# kernels of one {label} forward, batch {batch}", flush=True)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)
        models.InstanceNorm.forward = orig


if __name__ == "__main__":
    main()
