//! PG-DiffSeg's training recipes at the three sizes (tiny, cpu, paper), with the
//! deterministic nnU-Net baseline on the same tiles; shared by the recipe table
//! (`crate::recipes`) and the comparisons.

use serde::{Deserialize, Serialize};

use crate::engine::train::TrainConfig;
use crate::error::{Error, Result};
use crate::pgdiff::PgDiffConfig;

/// The sizes of the recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffPreset {
    /// Seconds: for tests (tiny networks, 32-pixel tiles).
    Tiny,
    /// A 2-core CPU: small networks on 128-pixel tiles (about 20 minutes per seed).
    Cpu,
    /// The paper's networks on 256-pixel tiles: a GPU job.
    Paper,
}

impl DiffPreset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(DiffPreset::Tiny),
            "cpu" => Ok(DiffPreset::Cpu),
            "paper" => Ok(DiffPreset::Paper),
            o => Err(Error::Config(format!("unknown preset '{o}'; expected tiny, cpu or paper"))),
        }
    }
    /// (train frames, test frames, frame edge).
    pub fn data_size(&self) -> (usize, usize, usize) {
        match self {
            DiffPreset::Tiny => (4, 1, 64),
            DiffPreset::Cpu => (24, 6, 256),
            DiffPreset::Paper => (120, 30, 512),
        }
    }
    /// The PG-DiffSeg training recipe.
    pub fn recipe(&self) -> TrainConfig {
        // resume: an interrupted comparison continues from each model's last checkpoint
        let base = TrainConfig {
            kind: "pgdiff".into(),
            val_fraction: 0.0,
            device: "cpu".into(),
            resume: true,
            ..Default::default()
        };
        match self {
            DiffPreset::Tiny => TrainConfig {
                pgdiff: PgDiffConfig::tiny(),
                epochs: 2,
                iterations_per_epoch: 4,
                batch_size: 4,
                patch_size: [32, 32],
                ..base
            },
            DiffPreset::Cpu => TrainConfig {
                pgdiff: PgDiffConfig { ae_epochs: 2, ..PgDiffConfig::cpu() },
                epochs: 8,
                iterations_per_epoch: 150,
                batch_size: 8,
                patch_size: [128, 128],
                ..base
            },
            DiffPreset::Paper => TrainConfig {
                pgdiff: PgDiffConfig { ae_epochs: 20, learning_rate: 2e-5, ..PgDiffConfig::default() },
                epochs: 100,
                iterations_per_epoch: 250,
                batch_size: 10,
                patch_size: [256, 256],
                device: "auto".into(),
                ..base
            },
        }
    }
    /// The deterministic baseline: nnU-Net on the same tiles.
    pub fn baseline_recipe(&self) -> TrainConfig {
        let r = self.recipe();
        let (epochs, its) = match self {
            DiffPreset::Tiny => (1, 2),
            DiffPreset::Cpu => (10, 50),
            DiffPreset::Paper => (100, 250),
        };
        TrainConfig {
            kind: "unet".into(),
            epochs,
            iterations_per_epoch: its,
            batch_size: r.batch_size,
            patch_size: r.patch_size,
            val_fraction: 0.0,
            device: r.device.clone(),
            learning_rate: 0.01,
            resume: true,
            unet: match self {
                // nnU-Net's planning stops halving at a 4 x 4 bottleneck; tiny runs in seconds
                DiffPreset::Tiny => crate::nnunet::net::UnetConfig {
                    n_stages: 4,
                    base_features: 8,
                    max_features: 64,
                    convs_per_stage: 2,
                },
                // 256-pixel tiles: 7 stages down to 4 x 4
                DiffPreset::Paper => crate::nnunet::net::UnetConfig { n_stages: 7, ..Default::default() },
                // 128-pixel tiles: the default 6 stages end at 4 x 4
                DiffPreset::Cpu => Default::default(),
            },
            ..Default::default()
        }
    }
}
