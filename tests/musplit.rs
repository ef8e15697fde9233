//! muSplit (the decompose verb) on tiny configurations: simulate, train, save, load,
//! decompose; determinism, resume, tiling options and errors.

use std::path::Path;

use lumos::Model;
use lumos::engine::model::{ModelKind, SegmentOptions};
use lumos::engine::progress::Monitor;
use lumos::engine::train::{TrainConfig, train};
use lumos::musplit::{DecomposeOptions, evaluate_split, load_split_folder};
use lumos::sim::fluo::{FluoConfig, StructurePair, write_dataset};
use ndarray::Axis;
use tch::Device;

fn config(variant: &str, lc_levels: usize, epochs: usize) -> TrainConfig {
    TrainConfig::from_json(&format!(
        r#"{{"kind": "musplit",
            "musplit": {{"variant": "{variant}", "levels": 3, "lc_levels": {lc_levels}, "base_channels": 4,
                        "max_channels": 8, "z_dim": 2, "lr_patience": 1}},
            "epochs": {epochs}, "iterations_per_epoch": 3, "batch_size": 4, "patch_size": [16, 16],
            "val_fraction": 0.34, "seed": 5, "device": "cpu", "threads": 1}}"#
    ))
    .unwrap()
}

fn data(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("fluo");
    let cfg = FluoConfig { size: 48, pair: StructurePair::ActinTubulin, ..Default::default() };
    write_dataset(&d, 3, 1, &cfg, 3).unwrap();
    d
}

fn max_diff(a: &ndarray::Array3<f32>, b: &ndarray::Array3<f32>) -> f32 {
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn train_save_load_decompose_unet_with_lc() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let out = dir.path().join("split.lumos");
    let cfg = config("unet", 2, 2);
    let run = train(&cfg, &d, &out, &mut Monitor::none()).unwrap();
    assert_eq!(run.history.len(), 2);
    assert!(run.history.iter().all(|h| h.val_psnr.is_some_and(|p| p.is_finite())));
    let m = Model::load(&out, Device::Cpu).unwrap();
    assert_eq!(m.meta.kind, ModelKind::Musplit);
    assert_eq!(m.meta.classes, vec!["actin", "tubulin"]);
    assert!(m.meta.target_normalization.is_some());

    let test = load_split_folder(&d.join("test")).unwrap();
    let frame = test[0].input.data.index_axis(Axis(0), 0);
    let a = run.model.decompose_array(frame, &DecomposeOptions::default()).unwrap();
    let b = m.decompose_array(frame, &DecomposeOptions::default()).unwrap();
    assert_eq!(a.dim(), (2, 48, 48));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(max_diff(&a, &b), 0.0, "the reloaded model decomposes differently");
    // a frame that is not a multiple of the grid, smaller than a tile, and a larger tile
    let odd = frame.slice(ndarray::s![..13, ..29]);
    assert_eq!(m.decompose_array(odd, &DecomposeOptions::default()).unwrap().dim(), (2, 13, 29));
    let outer = m.decompose_array(frame, &DecomposeOptions::outer_padding(16, 2)).unwrap();
    assert!(outer.iter().all(|v| v.is_finite()));
    let mirrored =
        m.decompose_array(frame, &DecomposeOptions { mirror: true, keep: Some(8), ..Default::default() }).unwrap();
    assert!(mirrored.iter().all(|v| v.is_finite()));
    // scores exist for each channel
    let s = evaluate_split(&m, &test.iter().collect::<Vec<_>>(), &DecomposeOptions::default()).unwrap();
    assert_eq!(s[0].psnr.len(), 2);
    assert!(s[0].ssim.iter().all(|v| (-1.0..=1.0).contains(v)));

    // the verbs a decomposition model does not have, and bad options
    let x5 = ndarray::Array3::<f32>::zeros((1, 16, 16));
    let e = m.segment_labels(x5.view(), &SegmentOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    let e = m.decompose_array(frame, &DecomposeOptions { tile: Some(10), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("multiple of 4"), "{e}");
    let e = m.decompose_array(frame, &DecomposeOptions { keep: Some(7), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("even"), "{e}");
    let mut nan = frame.to_owned();
    nan[[3, 4]] = f32::NAN;
    assert!(
        m.decompose_array(nan.view(), &DecomposeOptions::default())
            .unwrap_err()
            .to_string()
            .contains("row 3, column 4")
    );
}

#[test]
fn same_seed_same_model_and_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path());
    let cfg = config("hvae", 1, 2);
    let (p1, p2) = (dir.path().join("a.lumos"), dir.path().join("b.lumos"));
    train(&cfg, &d, &p1, &mut Monitor::none()).unwrap();
    // the second run stops after one epoch, then resumes from its checkpoint
    let one = TrainConfig { epochs: 1, ..cfg.clone() };
    let p2_ckpt = dir.path().join("b.ckpt");
    train(&TrainConfig { checkpoint: Some(p2_ckpt.clone()), ..one }, &d, &p2, &mut Monitor::none()).unwrap();
    train(&TrainConfig { checkpoint: Some(p2_ckpt), resume: true, ..cfg.clone() }, &d, &p2, &mut Monitor::none())
        .unwrap();
    let (a, b) = (lumos::engine::weights::load(&p1).unwrap(), lumos::engine::weights::load(&p2).unwrap());
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let d = (t - &b.tensors[name]).abs().max().double_value(&[]);
        assert_eq!(d, 0.0, "weight {name} differs between the straight and the resumed run");
    }
    // stochastic decomposition: same seed, same output; another seed, another sample;
    // averaging samples (MMSE) is smoother than one sample
    let m = Model::load(&p1, Device::Cpu).unwrap();
    let test = load_split_folder(&d.join("test")).unwrap();
    let frame = test[0].input.data.index_axis(Axis(0), 0);
    let o = |seed, samples| DecomposeOptions { seed, samples, ..Default::default() };
    let s1 = m.decompose_array(frame, &o(1, 1)).unwrap();
    assert_eq!(max_diff(&s1, &m.decompose_array(frame, &o(1, 1)).unwrap()), 0.0);
    assert!(max_diff(&s1, &m.decompose_array(frame, &o(2, 1)).unwrap()) > 0.0);
    let mmse = m.decompose_array(frame, &o(1, 4)).unwrap();
    assert!(mmse.iter().all(|v| v.is_finite()));
}

#[test]
fn user_data_as_two_structure_folders() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pairs");
    for (i, sub) in ["structure1", "structure2"].iter().enumerate() {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        for n in 0..2 {
            let a = ndarray::Array3::from_shape_fn((1, 20, 24), |(_, y, x)| ((y * 3 + x * (i + 1) + n) % 7) as f32);
            lumos::io::tiff::write_image_f32(&root.join(sub).join(format!("im{n}.tif")), &lumos::image::Image::new(a))
                .unwrap();
        }
    }
    let s = load_split_folder(&root).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].targets.channels(), 2);
    let sum = &s[1].targets.data.index_axis(Axis(0), 0) + &s[1].targets.data.index_axis(Axis(0), 1);
    assert_eq!(s[1].input.data.index_axis(Axis(0), 0), sum);
    // a missing partner is named
    std::fs::remove_file(root.join("structure2/im1.tif")).unwrap();
    let e = load_split_folder(&root).unwrap_err().to_string();
    assert!(e.contains("im1"), "{e}");
    // no data at all
    let e = load_split_folder(dir.path()).unwrap_err().to_string();
    assert!(e.contains("targets/"), "{e}");
}
