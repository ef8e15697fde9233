//! Named training recipes: each method of the papers (and its baselines) at three sizes,
//! as a complete [`TrainConfig`]. The comparison commands, the C API
//! (`lumos_train_recipe`) and the plugins all start from these, so a model trained from
//! Fiji or napari is the same recipe the results were measured with.
//!
//! Sizes: `tiny` (seconds on a laptop, for trying the pipeline), `cpu` (the recipe of the
//! CPU comparisons in docs/results), `paper` (the papers' sizes; a GPU job).

use crate::dmqpm::net::{DmQpmConfig, Variant};
use crate::dmqpm::recipes::Preset;
use crate::engine::train::TrainConfig;
use crate::error::{Error, Result};
use crate::musplit::net::SplitVariant;
use crate::musplit::recipes::SplitPreset;
use crate::pgdiff::recipes::DiffPreset;

/// `(name, what it trains, input)`, in the order hosts list them.
pub const METHODS: [(&str, &str, &str); 8] = [
    ("dm-qpmnet", "DM-QPMNet: angles and phase encoders fused by attention (segmentation)", "ssqpm"),
    ("early-fusion", "nnU-Net on the five ssQPM channels stacked (DM-QPMNet baseline)", "ssqpm"),
    ("angles-only", "nnU-Net on the four polarized intensities (DM-QPMNet baseline)", "ssqpm"),
    ("phase-only", "nnU-Net on the phase map (DM-QPMNet baseline)", "ssqpm"),
    ("nnunet", "plain nnU-Net on any channels (segmentation)", "any"),
    ("pg-diffseg", "PG-DiffSeg: prior-guided latent diffusion (live / dead / background)", "qpi"),
    ("musplit-unet", "muSplit U-Net with lateral context (two-structure decomposition)", "fluo"),
    ("musplit-hvae", "muSplit hierarchical VAE with lateral context (two-structure decomposition)", "fluo"),
];

/// The sizes every method has.
pub const SIZES: [&str; 3] = ["tiny", "cpu", "paper"];

/// The training configuration of `method` (see [`METHODS`]) at `size` (see [`SIZES`]).
/// Device "auto"; seed 0. Callers adjust epochs, device, seed and so on.
pub fn recipe(method: &str, size: &str) -> Result<TrainConfig> {
    if !SIZES.contains(&size) {
        return Err(Error::InvalidArgument(format!(
            "unknown recipe size '{size}'; expected one of {}",
            SIZES.join(", ")
        )));
    }
    let dmqpm = |f: &dyn Fn(DmQpmConfig) -> DmQpmConfig| -> Result<TrainConfig> {
        let (tc, base) = Preset::parse(size)?.recipe();
        Ok(TrainConfig { kind: "dmqpm".into(), dmqpm: f(base), ..tc })
    };
    let early = |channels: Vec<usize>| {
        move |b: DmQpmConfig| DmQpmConfig { variant: Variant::EarlyFusion, channels: channels.clone(), ..b }
    };
    let musplit = |variant| -> Result<TrainConfig> {
        let (tc, mc) = SplitPreset::parse(size)?.recipe(variant);
        Ok(TrainConfig { musplit: mc, ..tc })
    };
    let mut cfg = match method {
        "dm-qpmnet" => dmqpm(&|b| DmQpmConfig { variant: Variant::Dual, ..b })?,
        "early-fusion" => dmqpm(&early(vec![0, 1, 2, 3, 4]))?,
        "angles-only" => dmqpm(&early(vec![0, 1, 2, 3]))?,
        "phase-only" => dmqpm(&early(vec![4]))?,
        "nnunet" => DiffPreset::parse(size)?.baseline_recipe(),
        "pg-diffseg" => DiffPreset::parse(size)?.recipe(),
        "musplit-unet" => musplit(SplitVariant::Unet)?,
        "musplit-hvae" => musplit(SplitVariant::Hvae)?,
        o => {
            let names: Vec<&str> = METHODS.iter().map(|m| m.0).collect();
            return Err(Error::InvalidArgument(format!("unknown method '{o}'; expected one of {}", names.join(", "))));
        }
    };
    // the comparisons pin these for their own bookkeeping; a user's training starts fresh
    cfg.device = "auto".into();
    cfg.resume = false;
    cfg.seed = 0;
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_every_size() {
        for (m, _, _) in METHODS {
            for s in SIZES {
                let c = recipe(m, s).unwrap_or_else(|e| panic!("{m} {s}: {e}"));
                let back = TrainConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
                assert_eq!(back, c, "{m} {s} survives JSON");
            }
        }
        assert_eq!(recipe("phase-only", "tiny").unwrap().dmqpm.channels, vec![4]);
        assert_eq!(recipe("pg-diffseg", "cpu").unwrap().kind, "pgdiff");
        assert!(recipe("musplit-hvae", "tiny").unwrap().musplit.lc_levels > 0);
        assert!(recipe("dm-qpmnet", "huge").unwrap_err().to_string().contains("tiny, cpu, paper"));
        assert!(recipe("segformer", "cpu").unwrap_err().to_string().contains("dm-qpmnet"));
    }
}
