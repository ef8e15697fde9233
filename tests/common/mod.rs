//! Shared by the CLI tests: a tiny nnU-Net trained on simulated ssQPM data.

use std::path::{Path, PathBuf};

/// Simulates `n_train` + `n_test` ssQPM frames of `size` pixels into `dir/data` and trains a
/// tiny nnU-Net on the training part (1 epoch of 2 iterations, CPU); returns the model path
/// and the test images folder.
pub fn tiny_nnunet(dir: &Path, size: usize, n_train: usize, n_test: usize, seed: u64) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    let sim = lumos::sim::ssqpm::SsqpmConfig { size, ..Default::default() };
    lumos::sim::ssqpm::write_dataset(&data, n_train, n_test, &sim, seed).unwrap();
    let model = dir.join("m.lumos");
    let mut cfg = lumos::recipes::recipe("nnunet", "tiny").unwrap();
    cfg.device = "cpu".into();
    cfg.val_fraction = 0.0;
    cfg.epochs = 1;
    cfg.iterations_per_epoch = 2;
    lumos::engine::train::train(&cfg, &data.join("train"), &model, &mut lumos::engine::progress::Monitor::none())
        .unwrap();
    (model, data.join("test").join("images"))
}
