//! DM-QPMNet: ssQPM cell segmentation from four polarized intensities and a phase map.
//! It trains through the nnU-Net segmentation trainer ([`crate::nnunet`]).
pub mod net;
pub mod recipes;

use std::path::Path;

use tch::{Tensor, nn};

use crate::engine::method::{Method, Recipe};
use crate::engine::model::{ModelKind, ModelMeta, Net, Network};
use crate::engine::train::{TrainConfig, TrainingData};
use crate::error::{Error, Result};
use net::{DmQpmConfig, DmQpmNet, Variant};

/// The `dmqpm` kind: DM-QPMNet or one of its baselines.
pub struct DmQpm;

pub static DMQPM: DmQpm = DmQpm;

fn architecture(meta: &ModelMeta) -> Result<DmQpmConfig> {
    serde_json::from_value(meta.architecture.clone())
        .map_err(|e| Error::ModelFormat(format!("invalid dmqpm architecture: {e}")))
}

impl Method for DmQpm {
    fn kind(&self) -> ModelKind {
        ModelKind::Dmqpm
    }
    fn check_config(&self, cfg: &TrainConfig) -> Result<()> {
        cfg.dmqpm.validate()
    }
    fn patch_divisor(&self, cfg: &TrainConfig) -> usize {
        cfg.dmqpm.divisor()
    }
    fn build(&self, meta: &ModelMeta, p: &nn::Path) -> Result<Net> {
        let cfg = architecture(meta)?;
        if meta.input_channels.len() != 5 {
            return Err(Error::Shape(format!(
                "a dmqpm model takes 5 input channels (I0, I45, I90, I135, phase); the data have {} ({})",
                meta.input_channels.len(),
                meta.input_channels.join(", ")
            )));
        }
        Ok(Net::new(DmQpmNet::new(p, &cfg, meta.classes.len() as i64)?))
    }
    fn divisor(&self, meta: &ModelMeta) -> usize {
        architecture(meta).map(|c| c.divisor()).unwrap_or(1)
    }
    fn load(&self, cfg: &TrainConfig, data_dir: &Path) -> Result<Box<dyn TrainingData>> {
        crate::nnunet::train::load(ModelKind::Dmqpm, cfg, data_dir)
    }
    fn export_info(&self) -> crate::engine::method::ExportInfo {
        crate::engine::method::ExportInfo {
            name: "DM-QPMNet",
            tags: vec![
                "segmentation",
                "quantitative-phase-imaging",
                "polarization",
                "cells",
                "2d",
                "pytorch",
                "nnu-net",
            ],
            cite: vec![
                serde_json::json!({"text": "Chakraborty R, Espinosa-Momox A, Haskin R, Xu D, Porras-Aguilar R. DM-QPMNet: Dual-modality fusion network for cell segmentation in quantitative phase microscopy. arXiv:2511.00218 (2025).", "url": "https://arxiv.org/abs/2511.00218"}),
                crate::engine::method::nnunet_citation(),
            ],
        }
    }
    fn simulator(&self, _meta: &ModelMeta) -> Option<&'static str> {
        Some("ssqpm")
    }
    fn recipes(&self) -> &'static [Recipe] {
        &[
            Recipe {
                name: "dm-qpmnet",
                what: "DM-QPMNet: angles and phase encoders fused by attention (segmentation)",
                input: "ssqpm",
            },
            Recipe {
                name: "early-fusion",
                what: "nnU-Net on the five ssQPM channels stacked (DM-QPMNet baseline)",
                input: "ssqpm",
            },
            Recipe {
                name: "angles-only",
                what: "nnU-Net on the four polarized intensities (DM-QPMNet baseline)",
                input: "ssqpm",
            },
            Recipe { name: "phase-only", what: "nnU-Net on the phase map (DM-QPMNet baseline)", input: "ssqpm" },
        ]
    }
    fn recipe(&self, name: &str, size: &str) -> Result<TrainConfig> {
        let (tc, base) = recipes::Preset::parse(size)?.recipe();
        let early = |channels: Vec<usize>| DmQpmConfig { variant: Variant::EarlyFusion, channels, ..base.clone() };
        let dmqpm = match name {
            "dm-qpmnet" => DmQpmConfig { variant: Variant::Dual, ..base.clone() },
            "early-fusion" => early(vec![0, 1, 2, 3, 4]),
            "angles-only" => early(vec![0, 1, 2, 3]),
            "phase-only" => early(vec![4]),
            o => return Err(Error::InvalidArgument(format!("'{o}' is not a dmqpm recipe"))),
        };
        Ok(TrainConfig { kind: "dmqpm".into(), dmqpm, ..tc })
    }
}

impl Network for DmQpmNet {
    fn forward(&self, x: &Tensor, deep_supervision: bool) -> Result<Vec<Tensor>> {
        Ok(DmQpmNet::forward(self, x, deep_supervision))
    }
}
