//! Named training recipes: each method of the papers (and its baselines) at three sizes,
//! as a complete [`TrainConfig`]. The comparison commands, the C API
//! (`lumos_train_recipe`) and the plugins all start from these, so a model trained from
//! Fiji or napari is the same recipe the results were measured with.
//!
//! Sizes: `tiny` (seconds on a laptop, for trying the pipeline), `cpu` (the recipe of the
//! CPU comparisons in docs/results), `paper` (the papers' sizes; a GPU job).

use crate::engine::method::Recipe;
use crate::engine::train::TrainConfig;
use crate::error::{Error, Result};
use crate::methods::{KINDS, method};

/// Every recipe, in the order hosts list them (each kind's, from its method).
pub fn all() -> Vec<&'static Recipe> {
    KINDS.iter().flat_map(|&k| method(k).recipes()).collect()
}

/// The sizes every method has.
pub const SIZES: [&str; 3] = ["tiny", "cpu", "paper"];

/// The training configuration of `name` (see [`all`]) at `size` (see [`SIZES`]).
/// Device "auto"; seed 0. Callers adjust epochs, device, seed and so on.
pub fn recipe(name: &str, size: &str) -> Result<TrainConfig> {
    if !SIZES.contains(&size) {
        return Err(Error::InvalidArgument(format!(
            "unknown recipe size '{size}'; expected one of {}",
            SIZES.join(", ")
        )));
    }
    let owner = KINDS.iter().map(|&k| method(k)).find(|m| m.recipes().iter().any(|r| r.name == name));
    let Some(m) = owner else {
        let names: Vec<&str> = all().iter().map(|r| r.name).collect();
        return Err(Error::InvalidArgument(format!("unknown method '{name}'; expected one of {}", names.join(", "))));
    };
    let mut cfg = m.recipe(name, size)?;
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
        assert_eq!(all().len(), 8);
        for m in all().iter().map(|r| r.name) {
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
