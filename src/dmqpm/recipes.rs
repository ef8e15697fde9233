//! DM-QPMNet's training recipes at the three sizes (tiny, cpu, paper), shared by the
//! recipe table (`crate::recipes`) and the comparisons.

use serde::{Deserialize, Serialize};

use crate::dmqpm::net::DmQpmConfig;
use crate::engine::train::TrainConfig;
use crate::error::{Error, Result};

/// The sizes of the recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Seconds: for tests.
    Tiny,
    /// Under an hour on a 2-core CPU for the main variants x 3 seeds.
    Cpu,
    /// The paper's shape (5 stages, 32 base features, 256 patches, 300 epochs x 250
    /// iterations): hours on a GPU.
    Paper,
}

impl Preset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "cpu" => Ok(Preset::Cpu),
            "paper" => Ok(Preset::Paper),
            o => Err(Error::Config(format!("unknown preset '{o}'; expected tiny, cpu or paper"))),
        }
    }

    /// The training recipe shared by every variant (the architecture's size fields are
    /// taken from `base`).
    pub fn recipe(&self) -> (TrainConfig, DmQpmConfig) {
        let base = |n_stages, base_features, max_features, heads| DmQpmConfig {
            n_stages,
            base_features,
            max_features,
            heads,
            ..Default::default()
        };
        match self {
            Preset::Tiny => (
                TrainConfig {
                    epochs: 2,
                    iterations_per_epoch: 3,
                    batch_size: 2,
                    patch_size: [32, 32],
                    ..Default::default()
                },
                base(4, 4, 32, 2),
            ),
            Preset::Cpu => (
                TrainConfig {
                    epochs: 25,
                    iterations_per_epoch: 16,
                    batch_size: 4,
                    patch_size: [128, 128],
                    ..Default::default()
                },
                base(5, 16, 128, 4),
            ),
            Preset::Paper => (
                TrainConfig {
                    epochs: 300,
                    iterations_per_epoch: 250,
                    batch_size: 12,
                    patch_size: [256, 256],
                    ..Default::default()
                },
                base(5, 32, 512, 8),
            ),
        }
    }

    /// Default data: the paper's 24 training and 6 test images of 256x256.
    pub fn data_size(&self) -> (usize, usize, usize) {
        match self {
            Preset::Tiny => (4, 2, 64),
            _ => (24, 6, 256),
        }
    }
}
