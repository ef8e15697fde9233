//! The papers' comparisons (a crate of the workspace apart from the shipped library): each method against its baselines on simulated data, with the tables of
//! docs/results.
pub mod dmqpm;
pub mod musplit;
pub mod pgdiff;

use std::path::Path;

use lumos::engine::device::parse_device;
use lumos::engine::model::Model;
use lumos::engine::train::TrainConfig;

/// Reuses a model file left by an earlier run when it was trained by this lumos version
/// with exactly `tc` (all epochs done): comparisons resume instead of retraining.
/// Returns the model and its recorded training time.
pub fn reuse_trained(path: &Path, tc: &TrainConfig) -> Option<(Model, f64)> {
    if !path.is_file() {
        return None;
    }
    let m = Model::load(path, parse_device(&tc.device).ok()?).ok()?;
    let p = &m.meta.provenance;
    let same = p.lumos_version == env!("CARGO_PKG_VERSION")
        && p.train_config == serde_json::to_value(tc).ok()?
        && !p.history.is_empty();
    let secs = p.wall_seconds;
    same.then(|| {
        log::info!("reusing '{}' (same configuration, trained in {secs:.0} s)", path.display());
        (m, secs)
    })
}
