//! nnU-Net 2D (PlainConvUNet): the network, its loss, its augmentation and the
//! segmentation trainer, which DM-QPMNet shares.
pub mod augment;
pub mod loss;
pub mod net;
pub mod train;

use std::path::Path;

use tch::{Tensor, nn};

use crate::engine::method::{Method, Recipe};
use crate::engine::model::{ModelKind, ModelMeta, Net, Network};
use crate::engine::train::{TrainConfig, TrainingData};
use crate::error::{Error, Result};
use net::{Unet, UnetConfig};

/// The `unet` kind: a plain nnU-Net on any channels.
pub struct NnUnet;

pub static NNUNET: NnUnet = NnUnet;

fn architecture(meta: &ModelMeta) -> Result<UnetConfig> {
    serde_json::from_value(meta.architecture.clone())
        .map_err(|e| Error::ModelFormat(format!("invalid unet architecture: {e}")))
}

impl Method for NnUnet {
    fn kind(&self) -> ModelKind {
        ModelKind::Unet
    }
    fn check_config(&self, cfg: &TrainConfig) -> Result<()> {
        cfg.unet.validate()
    }
    fn patch_divisor(&self, cfg: &TrainConfig) -> usize {
        cfg.unet.divisor()
    }
    fn build(&self, meta: &ModelMeta, p: &nn::Path) -> Result<Net> {
        let cfg = architecture(meta)?;
        cfg.validate()?;
        Ok(Net::new(Unet::new(p, &cfg, meta.input_channels.len() as i64, meta.classes.len() as i64)))
    }
    fn divisor(&self, meta: &ModelMeta) -> usize {
        architecture(meta).map(|c| c.divisor()).unwrap_or(1)
    }
    fn load(&self, cfg: &TrainConfig, data_dir: &Path) -> Result<Box<dyn TrainingData>> {
        train::load(ModelKind::Unet, cfg, data_dir)
    }
    fn export_info(&self) -> crate::engine::method::ExportInfo {
        crate::engine::method::ExportInfo {
            name: "nnU-Net (2D)",
            tags: vec!["segmentation", "2d", "pytorch", "nnu-net"],
            cite: vec![crate::engine::method::nnunet_citation()],
        }
    }
    /// ssQPM data when the channels are named as the ssQPM simulator names them, QPI for
    /// one phase channel.
    fn simulator(&self, meta: &ModelMeta) -> Option<&'static str> {
        let ch = &meta.input_channels;
        let ssqpm = crate::dmqpm::net::SSQPM_CHANNELS;
        if ch.len() == 5 && ch.iter().zip(ssqpm).all(|(a, b)| a.eq_ignore_ascii_case(b)) {
            Some("ssqpm")
        } else if ch.len() == 1 && ch[0].eq_ignore_ascii_case("phase") {
            Some("qpi")
        } else {
            None
        }
    }
    fn recipes(&self) -> &'static [Recipe] {
        &[Recipe { name: "nnunet", what: "plain nnU-Net on any channels (segmentation)", input: "any" }]
    }
    /// The nnU-Net baseline of the PG-DiffSeg comparison, at its sizes.
    fn recipe(&self, name: &str, size: &str) -> Result<TrainConfig> {
        match name {
            "nnunet" => Ok(crate::pgdiff::recipes::DiffPreset::parse(size)?.baseline_recipe()),
            o => Err(Error::InvalidArgument(format!("'{o}' is not a unet recipe"))),
        }
    }
}

impl Network for Unet {
    fn forward(&self, x: &Tensor, deep_supervision: bool) -> Result<Vec<Tensor>> {
        Ok(Unet::forward(self, x, deep_supervision))
    }
}
