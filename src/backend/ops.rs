//! The layer operations that an architecture's forward is written against, and the two
//! ways they run: libtorch's own operators (any device, NCHW or channels-last strides,
//! training or inference) or oneDNN's blocked training layout ([`super::onednn`]: features
//! `(N, C/16, H, W, 16)`). A network writes its forward once over [`Ops`]; which one runs
//! is the backend's choice ([`super::onednn::applies`]), made once per pass. Both compute
//! the same function, and draw random numbers in the same order.
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

use super::onednn;
use crate::error::Result;

/// How a forward pass runs its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// libtorch's operators; `train` selects training-mode BatchNorm and dropout.
    Plain { train: bool },
    /// oneDNN's blocked layout (training only). A network's first layer may take a
    /// plain input; its outputs ([`Ops::head`]) are plain.
    Blocked,
}

impl Ops {
    /// Whether the pass trains (BatchNorm statistics of the batch, dropout).
    pub fn train(self) -> bool {
        match self {
            Ops::Plain { train } => train,
            Ops::Blocked => true,
        }
    }

    /// A tch convolution (weights and bias) of an odd square kernel with "same" padding
    /// (`kernel / 2`), at `stride`: the module must have been built with these.
    pub fn conv(self, c: &nn::Conv2D, x: &Tensor, stride: i64) -> Result<Tensor> {
        let pad = c.ws.size()[2] / 2;
        match self {
            Ops::Plain { .. } => Ok(x.conv2d(&c.ws, c.bs.as_ref(), [stride, stride], [pad, pad], [1, 1], 1)),
            Ops::Blocked => {
                let (x, w) = onednn::first_layer(x, &c.ws);
                onednn::conv2d(&x, &w, c.bs.as_ref(), stride, pad)
            }
        }
    }

    /// A 1x1 convolution of `cat([centre_pad(y), lc], channels)`, `y` zero-padded to the
    /// side of `lc` (square maps). The blocked path skips the products with the padding's
    /// zeros: the conv's half for `lc` over the whole map, plus its half for `y` on the
    /// centre where `y` is.
    pub fn conv_padded_cat(self, c: &nn::Conv2D, y: &Tensor, lc: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Plain { .. } => Ok(c.forward(&Tensor::cat(&[centre_pad(y, lc.size()[2]), lc.shallow_clone()], 1))),
            Ops::Blocked => {
                let ch = onednn::channels(y);
                let (w, (s, big)) = (&c.ws, (y.size()[2], lc.size()[2]));
                let out = onednn::conv2d(lc, &w.narrow(1, ch, ch), c.bs.as_ref(), 1, 0)?;
                let from_y = onednn::conv2d(y, &w.narrow(1, 0, ch), None, 1, 0)?;
                let o = (big - s) / 2;
                let mut centre = out.narrow(2, o, s).narrow(3, o, s);
                centre += from_y;
                Ok(out)
            }
        }
    }

    /// A transposed convolution whose kernel equals its stride (nnU-Net's upsampling).
    pub fn conv_transpose(self, c: &nn::ConvTranspose2D, x: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Plain { .. } => Ok(c.forward(x)),
            Ops::Blocked => onednn::conv_transpose2d(x, &c.ws, c.bs.as_ref(), c.ws.size()[2]),
        }
    }

    /// A network's output convolution: the result is plain `(N, K, H, W)` on either path.
    pub fn head(self, c: &nn::Conv2D, x: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Plain { .. } => Ok(c.forward(x)),
            Ops::Blocked => onednn::head(x, &c.ws, c.bs.as_ref()),
        }
    }

    /// BatchNorm (tch's defaults: eps 1e-5, momentum 0.1), training-mode when training.
    pub fn batch_norm(self, bn: &nn::BatchNorm, x: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Plain { train } => Ok(bn.forward_t(x, train)),
            Ops::Blocked => {
                let (Some(g), Some(b)) = (&bn.ws, &bn.bs) else {
                    return Err(crate::error::Error::Config("blocked batch norm needs affine parameters".into()));
                };
                let cfg = nn::BatchNormConfig::default();
                // slope 1: the identity after the normalization
                onednn::batch_norm_act(x, g, b, &bn.running_mean, &bn.running_var, cfg.momentum, cfg.eps, 1.0)
            }
        }
    }

    /// Inverted dropout with probability `p`, in place, when training.
    pub fn dropout_(self, y: Tensor, p: f64) -> Tensor {
        match self {
            Ops::Plain { train } => crate::nn::dropout::dropout_(y, p, train),
            Ops::Blocked => crate::nn::dropout::dropout_blocked_(y, p, true),
        }
    }

    /// Bilinear upsampling by 2 (half-pixel centres, as `align_corners = False`).
    pub fn upsample2(self, x: &Tensor) -> Tensor {
        match self {
            Ops::Plain { .. } => {
                let s = x.size();
                x.upsample_bilinear2d([s[2] * 2, s[3] * 2], false, None, None)
            }
            Ops::Blocked => onednn::upsample2_bilinear(x),
        }
    }

    /// The number of channels of a feature map.
    pub fn channels(self, x: &Tensor) -> i64 {
        match self {
            Ops::Plain { .. } => x.size()[1],
            Ops::Blocked => onednn::channels(x),
        }
    }

    /// A plain `(N, C, H, W)` tensor (a parameter, or what a plain-only part of the
    /// network computed) as a feature map of this layout.
    pub fn from_plain(self, t: &Tensor) -> Tensor {
        match self {
            Ops::Plain { .. } => t.shallow_clone(),
            Ops::Blocked => onednn::to_blocked(t),
        }
    }

    /// The per-sample mean over channels and pixels, `(N,)`.
    pub fn sample_mean(self, x: &Tensor) -> Tensor {
        let (dims, count): (&[i64], i64) = match self {
            Ops::Plain { .. } => (&[1, 2, 3], x.size()[1] * x.size()[2] * x.size()[3]),
            Ops::Blocked => (&[1, 2, 3, 4], onednn::channels(x) * x.size()[2] * x.size()[3]),
        };
        x.sum_dim_intlist(dims, false, Kind::Float) / count as f64
    }

    /// Standard normal noise shaped like the feature map `like`, float32. Drawn in NCHW
    /// order whatever the layout or strides, so that a seed gives the same draws on every
    /// path (and in float32 whatever the precision: bfloat16 inference draws the float32
    /// samples, and libtorch's bfloat16 `normal_` is also 5x slower on the CPU).
    pub fn standard_normal(self, like: &Tensor) -> Tensor {
        match self {
            Ops::Plain { .. } => Tensor::randn(like.size(), (Kind::Float, like.device())),
            Ops::Blocked => {
                let s = like.size();
                let eps = Tensor::randn([s[0], s[1] * onednn::BLOCK, s[2], s[3]], (Kind::Float, like.device()));
                onednn::to_blocked(&eps)
            }
        }
    }
}

/// `x` zero-padded to `size x size`, centred (odd remainders on the bottom / right).
pub fn centre_pad(x: &Tensor, size: i64) -> Tensor {
    let (h, w) = (x.size()[2], x.size()[3]);
    let (ph, pw) = (size - h, size - w);
    if ph == 0 && pw == 0 {
        return x.shallow_clone();
    }
    x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
}
