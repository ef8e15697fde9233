//! muSplit's training recipes at the three sizes (tiny, cpu, paper), shared by the
//! recipe table (`crate::recipes`) and the comparisons.

use serde::{Deserialize, Serialize};

use crate::engine::train::TrainConfig;
use crate::error::{Error, Result};
use crate::musplit::net::{MuSplitConfig, SplitVariant};

/// The sizes of the recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitPreset {
    /// Seconds: for tests.
    Tiny,
    /// About half an hour on a 2-core CPU for 4 models x 2 seeds.
    Cpu,
    /// The paper's sizes (64 patches, 5 levels, 32 / 64 filters, batch 32): a GPU job.
    Paper,
}

impl SplitPreset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(SplitPreset::Tiny),
            "cpu" => Ok(SplitPreset::Cpu),
            "paper" => Ok(SplitPreset::Paper),
            o => Err(Error::Config(format!("unknown preset '{o}'; expected tiny, cpu or paper"))),
        }
    }
    /// Training recipe and architecture per variant (`lc_levels` is set per model).
    pub fn recipe(&self, variant: SplitVariant) -> (TrainConfig, MuSplitConfig) {
        let t = |epochs, iterations_per_epoch, batch_size, patch| TrainConfig {
            kind: "musplit".into(),
            epochs,
            iterations_per_epoch,
            batch_size,
            patch_size: [patch, patch],
            val_fraction: 0.0,
            device: "cpu".into(),
            ..Default::default()
        };
        match self {
            SplitPreset::Tiny => (
                t(1, 2, 2, 16),
                MuSplitConfig {
                    variant,
                    levels: 3,
                    lc_levels: 2,
                    base_channels: 4,
                    max_channels: 8,
                    z_dim: 2,
                    ..Default::default()
                },
            ),
            SplitPreset::Cpu => (
                t(8, 50, 8, 64),
                match variant {
                    SplitVariant::Unet => {
                        MuSplitConfig { variant, base_channels: 16, max_channels: 64, ..Default::default() }
                    }
                    SplitVariant::Hvae => {
                        MuSplitConfig { variant, base_channels: 32, max_channels: 32, z_dim: 16, ..Default::default() }
                    }
                },
            ),
            SplitPreset::Paper => (t(100, 250, 32, 64), MuSplitConfig::paper(variant)),
        }
    }
    /// (train frames, test frames, frame edge).
    pub fn data_size(&self) -> (usize, usize, usize) {
        match self {
            SplitPreset::Tiny => (2, 1, 48),
            SplitPreset::Cpu => (12, 4, 512),
            SplitPreset::Paper => (40, 10, 1024),
        }
    }
}
