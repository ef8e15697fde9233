//! What a model kind is, to the engine: how its settings are checked, how its network is
//! built from a model file, and how it trains. Each method's folder implements [`Method`]
//! for its kind; [`crate::methods::method`] is the one place that maps a kind to it.

use std::path::Path;

use tch::nn;

use crate::engine::model::{ModelKind, ModelMeta, Net};
use crate::engine::train::{TrainConfig, TrainingData};
use crate::error::Result;

pub trait Method: Sync {
    fn kind(&self) -> ModelKind;
    /// Checks the kind's part of a training config: its architecture and its own
    /// constraints (such as square patches).
    fn check_config(&self, cfg: &TrainConfig) -> Result<()>;
    /// The config's training patch sides must be multiples of this.
    fn patch_divisor(&self, cfg: &TrainConfig) -> usize;
    /// The network of a model file (weights uninitialized until loaded or seeded).
    fn build(&self, meta: &ModelMeta, p: &nn::Path) -> Result<Net>;
    /// Inference tiles of a model file's network must have sides that are multiples of
    /// this.
    fn divisor(&self, meta: &ModelMeta) -> usize;
    /// Loads a training folder in the kind's layout and splits it by the config's
    /// `val_fraction` and `seed`.
    fn load(&self, cfg: &TrainConfig, data_dir: &Path) -> Result<Box<dyn TrainingData>>;
    /// How the method presents itself in an exported bioimage.io model.
    fn export_info(&self) -> ExportInfo;
    /// The simulator (`lumos simulate <name>`) whose data a model file takes, if any.
    fn simulator(&self, meta: &ModelMeta) -> Option<&'static str>;
    /// The named training recipes of this kind (the method and its baselines), in the
    /// order hosts list them.
    fn recipes(&self) -> &'static [Recipe];
    /// The training configuration of `name` (one of [`Method::recipes`]) at `size`
    /// (`tiny`, `cpu` or `paper`; checked by the caller, [`crate::recipes::recipe`]).
    fn recipe(&self, name: &str, size: &str) -> Result<TrainConfig>;
}

/// A named training recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// `dm-qpmnet`, `early-fusion`, ...: what `lumos train --recipe` takes.
    pub name: &'static str,
    /// What it trains, for listings.
    pub what: &'static str,
    /// The data it takes: a simulator's name, or `any`.
    pub input: &'static str,
}

/// A method's name, tags and citations for bioimage.io's `rdf.yaml`.
pub struct ExportInfo {
    pub name: &'static str,
    pub tags: Vec<&'static str>,
    /// `{"text": ..., "doi" or "url": ...}` entries.
    pub cite: Vec<serde_json::Value>,
}

/// nnU-Net's citation (the segmentation networks build on it).
pub fn nnunet_citation() -> serde_json::Value {
    serde_json::json!({"text": "Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH. nnU-Net: a self-configuring method for deep learning-based biomedical image segmentation. Nature Methods 18, 203-211 (2021).", "doi": "10.1038/s41592-020-01008-z"})
}
