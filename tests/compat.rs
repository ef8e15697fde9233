//! Model files and training checkpoints written by an earlier engine still load and give
//! the same outputs.
//!
//! `tests/fixtures/compat/<case>/` holds, for each model kind, files written by the engine
//! of commit b1087d4 (before the restructure of issue 29): the training data (`data/`),
//! the run's config (`config.json`), the checkpoint after its first epoch
//! (`checkpoint.ckpt`), the model after its second epoch (`model.lumos`, trained by
//! resuming from that checkpoint) and that model's output on the first training image
//! (`expected.npy`: class probabilities `(K, H, W)`, or the two decomposed structures).
//! Two checks per case: the model file gives `expected.npy`, and resuming from the
//! checkpoint gives a model that does.
//!
//! `LUMOS_WRITE_COMPAT_FIXTURES=1 cargo test --test compat -- --ignored write_fixtures`
//! writes them anew (only to be done when the file formats change on purpose).

use std::path::{Path, PathBuf};

use ndarray::{Array3, Axis};
use tch::Device;

use lumos::engine::model::{Model, ModelKind, SegmentOptions, SegmentOutput};
use lumos::engine::progress::Monitor;
use lumos::engine::train::{TrainConfig, train};
use lumos::musplit::DecomposeOptions;

const CASES: [&str; 5] = ["unet", "dmqpm", "musplit-unet", "musplit-hvae", "pgdiff"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compat")
}

/// The run of `case`: tiny networks, two epochs, one thread (the outputs are compared
/// across processes).
fn config(case: &str) -> TrainConfig {
    let common =
        r#""epochs": 2, "iterations_per_epoch": 2, "val_fraction": 0.34, "seed": 3, "device": "cpu", "threads": 1"#;
    let json = match case {
        "unet" => format!(
            r#"{{"kind": "unet", "unet": {{"n_stages": 3, "base_features": 4, "max_features": 8, "convs_per_stage": 1}},
                "batch_size": 2, "patch_size": [32, 32], {common}}}"#
        ),
        "dmqpm" => format!(
            r#"{{"kind": "dmqpm", "dmqpm": {{"n_stages": 3, "base_features": 4, "max_features": 8, "heads": 2, "fusion_stage": 1}},
                "batch_size": 2, "patch_size": [32, 32], {common}}}"#
        ),
        "musplit-unet" | "musplit-hvae" => format!(
            r#"{{"kind": "musplit",
                "musplit": {{"variant": "{}", "levels": 3, "lc_levels": 1, "base_channels": 4, "max_channels": 8,
                             "z_dim": 2, "lr_patience": 0}},
                "batch_size": 2, "patch_size": [16, 16], {common}}}"#,
            case.trim_start_matches("musplit-")
        ),
        "pgdiff" => {
            let mut c = TrainConfig {
                kind: "pgdiff".into(),
                pgdiff: lumos::pgdiff::PgDiffConfig::tiny(),
                ..Default::default()
            };
            c.pgdiff.ae_epochs = 1;
            c.epochs = 2;
            c.iterations_per_epoch = 2;
            c.batch_size = 2;
            c.patch_size = [32, 32];
            c.val_fraction = 0.34;
            c.seed = 3;
            c.device = "cpu".into();
            c.threads = 1;
            return c;
        }
        other => panic!("unknown case {other}"),
    };
    TrainConfig::from_json(&json).unwrap()
}

/// The first epoch of a two-epoch run (`epochs` of the config less one): what the
/// checkpoint fixture holds.
fn first_epoch(cfg: &TrainConfig) -> TrainConfig {
    TrainConfig { epochs: cfg.epochs - 1, ..cfg.clone() }
}

fn output(model: &Model, data: &Path) -> Array3<f32> {
    if model.meta.kind == ModelKind::Musplit {
        let s = lumos::musplit::load_split_folder(data).unwrap();
        let opts = DecomposeOptions { seed: 1, ..Default::default() };
        return model.decompose_array(s[0].input.data.index_axis(Axis(0), 0), &opts).unwrap();
    }
    let s = lumos::engine::dataset::load_folder(data).unwrap();
    let img = &s[0].image.data;
    let mut out = Array3::<f32>::zeros((model.n_classes(), img.dim().1, img.dim().2));
    let opts = SegmentOptions {
        diffusion: model.meta.kind.eq(&ModelKind::Pgdiff).then(|| model.diffusion_defaults().unwrap()),
        ..Default::default()
    };
    model.segment(img.view(), &opts, SegmentOutput::Probabilities(out.view_mut()), &mut Monitor::none()).unwrap();
    out
}

fn max_diff(a: &Array3<f32>, b: &Array3<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn expected(case: &str) -> Array3<f32> {
    ndarray_npy::read_npy(fixtures().join(case).join("expected.npy")).unwrap()
}

/// Outputs of the same weights on the same machine agree to rounding; across the oneDNN
/// and libtorch convolution paths they differ in the last bits.
const TOL: f32 = 2e-4;

#[test]
fn model_files_of_the_earlier_engine_give_the_same_outputs() {
    for case in CASES {
        let dir = fixtures().join(case);
        let model = Model::load(&dir.join("model.lumos"), Device::Cpu).unwrap_or_else(|e| panic!("{case}: {e}"));
        let d = max_diff(&output(&model, &dir.join("data")), &expected(case));
        assert!(d <= TOL, "{case}: the model file's output moved by {d}");
    }
}

#[test]
fn checkpoints_of_the_earlier_engine_resume_to_the_same_model() {
    for case in CASES {
        let dir = fixtures().join(case);
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("run.ckpt");
        std::fs::copy(dir.join("checkpoint.ckpt"), &ckpt).unwrap();
        let saved: TrainConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(saved, config(case), "{case}: the fixture's config is this test's");
        let cfg = TrainConfig { checkpoint: Some(ckpt), resume: true, ..saved };
        let out = tmp.path().join("m.lumos");
        // the second epoch matters: the checkpoint's own weights give another output
        let before = Model::load(&dir.join("checkpoint.ckpt"), Device::Cpu).unwrap();
        let moved = max_diff(&output(&before, &dir.join("data")), &expected(case));
        assert!(moved > 10.0 * TOL, "{case}: the epoch after the checkpoint changed the output by only {moved}");
        let res = train(&cfg, &dir.join("data"), &out, &mut Monitor::none()).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(res.history.len(), res.model.meta.provenance.epochs_completed, "{case}");
        let model = Model::load(&out, Device::Cpu).unwrap();
        let d = max_diff(&output(&model, &dir.join("data")), &expected(case));
        assert!(d <= TOL, "{case}: the resumed model's output moved by {d}");
    }
}

#[test]
#[ignore = "writes the fixtures; run by hand when the formats change on purpose"]
fn write_fixtures() {
    assert!(
        std::env::var_os("LUMOS_WRITE_COMPAT_FIXTURES").is_some(),
        "set LUMOS_WRITE_COMPAT_FIXTURES=1 to overwrite the fixtures"
    );
    for case in CASES {
        let dir = fixtures().join(case);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sim = tempfile::tempdir().unwrap();
        match case {
            "unet" | "dmqpm" => {
                let c = lumos::sim::ssqpm::SsqpmConfig { size: 48, ..Default::default() };
                lumos::sim::ssqpm::write_dataset(sim.path(), 3, 1, &c, 7).unwrap();
            }
            "pgdiff" => {
                let c = lumos::sim::qpi::QpiConfig { size: 48, ..Default::default() };
                lumos::sim::qpi::write_dataset(sim.path(), 3, 1, &c, 7).unwrap();
            }
            _ => {
                let c = lumos::sim::fluo::FluoConfig { size: 40, ..Default::default() };
                lumos::sim::fluo::write_dataset(sim.path(), 3, 1, &c, 7).unwrap();
            }
        }
        let data = dir.join("data");
        std::fs::rename(sim.path().join("train"), &data).unwrap();
        let cfg = config(case);
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        let ckpt = dir.join("run.ckpt");
        let model = dir.join("model.lumos");
        train(
            &TrainConfig { checkpoint: Some(ckpt.clone()), ..first_epoch(&cfg) },
            &data,
            &model,
            &mut Monitor::none(),
        )
        .unwrap();
        std::fs::copy(&ckpt, dir.join("checkpoint.ckpt")).unwrap();
        train(
            &TrainConfig { checkpoint: Some(ckpt.clone()), resume: true, ..cfg },
            &data,
            &model,
            &mut Monitor::none(),
        )
        .unwrap();
        std::fs::remove_file(&ckpt).unwrap();
        {
            let f = "model.lumos.train.json";
            let _ = std::fs::remove_file(dir.join(f));
        }
        let m = Model::load(&model, Device::Cpu).unwrap();
        ndarray_npy::write_npy(dir.join("expected.npy"), &output(&m, &data)).unwrap();
    }
}
