"""The PyTorch side of the engine-vs-peers comparison (issue 7): one measurement per
process, printed as one JSON line, with the same arguments as the engine's
``benches/compare.rs`` (``scripts/bench.sh`` runs both for every measurement of its plan).

    .venv/bin/python benches/peers/bench_peers.py --model M --mode MODE [--size paper|tiny]
        [--device cpu|cuda] [--threads N] [--batch B] [--warmup W] [--reps R] [--frame N]
        [--steps I,S] [--breakdown] --work DIR
    .venv/bin/python benches/peers/bench_peers.py --versions

The engine's measurement runs first and writes the model file (``DIR/MODEL/model.lumos``,
seeded weights) and the inputs (``DIR/MODEL/MODE-bB-fF.safetensors``, with the engine's
training config in the metadata); this script loads both, so peer and engine run the
same weights on the same inputs with the same hyperparameters.

Peers (PyTorch eager, the torch in this interpreter):
- ``early-fusion``, ``nnunet``: dynamic_network_architectures' ``PlainConvUNet`` (nnU-Net's
  own network class), engine weights mapped in (``models.load_engine_into_dna``).
- ``dm-qpmnet``, ``musplit-unet``, ``musplit-hvae``, ``pg-diffseg``: the faithful
  transcriptions of ``models.py`` (parity: ``check_parity.py``).
- training steps: the engine's loss written in PyTorch (nnU-Net's CE + soft Dice with deep
  supervision; muSplit's MSE / Gaussian NLL + KL; PG-DiffSeg's two epsilon-prediction L2
  losses), ``loss.backward()``, ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` and
  ``torch.optim.SGD(nesterov=True)`` / ``Adamax`` / ``Adam`` with the engine's settings, torch's
  default implementation choice (for-loop on CPU, foreach on CUDA).
- ``segment_2048``: a PyTorch sliding window with Gaussian importance weighting (nnU-Net's:
  step 0.5, sigma = tile / 8), the frame on the device in one piece, the engine's batches
  (``--batch`` tiles in reading order across rows of tiles), softmax probabilities blended
  on the device, argmax to uint8 labels on the device, one copy of the labels to the host.
- ``decompose``: ``MuSplitNet.decompose`` (the engine's inner-padding tiling, batch 16).
- ``pgdiff_tiles``: the autoencoder's encoder, diffusers' ``DDIMInverseScheduler`` loop with
  LDM-P (prior start), diffusers' ``DDIMScheduler`` loop with LDM-S (eta 0, ``clip_sample``
  with ``use_clipped_model_output``, as the engine's clipping), bilinear resize, scores.

Timing: ``--warmup`` untimed and ``--reps`` timed repetitions, each ended by
``torch.cuda.synchronize()`` on a GPU; median reported. Peak memory: the resident
high-water mark is reset after setup (``/proc/self/clear_refs``), then
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end; on a GPU also
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after
``reset_peak_memory_stats``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def versions() -> dict:
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "torch_cuda": torch.version.cuda, "torch_threads_default": torch.get_num_threads()}
    for mod in ("dynamic_network_architectures", "diffusers", "safetensors"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod.replace("_", "-")) if mod != "dynamic_network_architectures" else version(mod)
        except Exception:  # noqa: BLE001
            try:
                out[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001
                out[mod] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", action="store_true", help="print the versions as JSON and exit")
    p.add_argument("--bench", action="store_true", help="accepted for symmetry with the engine")
    p.add_argument("--model")
    p.add_argument("--mode")
    p.add_argument("--size", default="paper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--frame", type=int, default=2048)
    p.add_argument("--steps", default="100,200")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--step-fraction", type=float, default=0.5,
                   help="segment_2048: sliding-window step as a fraction of the tile (nnU-Net's 0.5)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="inference modes: bfloat16 = torch.autocast(dtype=torch.bfloat16) with a channels-last "
                        "network and inputs (training steps stay float32)")
    p.add_argument("--work")
    a = p.parse_args(argv)
    if not a.versions and not (a.model and a.mode and a.work):
        p.error("--model, --mode and --work are required")
    return a


# ---------------------------------------------------------------------------------------
# Memory and time


def status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def median(v):
    s = sorted(v)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# ---------------------------------------------------------------------------------------
# Losses (the engine's, src/nn/loss.rs and src/nn/musplit.rs, in PyTorch)


def soft_dice_loss(logits, target):
    import torch.nn.functional as F

    k = logits.shape[1]
    probs = logits.softmax(1)
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1.0 - onehot)).sum(dims)
    fn = ((1.0 - probs) * onehot).sum(dims)
    dice = (2.0 * tp + 1e-5) / (2.0 * tp + fp + fn + 1e-5).clamp_min(1e-8)
    fg = dice[1:] if k > 1 else dice
    return 1.0 - fg.mean()


def ce_dice_loss(logits, target):
    import torch.nn.functional as F

    return F.cross_entropy(logits, target) + soft_dice_loss(logits, target)


def deep_supervision_weights(n: int):
    if n == 1:
        return [1.0]
    w = [0.5 ** i for i in range(n)]
    w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def deep_supervision_loss(outputs, target):
    import torch.nn.functional as F

    w = deep_supervision_weights(len(outputs))
    tf = target.unsqueeze(1).float()
    total = None
    for o, wi in zip(outputs, w):
        if wi == 0.0:
            continue
        if tuple(o.shape[2:]) == tuple(target.shape[1:]):
            t = target
        else:
            t = F.interpolate(tf, size=tuple(o.shape[2:]), mode="nearest-exact").squeeze(1).long()
        term = ce_dice_loss(o, t) * wi
        total = term if total is None else total + term
    return total


# ---------------------------------------------------------------------------------------
# Peers


PEERS = {
    "dm-qpmnet": "PyTorch transcription DmQpmNet (benches/peers/models.py)",
    "early-fusion": "dynamic_network_architectures PlainConvUNet",
    "angles-only": "dynamic_network_architectures PlainConvUNet",
    "phase-only": "dynamic_network_architectures PlainConvUNet",
    "nnunet": "dynamic_network_architectures PlainConvUNet",
    "musplit-unet": "PyTorch transcription MuSplitNet, LC U-Net (benches/peers/models.py)",
    "musplit-hvae": "PyTorch transcription MuSplitNet, LC HVAE (benches/peers/models.py)",
    "pg-diffseg": "PyTorch transcription PgDiffNet (benches/peers/models.py)",
}


def build_net(model: str, meta: dict, sd, deep_supervision: bool):
    import torch
    from torch import nn

    import models as M

    if model in ("early-fusion", "angles-only", "phase-only", "nnunet"):
        dna = M.dna_plainconvunet(meta, deep_supervision=deep_supervision)
        M.load_engine_into_dna(dna, sd)
        arch = {**M.DMQPM_DEFAULTS, **meta["architecture"]} if meta["kind"] == "dmqpm" else None
        if arch is not None and list(arch["channels"]) != [0, 1, 2, 3, 4]:
            sel = torch.tensor(arch["channels"], dtype=torch.int64)

            class Sel(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.net = dna
                    self.register_buffer("sel", sel, persistent=False)

                def forward(self, x):
                    return self.net(x.index_select(1, self.sel))

            return Sel()
        return dna
    net = M.build_peer(meta)
    net.load_state_dict(sd, strict=True)
    return net


def segmentation_forward(net, x, deep_supervision: bool):
    """Logits as a list, full resolution first (the engine's Net::forward)."""
    import models as M

    if isinstance(net, M.DmQpmNet) or isinstance(net, M.UNet):
        out = net(x, deep_supervision=deep_supervision)
    else:
        out = net(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def optimizer_impl(opt) -> str:
    """Which implementation torch picks for this optimizer by default."""
    import torch

    d = opt.defaults
    if d.get("fused"):
        return "fused"
    if d.get("foreach") is not None:
        return "foreach" if d["foreach"] else "for-loop"
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        return "foreach (torch default)" if foreach else "for-loop (torch default)"
    except Exception:  # noqa: BLE001
        return "torch default"


# ---------------------------------------------------------------------------------------
# Measurement


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.versions:
        print(json.dumps(versions()))
        return 0
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.torch import load_file

    import models as M

    threads = a.threads if a.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        # nnU-Net's own setting for training and prediction
        torch.backends.cudnn.benchmark = True
    bf16 = a.precision == "bfloat16" and a.mode != "train_step"

    def amp():
        """The inference precision: bfloat16 autocast, or nothing."""
        import contextlib
        return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def for_inference(net):
        """eval(); with bfloat16, the channels-last layout that tensor-core convolutions prefer."""
        net = net.eval()
        return net.to(memory_format=torch.channels_last) if bf16 else net

    def cl(x):
        return x.contiguous(memory_format=torch.channels_last) if bf16 and x.dim() == 4 else x

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(warmup, reps, f):
        """warmup untimed, reps timed calls (each ended by a device sync); the times and the
        first finite value f returned (the check value)."""
        first = float("nan")
        for _ in range(warmup):
            v = f(True)
            sync()
            if first != first:
                first = v
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            v = f(False)
            sync()
            times.append(time.perf_counter() - t)
            if first != first:
                first = v
        return times, first

    t_setup = time.perf_counter()
    d = os.path.join(a.work, a.model)
    model_file = os.path.join(d, "model.lumos")
    inputs_file = os.path.join(d, f"{a.mode}-b{a.batch}-f{a.frame}.safetensors")
    for f in (model_file, inputs_file):
        if not os.path.isfile(f):
            raise SystemExit(f"bench_peers: {f} is missing; the engine's measurement writes it (run it first)")
    meta = M.read_metadata(model_file)
    with safe_open(inputs_file, "pt") as f:
        cfg = json.loads(f.metadata()["train_config"])
    inp = load_file(inputs_file)
    sd = M.engine_state_dict(model_file)
    kind = meta["kind"]
    t = meta["patch_size"][0]
    extra = {}
    out = {"side": "peer", "model": a.model, "mode": a.mode, "size": a.size, "kind": kind,
           "impl": f"PyTorch {torch.__version__} eager: {PEERS.get(a.model, 'transcription')}",
           "device": str(dev), "threads": torch.get_num_threads(), "batch": a.batch, "tile": t, "frame": None,
           "precision": "bfloat16" if bf16 else "float32",
           "warmup": a.warmup, "reps": a.reps, "model_file": model_file, "inputs_file": inputs_file}
    pixels = 0.0
    tiles = 0.0
    breakdown_fn = None

    def start_measuring():
        extra["peak_reset"] = reset_peak()
        extra["base_rss_mib"] = status_kib("VmRSS:") / 1024.0
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        return time.time()

    if a.mode == "train_step":
        pixels = a.batch * t * t
        x = inp["x"].to(dev)
        if kind in ("unet", "dmqpm"):
            y = inp["y"].long().to(dev)
            ds = bool(cfg["deep_supervision"])
            net = build_net(a.model, meta, sd, ds).to(dev).train()
            del sd
            lr = cfg["learning_rate"]
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                                  nesterov=True)
            clip = cfg["grad_clip"]

            def loss_fn():
                return deep_supervision_loss(segmentation_forward(net, x, ds), y)

            def step(_warm):
                loss = loss_fn()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                return loss.item()

            extra["optimizer"] = (f"torch.optim.SGD(nesterov=True, momentum={cfg['momentum']}, "
                                  f"weight_decay={cfg['weight_decay']}) [{optimizer_impl(opt)}], "
                                  f"clip_grad_norm_({clip}); deep supervision {ds}")
        elif kind == "musplit":
            y = inp["y"].to(dev)
            net = build_net(a.model, meta, sd, False).to(dev).train()
            del sd
            mc = {**M.MUSPLIT_DEFAULTS, **cfg["musplit"]}
            lr = mc["learning_rate"]
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.Adamax(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
            clipv = mc["grad_clip_value"]
            hvae = mc["variant"] == "hvae"

            def loss_fn():
                mean, lv, kl = net.forward_full(x)
                if net.stochastic:
                    nll = ((lv + (y - mean).square() * (-lv).exp()) * 0.5).mean()
                    return nll + kl * mc["kl_weight"] if kl is not None else nll
                return (y - mean).square().mean()

            counter = [0]

            def step(_warm):
                counter[0] += 1
                if hvae:
                    torch.manual_seed(counter[0])
                loss = loss_fn()
                opt.zero_grad()
                loss.backward()
                if clipv > 0:
                    torch.nn.utils.clip_grad_value_(params, clipv)
                opt.step()
                return loss.item()

            extra["optimizer"] = f"torch.optim.Adamax(lr={lr}) [{optimizer_impl(opt)}], clip_grad_value_({clipv})"
        elif kind == "pgdiff":
            y = inp["y"].long().to(dev)
            net = build_net(a.model, meta, sd, False).to(dev).train()
            del sd
            pc = cfg["pgdiff"]
            T = pc["timesteps"]
            ab = torch.tensor(M.linear_schedule(T, pc["beta_start"], pc["beta_end"]), dtype=torch.float64)
            ab = ab.to(torch.float32).to(dev)
            k = net.n_classes
            f = 2 ** (len(pc["autoencoder"]["ch_mult"]) - 1)
            lr = pc["learning_rate"]
            params = list(net.ldm_p.parameters()) + list(net.ldm_s.parameters())
            opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
            clip = pc["grad_clip"]

            def q_sample(x0, tt, noise):
                a_ = ab.index_select(0, tt).view(-1, 1, 1, 1)
                return x0 * a_.sqrt() + noise * (1.0 - a_).sqrt()

            def mask_latent(masks):
                oh = F.one_hot(masks, k).permute(0, 3, 1, 2).float()
                return F.avg_pool2d(oh, f, f) * 2.0 - 1.0

            counter = [0]

            def step(_warm):
                counter[0] += 1
                torch.manual_seed(counter[0])
                with torch.no_grad():
                    z = net.encode(x)
                n = z.shape[0]
                tp = torch.randint(T, (n,), device=dev)
                ep = torch.randn_like(z)
                lp = (net.ldm_p(q_sample(z, tp, ep), tp) - ep).square().mean()
                m = mask_latent(y)
                ts = torch.randint(T, (n,), device=dev)
                es = torch.randn_like(m)
                ls = (net.ldm_s(torch.cat([q_sample(m, ts, es), z], 1), ts) - es).square().mean()
                loss = lp + ls
                opt.zero_grad()
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                return loss.item()

            loss_fn = None
            extra["optimizer"] = (f"torch.optim.Adam(lr={lr}) on LDM-P + LDM-S [{optimizer_impl(opt)}], "
                                  f"clip_grad_norm_({clip}) (diffusion phase)")
        else:
            raise SystemExit(f"unknown kind {kind}")
        extra["learning_rate"] = lr
        t0 = start_measuring()
        times, check = timed(a.warmup, a.reps, step)
        if a.breakdown and loss_fn is not None:
            def breakdown_fn():
                reps = max(a.reps, 1)
                if kind == "musplit":
                    torch.manual_seed(1)
                fwd, _ = timed(0, reps, lambda _w: loss_fn().item())

                def fb(_w):
                    loss = loss_fn()
                    loss.backward()
                    return loss.item()

                fwdbwd, _ = timed(0, reps, fb)
                extra["forward_loss_s"] = median(fwd)
                extra["forward_backward_s"] = median(fwdbwd)
    elif a.mode == "inference":
        pixels = a.batch * t * t
        x = cl(inp["x"].to(dev))
        net = for_inference(build_net(a.model, meta, sd, False).to(dev))
        del sd
        if kind == "pgdiff":
            m = inp["m"].to(dev)
            with torch.no_grad():
                z = net.encode(x)
            extra["what"] = "one LDM-P and one LDM-S evaluation on the tiles' latents (t = 500)"

            def infer(_warm):
                with torch.no_grad(), amp():
                    e1 = net.eps_p(z, 500)
                    e2 = net.eps_s(m, z, 500)
                    return e1.abs().mean().item() + e2.abs().mean().item()
        else:
            def infer(_warm):
                if kind == "musplit":
                    torch.manual_seed(7)
                with torch.no_grad(), amp():
                    o = segmentation_forward(net, x, False)[0] if kind != "musplit" else net(x)
                    return o.float().mean().item()
        t0 = start_measuring()
        times, check = timed(a.warmup, a.reps, infer)
    elif a.mode == "segment_2048":
        n = a.frame
        out["frame"] = n
        pixels = n * n
        frame = inp["frame"].numpy()
        net = for_inference(build_net(a.model, meta, sd, False).to(dev))
        del sd
        step_fraction, bs = a.step_fraction, a.batch

        def starts(size, tile):
            if size <= tile:
                return [0]
            target = tile * step_fraction
            k = int(math.ceil((size - tile) / target)) + 1
            actual = (size - tile) / (k - 1)
            return [int(round(actual * i)) for i in range(k)]

        def gaussian(tile):
            sigma = tile / 8.0
            c = (tile - 1) / 2.0
            g1 = np.exp(-((np.arange(tile) - c) ** 2) / (2 * sigma * sigma)).astype(np.float32)
            g = torch.from_numpy(np.outer(g1, g1))
            g = g / g.max()
            return g.clamp_min(g[g > 0].min()).to(dev)

        k = len(meta["classes"])
        gauss = gaussian(t)
        n_tiles = len(starts(n, t)) ** 2
        tiles = n_tiles
        extra["sliding_window"] = {"step_fraction": step_fraction, "batch": bs, "tiles": n_tiles, "mirror": False}

        def segment(fr):
            c, h, w = fr.shape
            x = M.normalize(fr, meta["normalization"]).to(dev)
            if h < t or w < t:
                x = F.pad(x, (0, max(0, t - w), 0, max(0, t - h)))
            hp, wp = x.shape[1], x.shape[2]
            acc = torch.zeros((k, hp, wp), device=dev)
            wsum = torch.zeros((hp, wp), device=dev)
            tiles = [(y0, x0) for y0 in starts(h, t) for x0 in starts(w, t)]
            with torch.no_grad():
                for i in range(0, len(tiles), bs):
                    chunk = tiles[i:i + bs]
                    batch = cl(torch.stack([x[:, y0:y0 + t, x0:x0 + t] for y0, x0 in chunk], 0))
                    with amp():
                        p = segmentation_forward(net, batch, False)[0].float().softmax(1)
                    for j, (y0, x0) in enumerate(chunk):
                        acc[:, y0:y0 + t, x0:x0 + t] += p[j] * gauss
                        wsum[y0:y0 + t, x0:x0 + t] += gauss
                labels = (acc[:, :h, :w] / wsum[:h, :w]).argmax(0).to(torch.uint8).cpu().numpy()
            return labels

        def run(warm):
            if warm:
                # on a GPU the whole frame (cuDNN's autotuner sees the measured shapes), as
                # the engine does; one tile on the CPU
                segment(frame if dev.type == "cuda" else frame[:, :min(t, n), :min(t, n)])
                return float("nan")
            return float(segment(frame).mean())

        t0 = start_measuring()
        times, check = timed(a.warmup, a.reps, run)
    elif a.mode == "decompose":
        n = a.frame
        out["frame"] = n
        pixels = n * n
        frame = inp["frame"].numpy()
        net = for_inference(build_net(a.model, meta, sd, False).to(dev))
        del sd
        keep = t // 2
        tiles = (-(-n // keep)) ** 2
        extra["tiling"] = {"tile": t, "keep": keep, "batch": 16, "samples": 1, "tiles": tiles}

        def run(warm):
            with amp():
                if warm:
                    w = min(2 * t, n)
                    net.decompose(frame[:w, :w], meta, batch_size=16, samples=1, seed=0)
                    return float("nan")
                return float(net.decompose(frame, meta, batch_size=16, samples=1, seed=0).mean())

        t0 = start_measuring()
        times, check = timed(a.warmup, a.reps, run)
    elif a.mode == "pgdiff_tiles":
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        pixels = a.batch * t * t
        tiles = a.batch
        x = cl(inp["x"].to(dev))
        net = for_inference(build_net(a.model, meta, sd, False).to(dev))
        del sd
        pc = cfg["pgdiff"]
        samp = {**M.SAMPLING_DEFAULTS, **pc.get("sampling", {})}
        if samp["start"] != "prior" or samp["eta"] != 0 or samp["samples"] != 1:
            raise SystemExit("pgdiff_tiles: only the prior start, eta 0 and one sample are compared")
        inv_steps, samp_steps = (int(v) for v in a.steps.split(","))
        base = dict(num_train_timesteps=pc["timesteps"], beta_start=pc["beta_start"], beta_end=pc["beta_end"],
                    beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                    timestep_spacing="leading", prediction_type="epsilon")
        inverse = DDIMInverseScheduler(**base, clip_sample=False)
        sampler = DDIMScheduler(**base, clip_sample=bool(samp["clip_denoised"]), clip_sample_range=1.0)
        k = net.n_classes
        extra["steps"] = [inv_steps, samp_steps]
        extra["sampling"] = {**samp, "inversion_steps": inv_steps, "sampling_steps": samp_steps}

        def predict(n_inv, n_samp):
            with torch.no_grad(), amp():
                n_, _, th, tw = x.shape
                z = net.encode(x)
                _, _, h, w = z.shape
                lat = z
                inverse.set_timesteps(n_inv)
                for tt in inverse.timesteps:
                    lat = inverse.step(net.eps_p(lat, int(tt)), int(tt), lat).prev_sample
                y = lat.mean(1, keepdim=True).expand(n_, k, h, w).contiguous()
                sampler.set_timesteps(n_samp)
                for tt in sampler.timesteps:
                    y = sampler.step(net.eps_s(y, z, int(tt)), int(tt), y, eta=0.0,
                                     use_clipped_model_output=True).prev_sample
                up = F.interpolate(y, size=(th, tw), mode="bilinear", align_corners=False)
                p = ((up + 1.0) * 0.5).clamp(0.0, 1.0)
                return p / (p.sum(1, keepdim=True) + 1e-6)

        def run(warm):
            p = predict(1, 1) if warm else predict(inv_steps, samp_steps)
            return p[:, 1].float().mean().item()

        t0 = start_measuring()
        times, check = timed(a.warmup, a.reps, run)
    else:
        raise SystemExit(f"unknown mode {a.mode!r}")
    t1 = time.time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = {}
    if cuda:
        gpu = {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated(dev) / 2 ** 20,
               "cuda_max_reserved_mib": torch.cuda.max_memory_reserved(dev) / 2 ** 20}
    if breakdown_fn is not None:
        breakdown_fn()
    med = median(times)
    out.update({
        "warmup": a.warmup, "reps": a.reps, "times_s": times, "median_s": med,
        "mp_per_s": pixels / 1e6 / med, "tiles_per_s": (tiles / med) if tiles else None,
        "peak_rss_mib": peak, "params": M.count_parameters(net),
        "check": check if (isinstance(check, float) and math.isfinite(check)) else None,
        "pid": os.getpid(), "t_start": t0, "t_end": t1,
        "setup_s": time.perf_counter() - t_setup - (t1 - t0),
    })
    out.update(gpu)
    out.update(extra)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
