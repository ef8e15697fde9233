"""Plain PyTorch transcriptions of the lumos engine's networks (the peers of issue 7).

Every class mirrors a Rust module of the engine line by line, and its state_dict keys are
the engine's VarStore names (the safetensors tensor names of a model file), so

    net = build_peer(metadata)                    # metadata = the model file's "lumos" JSON
    net.load_state_dict(engine_state_dict(path), strict=True)

loads a trained engine model. Parameters (``net.parameters()``) are exactly the engine's
trainable variables; the engine's non-trained variables (BatchNorm running statistics,
PG-DiffSeg's ``latent_scale``) are buffers here.

| engine (src/)            | here                                                         |
|--------------------------|--------------------------------------------------------------|
| nn/blocks.rs             | InstanceNorm, ConvNormAct, StackedConvs, Encoder, Decoder    |
| nn/unet.rs   (unet)      | UNet                                                         |
| nn/dmqpm.rs  (dmqpm)     | DmQpmNet (dual: attention / bidirectional / concat fusion,   |
|                          | early_fusion baselines), CrossAttention, Fusion              |
| nn/musplit.rs (musplit)  | MuSplitNet (LC U-Net and LC LadderVAE / HAE), ResGated       |
| nn/ldm.rs, diffseg.rs,   | Autoencoder, DiffusionUnet, PgDiffNet (+ the deterministic   |
| ddim.rs (pgdiff)         | PG-DiffSeg pipeline: prior / forward starts, DDIM, clipping) |
| normalize.rs             | normalize()                                                  |
| lc.rs, split.rs, tiling  | lc_crops(), MuSplitNet.decompose() (inner-padding tiling)    |

``dna_plainconvunet`` builds the same nnU-Net from dynamic_network_architectures'
PlainConvUNet (PyPI ``dynamic-network-architectures``) and ``load_engine_into_dna`` maps
engine weights into it.

Only torch (and numpy for the normalization helpers) is needed.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNet", "DmQpmNet", "MuSplitNet", "Autoencoder", "DiffusionUnet", "PgDiffNet",
    "build_peer", "load_peer", "engine_state_dict", "read_metadata", "normalize", "lc_crops",
    "dna_plainconvunet", "load_engine_into_dna", "count_parameters", "stage_features",
]


# ---------------------------------------------------------------------------------------
# Model files


def read_metadata(path) -> dict:
    """The ``lumos`` JSON metadata of an engine model file (safetensors header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["lumos"])


def engine_state_dict(path, device="cpu") -> Dict[str, torch.Tensor]:
    """The weights of an engine model file, without checkpoint-only entries (optimizer.*)."""
    from safetensors.torch import load_file

    sd = load_file(str(path), device=str(device))
    return {k: v for k, v in sd.items() if not k.startswith("optimizer.")}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_peer(path, device="cpu"):
    """``(net, metadata)``: the peer of an engine model file with its weights, in eval mode."""
    meta = read_metadata(path)
    net = build_peer(meta)
    net.load_state_dict(engine_state_dict(path), strict=True)
    return net.to(device).eval(), meta


def build_peer(meta: dict) -> nn.Module:
    """The PyTorch peer of an engine model, from its metadata (``lumos info --json`` or
    ``lumos.Model(path).metadata``)."""
    kind = meta["kind"]
    arch = meta["architecture"]
    c_in = len(meta["input_channels"])
    k = len(meta["classes"])
    if kind == "unet":
        return UNet(arch, c_in, k)
    if kind == "dmqpm":
        return DmQpmNet(arch, k)
    if kind == "musplit":
        return MuSplitNet(arch, k)
    if kind == "pgdiff":
        return PgDiffNet(arch, c_in, k)
    raise ValueError(f"unknown model kind {kind!r}")


# ---------------------------------------------------------------------------------------
# Normalization (src/normalize.rs): y = (clamp(x, lo, hi) - mean) / std per channel


def _safe_std(s: float) -> float:
    return s if (math.isfinite(s) and s > 1e-8) else 1.0


def channel_affines(norm: dict, frame: np.ndarray):
    """Per channel (lo, hi, mean, std) for a (C, H, W) frame, as Normalizer::resolve."""
    out = []
    for ch, c in enumerate(norm["channels"]):
        m = c["method"]
        if m == "per_image_zscore":
            v = frame[ch].astype(np.float64)
            out.append((-np.inf, np.inf, np.float32(v.mean()), np.float32(_safe_std(float(v.std())))))
        elif m == "dataset_zscore":
            out.append((-np.inf, np.inf, np.float32(c["mean"]), np.float32(c["std"])))
        elif m == "robust_quantile":
            out.append((np.float32(c["lo"]), np.float32(c["hi"]), np.float32(c["mean"]), np.float32(c["std"])))
        else:
            raise ValueError(f"unknown normalization {m!r}")
    return out


def normalize(frame: np.ndarray, norm: dict) -> torch.Tensor:
    """(C, H, W) float32 frame -> normalized (C, H, W) tensor, as apply_affine."""
    x = torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))
    aff = channel_affines(norm, frame)
    col = lambda i: torch.tensor([a[i] for a in aff], dtype=torch.float32).view(-1, 1, 1)
    return (x.maximum(col(0)).minimum(col(1)) - col(2)) / col(3)


# ---------------------------------------------------------------------------------------
# nnU-Net blocks (src/nn/blocks.rs)


def stage_features(base: int, mx: int, n: int) -> List[int]:
    return [min(base << s, mx) for s in range(n)]


class InstanceNorm(nn.Module):
    """InstanceNorm2d(eps 1e-5, affine), no running statistics. Calls the aten op directly
    (as tch does), so 1x1 maps are allowed (F.instance_norm refuses them)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return torch.instance_norm(x, self.weight, self.bias, None, None, True, 0.1, 1e-5, False)


class ConvNormAct(nn.Module):
    """conv k x k ("same" padding) -> InstanceNorm -> LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
        self.norm = InstanceNorm(cout)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), 0.01)


class StackedConvs(nn.Module):
    """``n`` blocks (ConvNormAct, or ``block``), the first with the stride."""

    def __init__(self, cin: int, cout: int, n: int, stride: int, block=None):
        super().__init__()
        block = block or ConvNormAct
        self.convs = nn.ModuleList([block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        for c in self.convs:
            x = c(x)
        return x


class Encoder(nn.Module):
    """Stages ``first_stage..``; stride 1 only for global stage 0."""

    def __init__(self, cin: int, features: Sequence[int], convs_per_stage: int, first_stage: int = 0):
        super().__init__()
        stages, c = [], cin
        for i, f in enumerate(features):
            stages.append(StackedConvs(c, f, convs_per_stage, 1 if first_stage + i == 0 else 2))
            c = f
        self.stages = nn.ModuleList(stages)

    def forward(self, x) -> List[torch.Tensor]:
        skips = []
        for s in self.stages:
            x = s(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, features: Sequence[int], skip_features: Sequence[int], n_classes: int, convs_per_stage: int):
        super().__init__()
        n = len(features)
        tc, st, sl = [], [], []
        for i in range(n - 1):
            below, target, skip = features[n - 1 - i], features[n - 2 - i], skip_features[n - 2 - i]
            tc.append(nn.ConvTranspose2d(below, target, 2, stride=2))
            st.append(StackedConvs(target + skip, target, convs_per_stage, 1))
            sl.append(nn.Conv2d(target, n_classes, 1))
        self.transpconvs = nn.ModuleList(tc)
        self.stages = nn.ModuleList(st)
        self.seg_layers = nn.ModuleList(sl)

    def forward(self, skips: List[torch.Tensor], deep_supervision: bool = False) -> List[torch.Tensor]:
        n = len(skips)
        x = skips[-1]
        outs = []
        for i in range(len(self.stages)):
            up = self.transpconvs[i](x)
            x = self.stages[i](torch.cat([up, skips[n - 2 - i]], 1))
            if deep_supervision or i == len(self.stages) - 1:
                outs.append(self.seg_layers[i](x))
        return outs[::-1]


class UNet(nn.Module):
    """src/nn/unet.rs (model kind ``unet``): (N, C, H, W) -> logits (N, K, H, W)."""

    def __init__(self, arch: dict, in_channels: int, n_classes: int):
        super().__init__()
        a = {"n_stages": 6, "base_features": 32, "max_features": 512, "convs_per_stage": 2, **arch}
        f = stage_features(a["base_features"], a["max_features"], a["n_stages"])
        self.encoder = Encoder(in_channels, f, a["convs_per_stage"], 0)
        self.decoder = Decoder(f, f, n_classes, a["convs_per_stage"])

    def forward(self, x, deep_supervision: bool = False):
        outs = self.decoder(self.encoder(x), deep_supervision)
        return outs if deep_supervision else outs[0]


# ---------------------------------------------------------------------------------------
# DM-QPMNet (src/nn/dmqpm.rs)

DMQPM_DEFAULTS = {
    "variant": "dual", "channels": [0, 1, 2, 3, 4], "n_stages": 5, "base_features": 32, "max_features": 512,
    "convs_per_stage": 2, "fusion_stage": 2, "fusion": "attention", "bidirectional": False, "heads": 8,
    "fusion_width": 0, "mlp_ratio": 2,
}


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, q, kv):
        n, lq, d = q.shape
        lk = kv.shape[1]
        h = self.heads
        split = lambda t, l: t.view(n, l, h, d // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q_proj(q), lq), split(self.k_proj(kv), lk),
                                           split(self.v_proj(kv), lk))
        return self.out_proj(o.transpose(1, 2).reshape(n, lq, d))


class _Mlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Fusion(nn.Module):
    """(a, p) both (N, F, h, w) -> (N, F, h, w)."""

    def __init__(self, cfg: dict, f: int, width: int):
        super().__init__()
        self.op = cfg["fusion"]
        if self.op == "concat":
            self.concat = ConvNormAct(2 * f, f, 1, k=1)
            return
        d = width
        self.proj_a = nn.Conv2d(f, d, 1)
        self.proj_p = nn.Conv2d(f, d, 1)
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.attn = CrossAttention(d, cfg["heads"])
        self.bidirectional = bool(cfg["bidirectional"])
        if self.bidirectional:
            self.norm_q_rev = nn.LayerNorm(d)
            self.norm_kv_rev = nn.LayerNorm(d)
            self.attn_rev = CrossAttention(d, cfg["heads"])
            self.merge = nn.Linear(2 * d, d)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = _Mlp(d, d * cfg["mlp_ratio"])
        self.proj_out = nn.Conv2d(d, f, 1) if d != f else None

    def forward(self, a, ph):
        if self.op == "concat":
            return self.concat(torch.cat([a, ph], 1))
        n, _, h, w = a.shape
        tokens = lambda t: t.flatten(2, 3).transpose(1, 2)
        ta = tokens(self.proj_a(a))
        tp = tokens(self.proj_p(ph))
        t = ta + self.attn(self.norm_q(ta), self.norm_kv(tp))
        if self.bidirectional:
            tr = tp + self.attn_rev(self.norm_q_rev(tp), self.norm_kv_rev(ta))
            t = self.merge(torch.cat([t, tr], 2))
        t = t + self.mlp(self.norm_mlp(t))
        y = t.transpose(1, 2).reshape(n, t.shape[2], h, w)
        return self.proj_out(y) if self.proj_out is not None else y


class DmQpmNet(nn.Module):
    """Model kind ``dmqpm``: DM-QPMNet (``variant: dual``) or a baseline nnU-Net on a channel
    selection (``variant: early_fusion``). Input always (N, 5, H, W): I0, I45, I90, I135, phase."""

    def __init__(self, arch: dict, n_classes: int):
        super().__init__()
        cfg = {**DMQPM_DEFAULTS, **arch}
        self.cfg = cfg
        f = stage_features(cfg["base_features"], cfg["max_features"], cfg["n_stages"])
        cps = cfg["convs_per_stage"]
        self.variant = cfg["variant"]
        if self.variant == "early_fusion":
            ch = list(cfg["channels"])
            self.register_buffer("select", torch.tensor(ch, dtype=torch.int64), persistent=False)
            self.select_all = ch == [0, 1, 2, 3, 4]
            self.encoder = Encoder(len(ch), f, cps, 0)
            self.decoder = Decoder(f, f, n_classes, cps)
        elif self.variant == "dual":
            k = cfg["fusion_stage"]
            width = cfg["fusion_width"] if cfg["fusion_width"] > 0 else f[min(k, cfg["n_stages"] - 1)]
            self.enc_angles = Encoder(4, f[: k + 1], cps, 0)
            self.enc_phase = Encoder(1, f[: k + 1], cps, 0)
            self.skip_compress = nn.ModuleList([ConvNormAct(2 * f[s], f[s], 1, k=1) for s in range(k)])
            self.fusion = Fusion(cfg, f[k], width)
            self.tail = Encoder(f[k], f[k + 1:], cps, k + 1)
            self.decoder = Decoder(f, f, n_classes, cps)
        else:
            raise ValueError(f"unknown dmqpm variant {self.variant!r}")

    def forward(self, x, deep_supervision: bool = False):
        if self.variant == "early_fusion":
            xi = x if self.select_all else x.index_select(1, self.select)
            outs = self.decoder(self.encoder(xi), deep_supervision)
        else:
            a = self.enc_angles(x.narrow(1, 0, 4))
            p = self.enc_phase(x.narrow(1, 4, 1))
            k = len(self.skip_compress)
            skips = [self.skip_compress[s](torch.cat([a[s], p[s]], 1)) for s in range(k)]
            fused = self.fusion(a[k], p[k])
            skips.append(fused)
            skips.extend(self.tail(fused))
            outs = self.decoder(skips, deep_supervision)
        return outs if deep_supervision else outs[0]


# ---------------------------------------------------------------------------------------
# nnU-Net from dynamic_network_architectures (the public reference implementation)


def dna_plainconvunet(meta: dict, deep_supervision: bool = False) -> nn.Module:
    """dynamic_network_architectures' PlainConvUNet configured as the engine's nnU-Net of a
    ``unet`` model, or of a ``dmqpm`` ``early_fusion`` baseline (input = its channel
    selection). conv 3x3 with bias, InstanceNorm2d(eps 1e-5, affine), LeakyReLU(0.01),
    strided-conv downsampling, transposed-conv upsampling, a 1x1 head per decoder stage."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    arch = meta["architecture"]
    if meta["kind"] == "unet":
        a = {"n_stages": 6, "base_features": 32, "max_features": 512, "convs_per_stage": 2, **arch}
        c_in = len(meta["input_channels"])
    elif meta["kind"] == "dmqpm" and {**DMQPM_DEFAULTS, **arch}["variant"] == "early_fusion":
        a = {**DMQPM_DEFAULTS, **arch}
        c_in = len(a["channels"])
    else:
        raise ValueError("PlainConvUNet has the shape of 'unet' models and 'dmqpm' early_fusion baselines only")
    n = a["n_stages"]
    return PlainConvUNet(
        input_channels=c_in, n_stages=n,
        features_per_stage=stage_features(a["base_features"], a["max_features"], n),
        conv_op=nn.Conv2d, kernel_sizes=3, strides=[1] + [2] * (n - 1),
        n_conv_per_stage=a["convs_per_stage"], num_classes=len(meta["classes"]),
        n_conv_per_stage_decoder=a["convs_per_stage"], conv_bias=True,
        norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True},
        deep_supervision=deep_supervision)


def dna_key_to_engine(key: str) -> str:
    """PlainConvUNet state_dict key -> the engine's name of the same tensor."""
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    parts = key.split(".")
    if parts[0] == "encoder" and parts[1] == "stages":
        del parts[3]  # encoder.stages.S.0.convs... (each stage is a Sequential)
    key = ".".join(parts)
    return key.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")


def load_engine_into_dna(dna: nn.Module, engine_sd: Dict[str, torch.Tensor]) -> None:
    """Copies engine weights (``unet`` or early-fusion ``dmqpm``) into a PlainConvUNet, strictly:
    every PlainConvUNet tensor gets an engine tensor and every engine tensor is used."""
    own = dna.state_dict()
    mapped = {k: engine_sd[dna_key_to_engine(k)] for k in own}
    unused = set(engine_sd) - {dna_key_to_engine(k) for k in own}
    if unused:
        raise KeyError(f"engine tensors without a PlainConvUNet counterpart: {sorted(unused)[:5]}")
    dna.load_state_dict(mapped, strict=True)


# ---------------------------------------------------------------------------------------
# muSplit (src/nn/musplit.rs, src/lc.rs, src/split.rs)

MUSPLIT_DEFAULTS = {
    "variant": "unet", "levels": 5, "lc_levels": 4, "lc_merge": "regular", "base_channels": 32,
    "max_channels": 256, "z_dim": 128, "stochastic": True, "dropout": 0.1,
    # model files written before the key existed hold InstanceNorm U-Nets
    # (MuSplitConfig::from_model_architecture)
    "unet_norm": "instance",
}


class BatchNorm(nn.Module):
    """tch's BatchNorm2d (eps 1e-5, momentum 0.1): weight, bias, running_mean, running_var
    (no num_batches_tracked, which the engine does not store)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


class ConvBnAct(nn.Module):
    """conv 3x3 without bias -> BatchNorm -> LeakyReLU(0.01) (the LC U-Net's block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = BatchNorm(cout)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), 0.01, inplace=True)


def conv_stack(cfg: dict, cin: int, cout: int, n: int, stride: int) -> nn.Module:
    """The LC U-Net's conv blocks with its configured normalization (musplit.rs Unit::conv_stack)."""
    return StackedConvs(cin, cout, n, stride, ConvBnAct if cfg["unet_norm"] == "batch" else None)


class ResGated(nn.Module):
    """LadderVAE gated residual block: BN-ELU-conv-dropout-BN-ELU-conv, 1x1 gate a*sigmoid(b), + x."""

    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.bn1 = BatchNorm(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = BatchNorm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.gate = nn.Conv2d(c, 2 * c, 1)
        self.p = dropout

    def forward(self, x):
        y = self.conv1(F.elu(self.bn1(x)))
        y = F.dropout(y, self.p, self.training)
        y = self.conv2(F.elu(self.bn2(y)))
        a, b = self.gate(y).chunk(2, 1)
        return x + a * torch.sigmoid(b)


class _Stem(nn.Module):
    def __init__(self, cfg: dict, c: int):
        super().__init__()
        if cfg["variant"] == "unet":
            self.conv = None
            self.block = conv_stack(cfg, 1, c, 2, 1)
        else:
            self.conv = nn.Conv2d(1, c, 5, padding=2)
            self.block = ResGated(c, cfg["dropout"])

    def forward(self, x):
        return self.block(F.elu(self.conv(x)) if self.conv is not None else x)


class _Down(nn.Module):
    """HVAE down-block: strided conv + ELU + gated block (the U-Net's is a StackedConvs)."""

    def __init__(self, cin: int, c: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, stride=2, padding=1)
        self.block = ResGated(c, dropout)

    def forward(self, x):
        return self.block(F.elu(self.conv(x)))


class _Merge(nn.Module):
    def __init__(self, cfg: dict, c: int):
        super().__init__()
        self.stem = _Stem(cfg, c)
        self.proj = nn.Conv2d(2 * c, c, 1)
        self.block = conv_stack(cfg, c, c, 1, 1) if cfg["variant"] == "unet" else ResGated(c, cfg["dropout"])


def centre_crop(x, size: int):
    h, w = x.shape[2], x.shape[3]
    if h == size and w == size:
        return x
    return x.narrow(2, (h - size) // 2, size).narrow(3, (w - size) // 2, size)


def centre_pad(x, size: int):
    ph, pw = size - x.shape[2], size - x.shape[3]
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def upsample2(x):
    return F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False)


class LcEncoder(nn.Module):
    def __init__(self, cfg: dict, chans):
        super().__init__()
        self.mode = cfg["lc_merge"]
        self.stem = _Stem(cfg, chans(0))
        down, lc = [], []
        for k in range(1, cfg["levels"]):
            cin, c = chans(k - 1), chans(k)
            down.append(conv_stack(cfg, cin, c, 2, 2) if cfg["variant"] == "unet" else _Down(cin, c, cfg["dropout"]))
            if k <= cfg["lc_levels"]:
                lc.append(_Merge(cfg, c))
        self.down = nn.ModuleList(down)
        self.lc = nn.ModuleList(lc)

    def forward(self, x) -> List[torch.Tensor]:
        t = x.shape[2]
        y = self.stem(x.narrow(1, 0, 1))
        out = [y]
        for i, d in enumerate(self.down):
            k = i + 1
            y = d(y)
            if k - 1 < len(self.lc):
                m = self.lc[k - 1]
                lc = m.stem(x.narrow(1, k, 1))
                if self.mode == "regular":
                    a, b = centre_pad(y, lc.shape[2]), lc
                else:
                    a, b = y, centre_crop(lc, y.shape[2])
                y = m.block(m.proj(torch.cat([a, b], 1)))
            out.append(centre_crop(y, t >> k))
        return out


class _UnetDecoder(nn.Module):
    def __init__(self, cfg: dict, chans, n_out: int):
        super().__init__()
        l = cfg["levels"]
        self.stages = nn.ModuleList(
            [conv_stack(cfg, chans(l - 1 - i) + chans(l - 2 - i), chans(l - 2 - i), 2, 1) for i in range(l - 1)])
        self.head = nn.Conv2d(chans(0), n_out, 1)


class _TdLayer(nn.Module):
    def __init__(self, c: int, z: int, top: bool, dropout: float):
        super().__init__()
        self.prior = None if top else nn.Conv2d(c, 2 * z, 3, padding=1)
        self.posterior = nn.Conv2d(c if top else 2 * c, 2 * z, 3, padding=1)
        self.z_proj = nn.Conv2d(z, c, 1)
        self.mix = nn.Conv2d(c if top else 2 * c, c, 1)
        self.block = ResGated(c, dropout)


class _Ladder(nn.Module):
    def __init__(self, cfg: dict, n_out: int):
        super().__init__()
        l, c, z = cfg["levels"], cfg["base_channels"], cfg["z_dim"]
        self.top_prior = nn.Parameter(torch.zeros(1, 2 * z, 1, 1))
        self.layers = nn.ModuleList([_TdLayer(c, z, i == 0, cfg["dropout"]) for i in range(l - 1)])
        self.up = nn.ModuleList([ResGated(c, cfg["dropout"]) for _ in range(l - 1)])
        self.final = ResGated(c, cfg["dropout"])
        self.head = nn.Conv2d(c, 2 * n_out, 1)


LV_BOUND = 6.0


def soft_bound(lv):
    return torch.tanh(lv / LV_BOUND) * LV_BOUND


def soft_floor(lv):
    return F.softplus(lv + 5.0) - 5.0


def gaussian_kl(mu_q, lv_q, mu_p, lv_p):
    return ((lv_p - lv_q) + (lv_q.exp() + (mu_q - mu_p).square()) / lv_p.exp() - 1.0) * 0.5


class MuSplitNet(nn.Module):
    """Model kind ``musplit``: the LC U-Net (``variant: unet``) or the LC LadderVAE
    (``variant: hvae``; ``stochastic: false`` = HAE). Input (N, 1 + lc_levels, T, T);
    ``forward`` returns the predicted mean (N, 2, T, T) in normalized target units and
    ``forward_full`` also the log-variance and KL (HVAE)."""

    def __init__(self, arch: dict, n_out: int = 2):
        super().__init__()
        cfg = {**MUSPLIT_DEFAULTS, **arch}
        self.cfg = cfg
        if cfg["variant"] == "unet":
            chans = lambda k: min(cfg["base_channels"] << k, cfg["max_channels"])
        else:
            chans = lambda k: cfg["base_channels"]
        self.encoder = LcEncoder(cfg, chans)
        if cfg["variant"] == "unet":
            self.decoder = _UnetDecoder(cfg, chans, n_out)
        else:
            self.top_down = _Ladder(cfg, n_out)
        self.stochastic = cfg["variant"] == "hvae" and bool(cfg["stochastic"])

    @property
    def input_channels(self) -> int:
        return 1 + self.cfg["lc_levels"]

    @property
    def divisor(self) -> int:
        return 1 << (self.cfg["levels"] - 1)

    def forward(self, x):
        return self.forward_full(x)[0]

    def forward_full(self, x):
        feats = self.encoder(x)
        if self.cfg["variant"] == "unet":
            d = self.decoder
            n = len(feats)
            g = feats[-1]
            for i, st in enumerate(d.stages):
                g = st(torch.cat([upsample2(g), feats[n - 2 - i]], 1))
            return d.head(g), None, None
        d = self.top_down
        n = len(feats)
        h = None
        kls = []
        for i, layer in enumerate(d.layers):
            bu = feats[n - 1 - i]
            if h is None:
                q_in, p_params = bu, d.top_prior
            else:
                q_in, p_params = torch.cat([h, bu], 1), layer.prior(h)
            mu_q, lv_q = layer.posterior(q_in).chunk(2, 1)
            lv_q = soft_bound(lv_q)
            if self.stochastic:
                mu_p, lv_p = p_params.chunk(2, 1)
                kl = gaussian_kl(mu_q, lv_q, mu_p, soft_bound(lv_p))
                kls.append((kl.sum(dim=(1, 2, 3)) / (kl.shape[1] * kl.shape[2] * kl.shape[3])).mean())
                # libtorch's generator: same seed and draw order as the engine (NCHW order, whatever
                # the memory layout; float32, whatever the precision), same samples
                z = mu_q + (lv_q * 0.5).exp() * torch.randn(mu_q.shape, dtype=torch.float32, device=mu_q.device)
            else:
                z = mu_q
            zf = layer.z_proj(z)
            mixed = layer.mix(zf) if h is None else layer.mix(torch.cat([h, zf], 1))
            out = layer.block(mixed)
            h = d.up[i](upsample2(out))
        y = d.final(h)
        mean, lv = d.head(y).chunk(2, 1)
        kl = torch.stack(kls).mean() if kls else None
        return mean, soft_floor(lv), kl

    @torch.no_grad()
    def decompose(self, frame: np.ndarray, meta: dict, tile: Optional[int] = None, keep: Optional[int] = None,
                  batch_size: int = 16, samples: int = 1, seed: int = 0) -> np.ndarray:
        """``Model::decompose`` (src/split.rs) without mirroring: (H, W) raw frame -> (2, H, W)
        in target units, with the engine's inner-padding tiling (tiles centred on a grid of
        ``keep`` cells, centre kept, no blending), the same batches of tiles, and for the
        HVAE ``samples`` posterior samples per batch from ``torch.manual_seed(seed)``."""
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        h, w = frame.shape
        t = tile or meta["patch_size"][0]
        kp = keep or t // 2
        lo, hi, mean, std = channel_affines(meta["normalization"], frame[None])[0]
        src = (torch.from_numpy(frame).maximum(torch.tensor(lo, dtype=torch.float32))
               .minimum(torch.tensor(hi, dtype=torch.float32)) - torch.tensor(mean)) / torch.tensor(std)
        tn = meta["target_normalization"]["channels"]
        k = len(tn)
        # per_image_zscore targets map back with (0, 1), as split.rs mean_std_of
        mean_t = torch.tensor([c.get("mean", 0.0) for c in tn], dtype=torch.float32).view(1, k, 1, 1)
        std_t = torch.tensor([c.get("std", 1.0) for c in tn], dtype=torch.float32).view(1, k, 1, 1)
        levels = self.input_channels
        dev = next(self.parameters()).device
        mean_t, std_t = mean_t.to(dev), std_t.to(dev)
        if self.stochastic:
            torch.manual_seed(seed)
        n_samples = samples if self.stochastic else 1
        out = np.zeros((k, h, w), dtype=np.float32)
        rows, cols = -(-h // kp), -(-w // kp)
        centres = [j * kp + kp // 2 for j in range(cols)]
        margin = (t - kp) // 2
        for i in range(rows):
            cy = i * kp + kp // 2
            n_rows = min(h - i * kp, kp)
            for c0 in range(0, cols, batch_size):
                chunk = centres[c0:c0 + batch_size]
                x = torch.stack([lc_crops(src, cy, cx, t, levels) for cx in chunk], 0).to(dev)
                acc = self.forward(x)
                for _ in range(1, n_samples):
                    acc = acc + self.forward(x)
                p = (acc / n_samples) * std_t + mean_t
                centre = p[:, :, margin:margin + kp, margin:margin + kp]
                block = centre.permute(1, 2, 0, 3).reshape(k, kp, -1)
                col0 = chunk[0] - kp // 2
                n_cols = min(w - col0, len(chunk) * kp)
                out[:, i * kp:i * kp + n_rows, col0:col0 + n_cols] = block[:, :n_rows, :n_cols].cpu().numpy()
        return out


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    m = np.mod(i, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def lc_crops(src: torch.Tensor, cy: int, cx: int, tile: int, levels: int) -> torch.Tensor:
    """src/lc.rs ``crops``: level k = the (2^k T)^2 region centred at (cy, cx), mirrored
    (half-sample symmetric) outside the frame, average-pooled by 2^k -> (levels, T, T)."""
    hgt, wid = src.shape
    out = []
    for k in range(levels):
        hk, f = (tile << k) // 2, 1 << k
        rows = torch.from_numpy(_reflect(np.arange(cy - hk, cy + hk), hgt))
        cols = torch.from_numpy(_reflect(np.arange(cx - hk, cx + hk), wid))
        g = src.index_select(0, rows).index_select(1, cols)
        out.append(g if f == 1 else F.avg_pool2d(g[None, None], f, f)[0, 0])
    return torch.stack(out, 0)


# ---------------------------------------------------------------------------------------
# Latent diffusion (src/nn/ldm.rs)


class AttnBlock(nn.Module):
    """First-stage single-head spatial self-attention (1x1 conv q, k, v, proj_out)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        hn = self.norm(x)
        tok = lambda t: t.view(n, 1, c, h * w).transpose(2, 3)
        a = F.scaled_dot_product_attention(tok(self.q(hn)), tok(self.k(hn)), tok(self.v(hn)))
        return x + self.proj_out(a.transpose(2, 3).reshape(n, c, h, w))


class AeResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class _Mid(nn.Module):
    def __init__(self, c: int, g: int):
        super().__init__()
        self.block_1 = AeResBlock(c, c, g)
        self.attn_1 = AttnBlock(c, g)
        self.block_2 = AeResBlock(c, c, g)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Resample(nn.Module):
    def __init__(self, c: int, down: bool):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0) if down else nn.Conv2d(c, c, 3, padding=1)


class _Level(nn.Module):
    def __init__(self, blocks, resample_name: Optional[str], c: int):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample_name == "downsample":
            self.downsample = _Resample(c, True)
        elif resample_name == "upsample":
            self.upsample = _Resample(c, False)


class _AeEncoder(nn.Module):
    pass


class _AeDecoder(nn.Module):
    pass


AE_DEFAULTS = {"ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "z_channels": 3, "groups": 32}


class Autoencoder(nn.Module):
    """The KL-regularized f-N first stage; ``encode`` returns the posterior (mean, logvar)."""

    def __init__(self, arch: dict, in_channels: int):
        super().__init__()
        cfg = {**AE_DEFAULTS, **arch}
        g, ch, mult, nrb, z = cfg["groups"], cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["z_channels"]
        n = len(mult)
        self.z = z
        e = _AeEncoder()
        e.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        down, block_in = [], ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(nrb):
                blocks.append(AeResBlock(block_in, ch * m, g))
                block_in = ch * m
            down.append(_Level(blocks, "downsample" if i + 1 != n else None, block_in))
        e.down = nn.ModuleList(down)
        e.mid = _Mid(block_in, g)
        e.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        e.conv_out = nn.Conv2d(block_in, 2 * z, 3, padding=1)
        self.encoder = e
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        d = _AeDecoder()
        block_in = ch * mult[-1]
        d.conv_in = nn.Conv2d(z, block_in, 3, padding=1)
        d.mid = _Mid(block_in, g)
        up = [None] * n
        for i in reversed(range(n)):
            blocks = []
            for _ in range(nrb + 1):
                blocks.append(AeResBlock(block_in, ch * mult[i], g))
                block_in = ch * mult[i]
            up[i] = _Level(blocks, "upsample" if i != 0 else None, block_in)
        d.up = nn.ModuleList(up)
        d.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        d.conv_out = nn.Conv2d(block_in, in_channels, 3, padding=1)
        self.decoder = d

    def encode(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for lvl in e.down:
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = e.mid(h)
        moments = self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))
        mean, logvar = moments.split(self.z, 1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z))
        h = d.mid(h)
        for lvl in reversed(d.up):
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(F.interpolate(h, size=(h.shape[2] * 2, h.shape[3] * 2), mode="nearest"))
        return d.conv_out(F.silu(d.norm_out(h)))

    def forward(self, x):
        return self.decode(self.encode(x)[0])


def timestep_embedding(t, dim: int):
    half = dim // 2
    freqs = (torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half)).exp()
    args = t.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    e = torch.cat([args.cos(), args.sin()], 1)
    return F.pad(e, (0, 1)) if dim % 2 == 1 else e


class ResBlock(nn.Module):
    """openaimodel ResBlock: in_layers (GN, SiLU, conv), emb_layers (SiLU, Linear),
    out_layers (GN, SiLU, dropout, conv), skip_connection (1x1) when widths differ."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin, eps=1e-5), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout, eps=1e-5), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).unsqueeze(-1).unsqueeze(-1)
        h = self.out_layers(h)
        return (self.skip_connection(x) if self.skip_connection is not None else x) + h


class MhAttention(nn.Module):
    """openaimodel AttentionBlock, legacy head layout (qkv grouped per head as [q, k, v])."""

    def __init__(self, c: int, groups: int, head_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-5)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)
        self.heads = c // head_channels

    def forward(self, x, emb=None):
        n, c, h, w = x.shape
        t = h * w
        d = c // self.heads
        qkv = self.qkv(self.norm(x).view(n, c, t)).reshape(n * self.heads, 3 * d, t)
        q, k, v = (p.transpose(1, 2) for p in qkv.split(d, 1))
        a = F.scaled_dot_product_attention(q, k, v)
        a = self.proj_out(a.transpose(1, 2).reshape(n, c, t))
        return x + a.view(n, c, h, w)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="nearest"))


class _InConv(nn.Conv2d):
    def forward(self, x, emb=None):
        return super().forward(x)


class TimestepBlock(nn.ModuleList):
    def forward(self, x, emb):
        for l in self:
            x = l(x, emb)
        return x


UNET_DEFAULTS = {"model_channels": 128, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 2,
                 "attention_resolutions": [4, 2, 1], "num_head_channels": 32, "dropout": 0.0, "groups": 32}
LDM_P_PAPER = {**UNET_DEFAULTS, "model_channels": 224, "attention_resolutions": [8, 4, 2]}


class DiffusionUnet(nn.Module):
    """openaimodel.UNetModel as the engine builds it: (N, in, H, W), t (N,) -> (N, out, H, W)."""

    def __init__(self, arch: dict, in_channels: int, out_channels: int):
        super().__init__()
        cfg = {**UNET_DEFAULTS, **arch}
        mc, g, nrb = cfg["model_channels"], cfg["groups"], cfg["num_res_blocks"]
        hc, p, att = cfg["num_head_channels"], cfg["dropout"], cfg["attention_resolutions"]
        emb = 4 * mc
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        blocks = [TimestepBlock([_InConv(in_channels, mc, 3, padding=1)])]
        chans, ch, ds = [mc], mc, 1
        mult = cfg["channel_mult"]
        for level, m in enumerate(mult):
            for _ in range(nrb):
                layers = [ResBlock(ch, m * mc, emb, g, p)]
                ch = m * mc
                if ds in att:
                    layers.append(MhAttention(ch, g, hc))
                blocks.append(TimestepBlock(layers))
                chans.append(ch)
            if level + 1 != len(mult):
                blocks.append(TimestepBlock([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepBlock([ResBlock(ch, ch, emb, g, p), MhAttention(ch, g, hc), ResBlock(ch, ch, emb, g, p)])
        out_blocks = []
        for level in reversed(range(len(mult))):
            m = mult[level]
            for i in range(nrb + 1):
                skip = chans.pop()
                layers = [ResBlock(ch + skip, mc * m, emb, g, p)]
                ch = mc * m
                if ds in att:
                    layers.append(MhAttention(ch, g, hc))
                if level > 0 and i == nrb:
                    layers.append(Upsample(ch))
                    ds //= 2
                out_blocks.append(TimestepBlock(layers))
        self.output_blocks = nn.ModuleList(out_blocks)
        self.out = nn.Sequential(nn.GroupNorm(g, ch, eps=1e-5), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        hs = []
        h = x
        for blk in self.input_blocks:
            h = blk(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------------------
# PG-DiffSeg (src/diffseg.rs, src/ddim.rs)

SAMPLING_DEFAULTS = {"start": "prior", "inversion_steps": 100, "sampling_steps": 200, "eta": 0.0, "samples": 1,
                     "forward_t": 300, "seed": 0, "clip_denoised": True}


def linear_schedule(steps: int, beta_start: float, beta_end: float) -> List[float]:
    """alphas_cumprod of LDM's "linear" schedule, in float64 as the engine."""
    a, b = math.sqrt(beta_start), math.sqrt(beta_end)
    acc, out = 1.0, []
    for i in range(steps):
        beta = (a + (b - a) * i / (steps - 1)) ** 2
        acc *= 1.0 - beta
        out.append(acc)
    return out


def ddim_timesteps(T: int, n: int) -> List[int]:
    c = T // n
    return [i * c + 1 for i in range(n)]


class PgDiffNet(nn.Module):
    """Model kind ``pgdiff``: autoencoder ``ae``, LDM-P ``ldm_p`` (unconditional, image
    latents) and LDM-S ``ldm_s`` (mask latents | image latent); ``latent_scale`` is a buffer.
    ``predict`` is the deterministic PG-DiffSeg pipeline (eta = 0; prior or forward-0 start)."""

    def __init__(self, arch: dict, in_channels: int, n_classes: int):
        super().__init__()
        ae = arch.get("autoencoder", {})
        z = {**AE_DEFAULTS, **ae}["z_channels"]
        self.ae = Autoencoder(ae, in_channels)
        # as serde fills the engine's PgDiffConfig: a missing ldm_p section is the paper's
        # LDM-P; missing fields inside a section come from DiffusionUnetConfig::default (LDM-S)
        self.ldm_p = DiffusionUnet(arch.get("ldm_p", LDM_P_PAPER), z, z)
        self.ldm_s = DiffusionUnet(arch.get("ldm_s", {}), n_classes + z, n_classes)
        self.register_buffer("latent_scale", torch.ones(1))
        self.n_classes = n_classes
        self.alphas_cumprod = linear_schedule(arch.get("timesteps", 1000), arch.get("beta_start", 0.0015),
                                              arch.get("beta_end", 0.0195))
        self.sampling = {**SAMPLING_DEFAULTS, **arch.get("sampling", {})}

    def encode(self, x):
        return self.ae.encode(x)[0] * self.latent_scale

    def _t(self, t: int, n: int, device):
        return torch.full((n,), t, dtype=torch.int64, device=device)

    def eps_p(self, x, t: int):
        return self.ldm_p(x, self._t(t, x.shape[0], x.device))

    def eps_s(self, x, z, t: int):
        return self.ldm_s(torch.cat([x, z], 1), self._t(t, x.shape[0], x.device))

    def invert(self, x0, steps: int):
        ab = self.alphas_cumprod
        ts = ddim_timesteps(len(ab), steps)
        x = x0
        for i in range(len(ts)):
            a_cur = ab[ts[i - 1]] if i > 0 else ab[0]
            a_next = ab[ts[i]]
            eps = self.eps_p(x, ts[i])
            x0_hat = (x - eps * math.sqrt(1.0 - a_cur)) / math.sqrt(a_cur)
            x = x0_hat * math.sqrt(a_next) + eps * math.sqrt(1.0 - a_next)
        return x

    def sample(self, noise, z, steps: int, clip: bool):
        ab = self.alphas_cumprod
        ts = ddim_timesteps(len(ab), steps)
        x = noise
        for i in reversed(range(len(ts))):
            t = ts[i]
            a_t = ab[t]
            a_prev = ab[ts[i - 1]] if i > 0 else ab[0]
            e = self.eps_s(x, z, t)
            if clip:
                x0 = ((x - e * math.sqrt(1.0 - a_t)) / math.sqrt(a_t)).clamp(-1.0, 1.0)
                e = (x - x0 * math.sqrt(a_t)) / math.sqrt(1.0 - a_t)
            x0 = (x - e * math.sqrt(1.0 - a_t)) / math.sqrt(a_t)
            d = e * math.sqrt(max(1.0 - a_prev, 0.0))  # eta = 0: sigma = 0
            x = x0 * math.sqrt(a_prev) + d
        return x

    @torch.no_grad()
    def predict(self, x, opts: Optional[dict] = None):
        """Normalized tiles (N, C, T, T) -> class scores (N, K, T, T), as PgDiffNet::predict
        with one sample and eta = 0."""
        o = {**self.sampling, **(opts or {})}
        if o["eta"] != 0 or o["samples"] != 1 or o["start"] == "random" or (o["start"] == "forward" and o["forward_t"] != 0):
            raise ValueError("only the deterministic pipeline is transcribed: eta 0, one sample, "
                                      "prior start or forward start at t = 0")
        n, _, th, tw = x.shape
        z = self.encode(x)
        _, _, h, w = z.shape
        k = self.n_classes
        src = self.invert(z, o["inversion_steps"]) if o["start"] == "prior" else z
        noise = src.mean(1, keepdim=True).expand(n, k, h, w).contiguous()
        y = self.sample(noise, z, o["sampling_steps"], o["clip_denoised"])
        up = F.interpolate(y, size=(th, tw), mode="bilinear", align_corners=False)
        p = ((up + 1.0) * 0.5).clamp(0.0, 1.0)
        return p / (p.sum(1, keepdim=True) + 1e-6)

    def forward(self, x):
        return self.predict(x)
