//! nnU-Net building blocks (dynamic-network-architectures' PlainConvUNet):
//! conv 3x3 + InstanceNorm(eps 1e-5, affine) + LeakyReLU(0.01); the first conv of an
//! encoder stage carries the stride; decoders upsample with transposed convs.
//! Parameter names mirror a PyTorch state_dict so weights can be compared 1:1.

use tch::nn;
use tch::{Kind, Tensor};

use crate::backend::onednn;
use crate::backend::ops::Ops;
use crate::error::Result;

/// InstanceNorm2d with affine parameters, no running statistics.
#[derive(Debug)]
pub struct InstanceNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl InstanceNorm {
    pub fn new(p: &nn::Path, c: i64) -> Self {
        InstanceNorm { weight: p.ones("weight", &[c]), bias: p.zeros("bias", &[c]) }
    }
    /// `(N, C, H, W) -> (N, C, H, W)`.
    ///
    /// Computed as a GroupNorm with one group per channel, which is the same function
    /// (per-sample, per-channel mean and biased variance, eps 1e-5, per-channel affine):
    /// libtorch's `instance_norm` reshapes to `(1, N*C, H, W)`, repeats the affine
    /// parameters and runs batch norm, whereas its `group_norm` kernel normalizes in one
    /// fused pass and keeps a channels-last input channels-last (faster at inference;
    /// docs/engine-notes.md).
    ///
    /// On a CUDA device a channels-last input stays channels-last ([`Self::forward_nhwc`]):
    /// libtorch's CUDA `group_norm` copies it to NCHW first, so every later convolution
    /// of the network would run on NCHW maps.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_act(x, false)
    }

    /// [`Self::forward`], then LeakyReLU(0.01) if `leaky`. On a CUDA device a channels-last
    /// map goes through the fused kernels of [`crate::backend::cuda_norm`] where they apply, else
    /// [`Self::forward_nhwc`].
    pub fn forward_act(&self, x: &Tensor, leaky: bool) -> Tensor {
        let y = if (x.device().is_cuda() || force_nhwc()) && nhwc_norm_enabled() && is_channels_last(x) {
            if let Some(y) =
                crate::backend::cuda_norm::norm_act(x, &self.weight, &self.bias, 1e-5, if leaky { 0.01 } else { 1.0 })
            {
                return y;
            }
            self.forward_nhwc(x)
        } else {
            let c = x.size()[1];
            x.group_norm(c, Some(&self.weight), Some(&self.bias), 1e-5, true)
        };
        if leaky {
            let mut y = y;
            let _ = y.leaky_relu_(); // negative slope 0.01
            y
        } else {
            y
        }
    }

    /// [`Self::forward`] of a channels-last `(N, C, H, W)` map (NHWC strides, as
    /// [`is_channels_last`] checks), with a channels-last result: the map viewed as
    /// `(N, H*W, C)`, per-(sample, channel) biased variance and mean ([`nhwc_var_mean`], in
    /// float32 whatever the input type), then `shift + x * scale` in one pass with
    /// `scale = weight / sqrt(var + eps)`, `shift = bias - mean * scale`, computed in float32
    /// and stored in the map's type (rounding `mean`, `scale` or `shift` to bfloat16 would
    /// cancel badly in `x * scale + shift` on channels whose mean is large against their
    /// spread). For bfloat16 the statistics read the map twice (a float32 sum, `var`).
    pub fn forward_nhwc(&self, x: &Tensor) -> Tensor {
        let (n, c, h, w) = x.size4().expect("(N, C, H, W)");
        let t = x.permute([0, 2, 3, 1]).reshape([n, h * w, c]);
        let (var, mean) = nhwc_var_mean(&t);
        let scale = (var + 1e-5).rsqrt() * self.weight.to_kind(Kind::Float);
        let shift = self.bias.to_kind(Kind::Float) - mean * &scale;
        // computed in float32, stored in x's type (one pass)
        let y = shift.addcmul_out(&t.empty_like(), &t, &scale);
        y.view([n, h, w, c]).permute([0, 3, 1, 2])
    }
}

/// Biased variance and mean over dimension 1 of a contiguous `(N, L, C)` tensor, as float32
/// `(N, 1, C)`. The mean comes from a float32 sum (exact to float32 rounding also for a
/// bfloat16 tensor); the variance from `var` (accumulated in float32, returned in the
/// tensor's type: for bfloat16 a relative error of 2^-9, 2^-10 on the scale). With few
/// channels a reduction over `L` keeps few outputs along the contiguous dimension, which
/// libtorch's CUDA reduction reads poorly. So for up to 32 channels `L` is split into `k`
/// interleaved parts, `(N, L/k, k*C)` reduced over dimension 1 (k*C contiguous outputs per
/// sample), and the parts' statistics combined exactly (equal counts: the mean of the
/// means, and the mean of the variances plus the variance of the means). Above 32 channels the
/// extra small kernels cost more than they gain, hence the limit (docs/engine-notes.md).
pub fn nhwc_var_mean(t: &Tensor) -> (Tensor, Tensor) {
    let (n, l, c) = t.size3().expect("(N, L, C)");
    let mut k = 1;
    while c <= 32 && (2 * k * c) <= 1024 && l % (2 * k) == 0 && l / (2 * k) >= 64 {
        k *= 2;
    }
    let parts = t.view([n, l / k, k * c]);
    let (var, mean) = if t.kind() == Kind::Float {
        parts.var_mean_correction(&[1i64][..], 0, false)
    } else {
        let mean = parts.sum_dim_intlist(&[1i64][..], false, Kind::Float) / (l / k) as f64;
        (parts.var_correction(&[1i64][..], 0, false), mean)
    };
    let (var, mean) = (var.to_kind(Kind::Float).view([n, k, c]), mean.to_kind(Kind::Float).view([n, k, c]));
    if k == 1 {
        return (var, mean);
    }
    let (mvar, mmean) = mean.var_mean_correction(&[1i64][..], 0, true);
    (var.mean_dim(1, true, Kind::Float) + mvar, mmean)
}

/// Whether `x` is an `(N, C, H, W)` map with channels-last (NHWC) strides.
pub fn is_channels_last(x: &Tensor) -> bool {
    x.dim() == 4 && x.permute([0, 2, 3, 1]).is_contiguous()
}

#[cfg(test)]
thread_local! {
    /// Tests: take the CUDA channels-last InstanceNorm path on the CPU too.
    pub(crate) static FORCE_NHWC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn force_nhwc() -> bool {
    FORCE_NHWC.with(|f| f.get())
}

#[cfg(not(test))]
fn force_nhwc() -> bool {
    false
}

/// The CUDA channels-last InstanceNorm ([`InstanceNorm::forward_nhwc`]) unless
/// `LUMOS_CUDA_NHWC_NORM=0` (which restores libtorch's `group_norm`, for comparisons).
fn nhwc_norm_enabled() -> bool {
    crate::switches::switches().cuda_nhwc_norm
}

/// conv 3x3 -> InstanceNorm -> LeakyReLU(0.01).
#[derive(Debug)]
pub struct ConvNormAct {
    pub conv: nn::Conv2D,
    pub norm: InstanceNorm,
    stride: i64,
    padding: i64,
    packed: crate::backend::packed::PackCache,
}

impl ConvNormAct {
    pub fn new(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> Self {
        Self::with_kernel(p, cin, cout, 3, stride)
    }
    /// A `k x k` conv (odd `k`, "same" padding) + InstanceNorm + LeakyReLU.
    pub fn with_kernel(p: &nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> Self {
        let cfg = nn::ConvConfig { stride, padding: k / 2, ..Default::default() };
        ConvNormAct {
            conv: nn::conv2d(p / "conv", cin, cout, k, cfg),
            norm: InstanceNorm::new(&(p / "norm"), cout),
            stride,
            padding: k / 2,
            packed: Default::default(),
        }
    }
    /// `(N, cin, H, W) -> (N, cout, H/stride, W/stride)`
    ///
    /// The conv's bias is kept as a parameter (nnU-Net's `conv_bias=True`, so weights
    /// exchange 1:1 with a PyTorch state_dict) but not added: a per-channel constant
    /// before a per-channel mean subtraction cancels exactly, so the output is the same
    /// function and the pass saves the bias add and its gradient reduction. Its gradient
    /// is therefore zero (undefined), and the optimizers leave it untouched.
    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        match ops {
            Ops::Plain { .. } => {
                // without gradients on the CPU: oneDNN with the weight packed once (nn::packed)
                let y = self.packed.conv2d(x, &self.conv.ws, None, self.stride, self.padding);
                Ok(self.norm.forward_act(&y, true))
            }
            Ops::Blocked => self.forward_blocked(x),
        }
    }

    /// The training path on oneDNN's blocked layout ([`crate::backend::onednn`]): `x`
    /// blocked `(N, cin/16, H, W, 16)`, or plain `(N, cin, H, W)` for a network's first
    /// layer; the result is blocked. `cout` must be a multiple of 16.
    fn forward_blocked(&self, x: &Tensor) -> Result<Tensor> {
        let (x, w) = onednn::first_layer(x, &self.conv.ws);
        let y = onednn::conv2d(&x, &w, None, self.stride, self.padding)?;
        onednn::norm_act(&y, &self.norm.weight, &self.norm.bias, 1e-5, 0.01)
    }
}

/// Two (or more) ConvNormAct; the first may be strided.
#[derive(Debug)]
pub struct StackedConvs {
    pub convs: Vec<ConvNormAct>,
}

impl StackedConvs {
    pub fn new(p: &nn::Path, cin: i64, cout: i64, n: usize, stride: i64) -> Self {
        let p = p / "convs";
        let convs = (0..n)
            .map(|i| {
                ConvNormAct::new(&(&p / i), if i == 0 { cin } else { cout }, cout, if i == 0 { stride } else { 1 })
            })
            .collect();
        StackedConvs { convs }
    }
    /// `(N, cin, H, W) -> (N, cout, H/stride, W/stride)`
    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        let mut y = self.convs[0].forward(x, ops)?;
        for c in &self.convs[1..] {
            y = c.forward(&y, ops)?;
        }
        Ok(y)
    }
}

/// Features per stage: `base * 2^s`, capped at `max`.
pub fn stage_features(base: i64, max: i64, n_stages: usize) -> Vec<i64> {
    (0..n_stages).map(|s| (base << s).min(max)).collect()
}

/// A plain convolutional encoder: stage 0 at full resolution, each later stage halves it.
#[derive(Debug)]
pub struct Encoder {
    pub stages: Vec<StackedConvs>,
    pub features: Vec<i64>,
}

impl Encoder {
    /// `first_stage` lets a branch encoder cover stages `first_stage..first_stage+features.len()`
    /// (stride 1 only for global stage 0).
    pub fn new(p: &nn::Path, cin: i64, features: &[i64], convs_per_stage: usize, first_stage: usize) -> Self {
        let p = p / "stages";
        let mut stages = Vec::new();
        let mut c = cin;
        for (i, &f) in features.iter().enumerate() {
            let stride = if first_stage + i == 0 { 1 } else { 2 };
            stages.push(StackedConvs::new(&(&p / i), c, f, convs_per_stage, stride));
            c = f;
        }
        Encoder { stages, features: features.to_vec() }
    }
    /// `(N, cin, H, W)` -> one skip per stage, `(N, f_s, H/2^s, W/2^s)` (blocked on
    /// [`Ops::Blocked`], where `x` may be plain: a network's first stage).
    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Vec<Tensor>> {
        let mut skips = Vec::with_capacity(self.stages.len());
        let mut y = x.shallow_clone();
        for s in &self.stages {
            y = s.forward(&y, ops)?;
            skips.push(y.shallow_clone());
        }
        Ok(skips)
    }

    /// Whether every stage can run blocked: all convolutions have a multiple of 16 outputs.
    pub fn blockable(&self) -> bool {
        self.features.iter().all(|f| f % onednn::BLOCK == 0)
    }
}

/// nnU-Net decoder: transposed conv (kernel = stride = 2), concatenate the skip,
/// StackedConvs, and a 1x1 segmentation head per stage for deep supervision.
#[derive(Debug)]
pub struct Decoder {
    pub transpconvs: Vec<nn::ConvTranspose2D>,
    pub stages: Vec<StackedConvs>,
    pub seg_layers: Vec<nn::Conv2D>,
}

impl Decoder {
    /// `features`: encoder features per stage (lowest stage first); `skip_features`:
    /// channels of the skip tensor at each stage (equal to `features` for a plain U-Net).
    pub fn new(p: &nn::Path, features: &[i64], skip_features: &[i64], n_classes: i64, convs_per_stage: usize) -> Self {
        let n = features.len();
        let (mut tc, mut st, mut sl) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n - 1 {
            // decoder stage i goes from encoder stage n-1-i to n-2-i
            let below = features[n - 1 - i];
            let target = features[n - 2 - i];
            let skip = skip_features[n - 2 - i];
            let cfg = nn::ConvTransposeConfig { stride: 2, ..Default::default() };
            tc.push(nn::conv_transpose2d(p / "transpconvs" / i, below, target, 2, cfg));
            st.push(StackedConvs::new(&(p / "stages" / i), target + skip, target, convs_per_stage, 1));
            sl.push(nn::conv2d(p / "seg_layers" / i, target, n_classes, 1, Default::default()));
        }
        Decoder { transpconvs: tc, stages: st, seg_layers: sl }
    }

    /// `skips[s]` is `(N, skip_f_s, H/2^s, W/2^s)`; the last entry is the bottleneck.
    /// Returns logits per decoder stage, full resolution first:
    /// `[(N, K, H, W), (N, K, H/2, W/2), ...]`. With `deep_supervision == false` only the first.
    /// The logits are plain on either path.
    pub fn forward(&self, skips: &[Tensor], deep_supervision: bool, ops: Ops) -> Result<Vec<Tensor>> {
        let n = skips.len();
        let mut x = skips[n - 1].shallow_clone();
        let mut outs = Vec::new();
        for i in 0..self.stages.len() {
            let up = ops.conv_transpose(&self.transpconvs[i], &x)?;
            x = self.stages[i].forward(&Tensor::cat(&[up, skips[n - 2 - i].shallow_clone()], 1), ops)?;
            if deep_supervision || i == self.stages.len() - 1 {
                outs.push(ops.head(&self.seg_layers[i], &x)?);
            }
        }
        outs.reverse();
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
    }

    #[test]
    fn nhwc_instance_norm_matches_group_norm_and_stays_channels_last() {
        let _g = crate::engine::model::TORCH_RNG.lock();
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = InstanceNorm::new(&vs.root(), 24);
        tch::no_grad(|| {
            let _ = norm.weight.shallow_clone().uniform_(0.5, 1.5);
            let _ = norm.bias.shallow_clone().uniform_(-0.5, 0.5);
        });
        // a per-channel offset (conv outputs carry one: the bias is not added)
        let x = Tensor::randn([3, 24, 11, 7], (Kind::Float, Device::Cpu)) * 2.0
            + Tensor::randn([1, 24, 1, 1], (Kind::Float, Device::Cpu));
        let reference = x.group_norm(24, Some(&norm.weight), Some(&norm.bias), 1e-5, true);
        let xl = crate::engine::model::channels_last(&x);
        assert!(is_channels_last(&xl) && !is_channels_last(&x));
        let y = tch::no_grad(|| norm.forward_nhwc(&xl));
        assert!(is_channels_last(&y), "the result keeps NHWC strides: {:?}", y.stride());
        assert_eq!(y.size(), x.size());
        let e = max_abs(&y, &reference);
        assert!(e < 1e-4, "float32: max |nhwc - group_norm| = {e}");
        // bfloat16: within a few bfloat16 roundings of the float32 result (values ~ N(0, 1) * weight)
        let yb = tch::no_grad(|| norm.forward_nhwc(&xl.to_kind(Kind::BFloat16)));
        assert_eq!(yb.kind(), Kind::BFloat16);
        assert!(is_channels_last(&yb));
        let eb = max_abs(&yb, &reference);
        assert!(eb < 0.06, "bfloat16: max |nhwc - group_norm| = {eb}");
        let mb = (yb.to_kind(Kind::Float) - &reference).abs().mean(Kind::Float).double_value(&[]);
        assert!(mb < 6e-3, "bfloat16: mean |nhwc - group_norm| = {mb}");
        // a large map: the statistics' split reduction (k > 1) with 8 and 32 channels, none with 64
        for c in [8i64, 32, 64] {
            let t = Tensor::randn([2, 4096, c], (Kind::Float, Device::Cpu)) * 3.0 + 5.0;
            let (v0, m0) = t.var_mean_correction(&[1i64][..], 0, true);
            let (v, m) = nhwc_var_mean(&t);
            assert_eq!(v.size(), vec![2, 1, c]);
            assert!(
                max_abs(&m, &m0) < 1e-5 && max_abs(&v, &v0) < 1e-4,
                "{c} channels: {} {}",
                max_abs(&m, &m0),
                max_abs(&v, &v0)
            );
            let (vb, mb) = nhwc_var_mean(&t.to_kind(Kind::BFloat16));
            assert_eq!(vb.kind(), Kind::Float);
            assert!(
                max_abs(&mb, &m0) < 0.03 && max_abs(&vb, &v0) < 0.1,
                "bfloat16, {c} channels: {} {}",
                max_abs(&mb, &m0),
                max_abs(&vb, &v0)
            );
        }
        // bfloat16 channels whose mean is large against their spread, and a 1 x 1 map (the
        // result is the bias): the statistics and the affine map stay float32
        let xc = (Tensor::randn([2, 24, 9, 5], (Kind::Float, Device::Cpu)) * 0.01 + 1.3).to_kind(Kind::BFloat16);
        let refc = xc.to_kind(Kind::Float).group_norm(24, Some(&norm.weight), Some(&norm.bias), 1e-5, true);
        let yc = tch::no_grad(|| norm.forward_nhwc(&crate::engine::model::channels_last(&xc)));
        let ec = max_abs(&yc, &refc);
        assert!(ec < 0.05, "bfloat16 near-constant channels: max error {ec}");
        let x1 = (Tensor::randn([3, 24, 1, 1], (Kind::Float, Device::Cpu)) + 1.3).to_kind(Kind::BFloat16);
        let y1 = tch::no_grad(|| norm.forward_nhwc(&x1));
        let e1 = max_abs(&y1, &norm.bias.view([1, 24, 1, 1]).expand([3, 24, 1, 1], false));
        assert!(e1 < 1e-2, "1 x 1 maps give the bias: max error {e1}");
        // an NCHW input still gives the right values (a copy, then NHWC)
        let yc = tch::no_grad(|| norm.forward_nhwc(&x));
        assert!(max_abs(&yc, &reference) < 1e-4);
    }
}
