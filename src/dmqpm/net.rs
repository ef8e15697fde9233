//! DM-QPMNet (arXiv 2511.00218): dual-modality fusion nnU-Net for single-shot QPM.
//!
//! Input `(N, 5, H, W)`: the four polarized intensities (0, 45, 90, 135 degrees) then the
//! phase map. In the `dual` variant (the paper), the angles and the phase go through
//! separate nnU-Net encoders for stages `0..=fusion_stage`; at the fusion stage a fusion
//! block merges them (multi-head attention with angle tokens as queries and phase tokens
//! as keys and values, residual and MLP; optionally bidirectional, or concatenation + 1x1
//! projection as the paper's ablation); a shared encoder tail continues from the fused
//! map; the nnU-Net decoder receives dual-source skips: below the fusion stage the two
//! encoders' features concatenated and compressed by a 1x1 conv ("pre-fusion"), at and
//! above it the fused map and the tail's stages ("post-fusion"); deep supervision as in
//! nnU-Net.
//!
//! The paper's baselines are configurations of the same code: the `early_fusion`
//! variant is a plain nnU-Net on a selection of the five channels (all five: the 5-channel
//! early-fusion baseline; `[0,1,2,3]`: angles only; `[4]`: phase only; four of five: the
//! leave-one-out modality ablation).
//!
//! The attention runs over the `h*w` spatial tokens of the fusion stage (4096 for a
//! 256x256 patch at stage 2) through libtorch's fused `scaled_dot_product_attention`
//! (flash / memory-efficient kernels), so memory grows linearly with the token count and
//! large inference tiles work.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::backend::onednn;
use crate::backend::ops::Ops;
use crate::error::{Error, Result};
use crate::nn::blocks::{ConvNormAct, Decoder, Encoder, stage_features};

/// The names of the five ssQPM input channels, in order.
pub const SSQPM_CHANNELS: [&str; 5] = ["I0", "I45", "I90", "I135", "phase"];

/// Which network the configuration builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// DM-QPMNet: separate encoders for angles and phase, fused at `fusion_stage`.
    Dual,
    /// A plain nnU-Net on the channels listed in `channels` (the baselines).
    EarlyFusion,
}

/// How the two modality streams are merged at the fusion stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FusionOp {
    /// Multi-head cross-attention (angles query, phase keys/values), residual + MLP.
    Attention,
    /// Concatenation followed by a 1x1 conv + InstanceNorm + LeakyReLU (the ablation).
    Concat,
}

/// Architecture of a DM-QPMNet model (or one of its baselines).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DmQpmConfig {
    pub variant: Variant,
    /// `early_fusion` only: the input channels the network sees (indices into
    /// I0, I45, I90, I135, phase). Default all five.
    pub channels: Vec<usize>,
    /// Resolution stages in all (the paper's figure: stages 0..4, so 5).
    pub n_stages: usize,
    pub base_features: i64,
    pub max_features: i64,
    pub convs_per_stage: usize,
    /// `dual` only: the encoder stage where the streams fuse (1, 2 or 3; paper: 2).
    pub fusion_stage: usize,
    pub fusion: FusionOp,
    /// Attention in both directions (the paper's open question 1): a second attention
    /// with phase as queries and angles as keys/values; the two results are merged by a
    /// linear layer.
    pub bidirectional: bool,
    /// Attention heads; must divide the fusion width.
    pub heads: i64,
    /// Common width of the 1x1 projections (0 = the encoder's features at the fusion stage).
    pub fusion_width: i64,
    /// Hidden width of the fusion MLP as a multiple of the fusion width.
    pub mlp_ratio: i64,
}

impl Default for DmQpmConfig {
    fn default() -> Self {
        DmQpmConfig {
            variant: Variant::Dual,
            channels: vec![0, 1, 2, 3, 4],
            n_stages: 5,
            base_features: 32,
            max_features: 512,
            convs_per_stage: 2,
            fusion_stage: 2,
            fusion: FusionOp::Attention,
            bidirectional: false,
            heads: 8,
            fusion_width: 0,
            mlp_ratio: 2,
        }
    }
}

impl DmQpmConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("dmqpm.{m}")));
        if !(2..=8).contains(&self.n_stages) {
            return bad(format!("n_stages = {}; expected 2..=8", self.n_stages));
        }
        if self.base_features < 1 || self.max_features < self.base_features {
            return bad(format!(
                "base_features = {}, max_features = {}; expected 1 <= base_features <= max_features",
                self.base_features, self.max_features
            ));
        }
        if self.convs_per_stage < 1 {
            return bad("convs_per_stage must be >= 1".into());
        }
        match self.variant {
            Variant::EarlyFusion => {
                let mut c = self.channels.clone();
                c.sort();
                c.dedup();
                if c.is_empty() || c.len() != self.channels.len() || c.iter().any(|&i| i >= 5) {
                    return bad(format!(
                        "channels = {:?}; expected distinct indices in 0..=4 (I0, I45, I90, I135, phase)",
                        self.channels
                    ));
                }
            }
            Variant::Dual => {
                if !(1..=3).contains(&self.fusion_stage) || self.fusion_stage + 1 >= self.n_stages {
                    return bad(format!(
                        "fusion_stage = {}; expected 1, 2 or 3 and below the last stage (n_stages = {})",
                        self.fusion_stage, self.n_stages
                    ));
                }
                let w = self.width();
                if self.fusion == FusionOp::Attention {
                    if self.heads < 1 || w % self.heads != 0 {
                        return bad(format!("heads = {}; expected a divisor of the fusion width {w}", self.heads));
                    }
                    if self.mlp_ratio < 1 {
                        return bad(format!("mlp_ratio = {}; expected >= 1", self.mlp_ratio));
                    }
                }
                if self.fusion_width < 0 {
                    return bad(format!("fusion_width = {}; expected >= 0", self.fusion_width));
                }
            }
        }
        Ok(())
    }

    pub fn features(&self) -> Vec<i64> {
        stage_features(self.base_features, self.max_features, self.n_stages)
    }

    /// The fusion block's token width.
    pub fn width(&self) -> i64 {
        if self.fusion_width > 0 {
            self.fusion_width
        } else {
            self.features()[self.fusion_stage.min(self.n_stages - 1)]
        }
    }

    /// Input height and width must be multiples of this.
    pub fn divisor(&self) -> usize {
        1 << (self.n_stages - 1)
    }

    /// A short human-readable name of the configuration (used in result tables).
    pub fn label(&self) -> String {
        match self.variant {
            Variant::EarlyFusion => {
                let names: Vec<&str> = self.channels.iter().map(|&i| SSQPM_CHANNELS[i]).collect();
                match self.channels.as_slice() {
                    [0, 1, 2, 3, 4] => "early fusion (5-ch nnU-Net)".into(),
                    [0, 1, 2, 3] => "angles only".into(),
                    [4] => "phase only".into(),
                    _ => format!("early fusion [{}]", names.join(", ")),
                }
            }
            Variant::Dual => format!(
                "DM-QPMNet stage {} {}{}",
                self.fusion_stage,
                match self.fusion {
                    FusionOp::Attention => "MHA",
                    FusionOp::Concat => "concat",
                },
                if self.bidirectional && self.fusion == FusionOp::Attention { " bidirectional" } else { "" }
            ),
        }
    }
}

/// Multi-head attention with separate query and key/value sources, over token
/// sequences `(N, L, D)`; parameter names follow a PyTorch transcription
/// (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
#[derive(Debug)]
pub struct CrossAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
}

impl CrossAttention {
    pub fn new(p: &nn::Path, d: i64, heads: i64) -> Self {
        let c = Default::default;
        CrossAttention {
            q_proj: nn::linear(p / "q_proj", d, d, c()),
            k_proj: nn::linear(p / "k_proj", d, d, c()),
            v_proj: nn::linear(p / "v_proj", d, d, c()),
            out_proj: nn::linear(p / "out_proj", d, d, c()),
            heads,
        }
    }

    /// `q (N, Lq, D)`, `kv (N, Lk, D)` -> `(N, Lq, D)`.
    pub fn forward(&self, q: &Tensor, kv: &Tensor) -> Tensor {
        let (n, lq, d) = q.size3().expect("(N, L, D) queries");
        let lk = kv.size()[1];
        let h = self.heads;
        let split = |t: Tensor, l: i64| t.view([n, l, h, d / h]).transpose(1, 2);
        let q = split(self.q_proj.forward(q), lq);
        let k = split(self.k_proj.forward(kv), lk);
        let v = split(self.v_proj.forward(kv), lk);
        let o = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false);
        self.out_proj.forward(&o.transpose(1, 2).reshape([n, lq, d]))
    }
}

/// LayerNorm over the last dimension.
fn layer_norm(p: &nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![d], Default::default())
}

/// The fusion block at the fusion stage: `(a, p)` both `(N, F, h, w)` -> `(N, F, h, w)`.
#[allow(clippy::large_enum_variant)] // reason: built once per model and never moved in a hot path; boxing the large variant only adds an indirection
#[derive(Debug)]
pub enum Fusion {
    Attention {
        proj_a: nn::Conv2D,
        proj_p: nn::Conv2D,
        norm_q: nn::LayerNorm,
        norm_kv: nn::LayerNorm,
        attn: CrossAttention,
        /// Bidirectional: phase-query attention and the linear merge of both directions.
        reverse: Option<(nn::LayerNorm, nn::LayerNorm, CrossAttention, nn::Linear)>,
        norm_mlp: nn::LayerNorm,
        fc1: nn::Linear,
        fc2: nn::Linear,
        proj_out: Option<nn::Conv2D>,
    },
    Concat(ConvNormAct),
}

impl Fusion {
    pub fn new(p: &nn::Path, cfg: &DmQpmConfig, f: i64) -> Self {
        match cfg.fusion {
            FusionOp::Concat => Fusion::Concat(ConvNormAct::with_kernel(&(p / "concat"), 2 * f, f, 1, 1)),
            FusionOp::Attention => {
                let d = cfg.width();
                let c1 = |name: &str, cin: i64, cout: i64| nn::conv2d(p / name, cin, cout, 1, Default::default());
                let reverse = cfg.bidirectional.then(|| {
                    (
                        layer_norm(&(p / "norm_q_rev"), d),
                        layer_norm(&(p / "norm_kv_rev"), d),
                        CrossAttention::new(&(p / "attn_rev"), d, cfg.heads),
                        nn::linear(p / "merge", 2 * d, d, Default::default()),
                    )
                });
                Fusion::Attention {
                    proj_a: c1("proj_a", f, d),
                    proj_p: c1("proj_p", f, d),
                    norm_q: layer_norm(&(p / "norm_q"), d),
                    norm_kv: layer_norm(&(p / "norm_kv"), d),
                    attn: CrossAttention::new(&(p / "attn"), d, cfg.heads),
                    reverse,
                    norm_mlp: layer_norm(&(p / "norm_mlp"), d),
                    fc1: nn::linear(p / "mlp" / "fc1", d, d * cfg.mlp_ratio, Default::default()),
                    fc2: nn::linear(p / "mlp" / "fc2", d * cfg.mlp_ratio, d, Default::default()),
                    proj_out: (d != f).then(|| c1("proj_out", d, f)),
                }
            }
        }
    }

    /// `a`, `ph`: the two encoders' stage maps (blocked on [`Ops::Blocked`], as the
    /// result). The attention runs on plain token sequences: the 1x1 projections read the
    /// maps and write plain ones.
    pub fn forward(&self, a: &Tensor, ph: &Tensor, ops: Ops) -> Result<Tensor> {
        match self {
            Fusion::Concat(c) => c.forward(&Tensor::cat(&[a, ph], 1), ops),
            Fusion::Attention { proj_a, proj_p, .. } => {
                let (pa, pp) = (ops.head(proj_a, a)?, ops.head(proj_p, ph)?);
                Ok(ops.from_plain(&self.attend(&pa, &pp)))
            }
        }
    }

    /// The attention fusion after the input projections: `pa`, `pp` both `(N, D, h, w)`
    /// -> `(N, F, h, w)`.
    fn attend(&self, pa: &Tensor, pp: &Tensor) -> Tensor {
        match self {
            Fusion::Concat(_) => unreachable!("attend() is the attention fusion's"),
            Fusion::Attention { norm_q, norm_kv, attn, reverse, norm_mlp, fc1, fc2, proj_out, .. } => {
                let (n, _, h, w) = pa.size4().expect("(N, D, h, w)");
                // (N, D, h, w) -> (N, h*w, D)
                let tokens = |t: &Tensor| t.flatten(2, 3).transpose(1, 2);
                let ta = tokens(pa);
                let tp = tokens(pp);
                let qa = norm_q.forward(&ta);
                let kp = norm_kv.forward(&tp);
                let mut t = &ta + attn.forward(&qa, &kp);
                if let Some((nq, nkv, attn_rev, merge)) = reverse {
                    let tr = &tp + attn_rev.forward(&nq.forward(&tp), &nkv.forward(&ta));
                    t = merge.forward(&Tensor::cat(&[t, tr], 2));
                }
                let m = fc2.forward(&fc1.forward(&norm_mlp.forward(&t)).gelu("none"));
                let t = t + m;
                let d = t.size()[2];
                let y = t.transpose(1, 2).reshape([n, d, h, w]);
                match proj_out {
                    Some(c) => c.forward(&y),
                    None => y,
                }
            }
        }
    }
}

/// The network: `dual` (DM-QPMNet) or `early_fusion` (a baseline nnU-Net on a channel
/// selection).
#[allow(clippy::large_enum_variant)] // reason: built once per model and never moved in a hot path; boxing the large variant only adds an indirection
#[derive(Debug)]
pub enum DmQpmNet {
    Dual {
        enc_angles: Encoder,
        enc_phase: Encoder,
        /// 1x1 compression of the concatenated pre-fusion skips, stages `0..fusion_stage`.
        skip_compress: Vec<ConvNormAct>,
        fusion: Fusion,
        tail: Encoder,
        decoder: Decoder,
    },
    EarlyFusion {
        /// `None` when all five channels are used in order.
        select: Option<Tensor>,
        encoder: Encoder,
        decoder: Decoder,
    },
}

impl DmQpmNet {
    pub fn new(p: &nn::Path, cfg: &DmQpmConfig, n_classes: i64) -> Result<Self> {
        cfg.validate()?;
        let f = cfg.features();
        let cps = cfg.convs_per_stage;
        Ok(match cfg.variant {
            Variant::EarlyFusion => {
                let all = cfg.channels == [0, 1, 2, 3, 4];
                let select = (!all).then(|| {
                    Tensor::from_slice(&cfg.channels.iter().map(|&i| i as i64).collect::<Vec<_>>())
                        .to_device(p.device())
                });
                DmQpmNet::EarlyFusion {
                    select,
                    encoder: Encoder::new(&(p / "encoder"), cfg.channels.len() as i64, &f, cps, 0),
                    decoder: Decoder::new(&(p / "decoder"), &f, &f, n_classes, cps),
                }
            }
            Variant::Dual => {
                let k = cfg.fusion_stage;
                let pre = &f[..=k];
                DmQpmNet::Dual {
                    enc_angles: Encoder::new(&(p / "enc_angles"), 4, pre, cps, 0),
                    enc_phase: Encoder::new(&(p / "enc_phase"), 1, pre, cps, 0),
                    skip_compress: (0..k)
                        .map(|s| ConvNormAct::with_kernel(&(p / "skip_compress" / s), 2 * f[s], f[s], 1, 1))
                        .collect(),
                    fusion: Fusion::new(&(p / "fusion"), cfg, f[k]),
                    tail: Encoder::new(&(p / "tail"), f[k], &f[k + 1..], cps, k + 1),
                    decoder: Decoder::new(&(p / "decoder"), &f, &f, n_classes, cps),
                }
            }
        })
    }

    /// `(N, 5, H, W)` -> logits per decoder stage, full resolution first.
    ///
    /// In training on the CPU the convolutional parts keep their activations in oneDNN's
    /// blocked layout when every stage has a multiple of 16 features ([`crate::backend::onednn`]).
    pub fn forward(&self, x: &Tensor, deep_supervision: bool) -> Vec<Tensor> {
        if self.blockable() && onednn::applies(x) {
            match self.forward_ops(x, deep_supervision, Ops::Blocked) {
                Ok(outs) => return outs,
                Err(e) => onednn::disable(&e),
            }
        }
        self.forward_ops(x, deep_supervision, Ops::Plain { train: crate::backend::packed::grad_enabled() })
            .expect("libtorch's operators report failures by panicking, not through Result")
    }

    fn blockable(&self) -> bool {
        match self {
            DmQpmNet::EarlyFusion { encoder, .. } => encoder.blockable(),
            DmQpmNet::Dual { enc_angles, tail, .. } => enc_angles.blockable() && tail.blockable(),
        }
    }

    /// The forward on either path ([`Ops`]); the logits are plain.
    fn forward_ops(&self, x: &Tensor, deep_supervision: bool, ops: Ops) -> Result<Vec<Tensor>> {
        match self {
            DmQpmNet::EarlyFusion { select, encoder, decoder } => {
                let skips = match select {
                    Some(idx) => encoder.forward(&x.index_select(1, idx), ops)?,
                    None => encoder.forward(x, ops)?,
                };
                decoder.forward(&skips, deep_supervision, ops)
            }
            DmQpmNet::Dual { enc_angles, enc_phase, skip_compress, fusion, tail, decoder } => {
                let a = enc_angles.forward(&x.narrow(1, 0, 4), ops)?;
                let p = enc_phase.forward(&x.narrow(1, 4, 1), ops)?;
                let k = skip_compress.len();
                let mut skips = (0..k)
                    .map(|s| skip_compress[s].forward(&Tensor::cat(&[&a[s], &p[s]], 1), ops))
                    .collect::<Result<Vec<_>>>()?;
                let fused = fusion.forward(&a[k], &p[k], ops)?;
                skips.extend(tail.forward(&fused, ops)?);
                skips.insert(k, fused);
                decoder.forward(&skips, deep_supervision, ops)
            }
        }
    }
}

/// Convenience for tests and benchmarks: largest absolute difference of two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn build(cfg: &DmQpmConfig) -> (nn::VarStore, DmQpmNet) {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = DmQpmNet::new(&vs.root(), cfg, 2).unwrap();
        (vs, net)
    }

    fn tiny() -> DmQpmConfig {
        DmQpmConfig { n_stages: 4, base_features: 8, max_features: 32, heads: 2, ..Default::default() }
    }

    #[test]
    fn every_variant_maps_five_channels_to_class_logits() {
        let x = Tensor::randn([2, 5, 32, 48], (Kind::Float, Device::Cpu));
        let mut cfgs = vec![];
        for stage in 1..=2 {
            for fusion in [FusionOp::Attention, FusionOp::Concat] {
                for bidirectional in [false, true] {
                    cfgs.push(DmQpmConfig { fusion_stage: stage, fusion, bidirectional, ..tiny() });
                }
            }
        }
        for ch in [vec![0, 1, 2, 3, 4], vec![0, 1, 2, 3], vec![4], vec![0, 2, 3, 4]] {
            cfgs.push(DmQpmConfig { variant: Variant::EarlyFusion, channels: ch, ..tiny() });
        }
        cfgs.push(DmQpmConfig { fusion_width: 24, heads: 3, ..tiny() });
        for cfg in cfgs {
            let (_vs, net) = build(&cfg);
            let outs = net.forward(&x, true);
            assert_eq!(outs.len(), 3, "{}", cfg.label());
            assert_eq!(outs[0].size(), vec![2, 2, 32, 48], "{}", cfg.label());
            assert_eq!(outs[2].size(), vec![2, 2, 8, 12], "{}", cfg.label());
            assert!(bool::try_from(outs[0].isfinite().all()).unwrap());
        }
    }

    /// The CUDA inference path's channels-last InstanceNorm (blocks::InstanceNorm::forward_nhwc),
    /// forced on the CPU: the whole network computes the same logits, channels-last throughout.
    #[test]
    fn channels_last_instance_norm_path_gives_the_same_logits() {
        let x = crate::engine::model::channels_last(&Tensor::randn([2, 5, 32, 48], (Kind::Float, Device::Cpu)));
        for cfg in [tiny(), DmQpmConfig { variant: Variant::EarlyFusion, ..tiny() }] {
            let (_vs, net) = build(&cfg);
            let plain = tch::no_grad(|| net.forward(&x, false).swap_remove(0));
            crate::nn::blocks::FORCE_NHWC.with(|f| f.set(true));
            let nhwc = tch::no_grad(|| net.forward(&x, false).swap_remove(0));
            crate::nn::blocks::FORCE_NHWC.with(|f| f.set(false));
            assert!(crate::nn::blocks::is_channels_last(&nhwc), "{}: {:?}", cfg.label(), nhwc.stride());
            let e = max_abs_diff(&plain, &nhwc);
            assert!(e < 1e-4, "{}: max |plain - nhwc| = {e}", cfg.label());
        }
    }

    #[test]
    fn fused_attention_matches_explicit_softmax_attention() {
        let (_vs, net) = build(&tiny());
        let DmQpmNet::Dual { fusion: Fusion::Attention { attn, .. }, .. } = &net else { panic!("dual") };
        // tiny(): width 32 at stage 2, 2 heads of 16
        let q = Tensor::randn([2, 50, 32], (Kind::Float, Device::Cpu));
        let kv = Tensor::randn([2, 70, 32], (Kind::Float, Device::Cpu));
        let fused = attn.forward(&q, &kv);
        // the same computation written out: softmax(QK^T / sqrt(d)) V per head
        let (h, d) = (2, 16);
        let split = |t: Tensor, l: i64| t.view([2, l, h, d]).transpose(1, 2);
        let qh = split(attn.q_proj.forward(&q), 50);
        let kh = split(attn.k_proj.forward(&kv), 70);
        let vh = split(attn.v_proj.forward(&kv), 70);
        let w = (qh.matmul(&kh.transpose(2, 3)) / (d as f64).sqrt()).softmax(-1, Kind::Float);
        let o = w.matmul(&vh).transpose(1, 2).reshape([2, 50, 32]);
        let explicit = attn.out_proj.forward(&o);
        assert!(max_abs_diff(&fused, &explicit) < 1e-5);
    }

    #[test]
    fn bad_configs_are_rejected_with_the_field_named() {
        let e = DmQpmConfig { fusion_stage: 4, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("fusion_stage"), "{e}");
        let e = DmQpmConfig { heads: 5, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("heads"), "{e}");
        let e = DmQpmConfig { variant: Variant::EarlyFusion, channels: vec![1, 1], ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("channels"), "{e}");
    }
}
