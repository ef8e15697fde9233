//! The 2D nnU-Net (PlainConvUNet): N input channels to K class logits, with deep supervision.

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::backend::ops::Ops;
use crate::error::{Error, Result};
use crate::nn::blocks::{Decoder, Encoder, stage_features};

/// Architecture of a plain 2D nnU-Net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetConfig {
    /// Resolution stages (the input edge is divided by 2^(n_stages-1) at the bottleneck).
    pub n_stages: usize,
    /// Features at stage 0, doubled per stage.
    pub base_features: i64,
    /// Cap on features per stage (512 in nnU-Net 2D).
    pub max_features: i64,
    /// Convolutions per encoder and decoder stage.
    pub convs_per_stage: usize,
}

impl Default for UnetConfig {
    fn default() -> Self {
        UnetConfig { n_stages: 6, base_features: 32, max_features: 512, convs_per_stage: 2 }
    }
}

impl UnetConfig {
    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.n_stages) {
            return Err(Error::Config(format!("unet.n_stages = {}; expected 2..=8", self.n_stages)));
        }
        if self.base_features < 1 || self.max_features < self.base_features {
            return Err(Error::Config(format!(
                "unet.base_features = {}, max_features = {}; expected 1 <= base_features <= max_features",
                self.base_features, self.max_features
            )));
        }
        if self.convs_per_stage < 1 {
            return Err(Error::Config("unet.convs_per_stage must be >= 1".into()));
        }
        Ok(())
    }
    /// Input height and width must be multiples of this.
    pub fn divisor(&self) -> usize {
        1 << (self.n_stages - 1)
    }
}

#[derive(Debug)]
pub struct Unet {
    pub encoder: Encoder,
    pub decoder: Decoder,
}

impl Unet {
    pub fn new(p: &nn::Path, cfg: &UnetConfig, in_channels: i64, n_classes: i64) -> Self {
        let f = stage_features(cfg.base_features, cfg.max_features, cfg.n_stages);
        let encoder = Encoder::new(&(p / "encoder"), in_channels, &f, cfg.convs_per_stage, 0);
        let decoder = Decoder::new(&(p / "decoder"), &f, &f, n_classes, cfg.convs_per_stage);
        Unet { encoder, decoder }
    }

    /// `(N, C, H, W)` -> logits per decoder stage, full resolution first: `[(N, K, H, W), ...]`.
    ///
    /// In training on the CPU the activations stay in oneDNN's blocked layout between
    /// layers when every stage has a multiple of 16 features ([`crate::backend::onednn`]).
    pub fn forward(&self, x: &Tensor, deep_supervision: bool) -> Vec<Tensor> {
        if self.encoder.blockable() && crate::backend::onednn::applies(x) {
            match self.forward_ops(x, deep_supervision, Ops::Blocked) {
                Ok(outs) => return outs,
                Err(e) => crate::backend::onednn::disable(&e),
            }
        }
        self.forward_ops(x, deep_supervision, Ops::Plain { train: crate::backend::packed::grad_enabled() })
            .expect("libtorch's operators report failures by panicking, not through Result")
    }

    /// The forward on either path ([`Ops`]); the logits are plain.
    fn forward_ops(&self, x: &Tensor, deep_supervision: bool, ops: Ops) -> Result<Vec<Tensor>> {
        self.decoder.forward(&self.encoder.forward(x, ops)?, deep_supervision, ops)
    }
}
