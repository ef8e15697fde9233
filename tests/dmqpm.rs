//! DM-QPMNet as a model kind: it trains through the one training loop and segments
//! held-out images, its baselines run from the same code, the comparison runs end to end,
//! and bad inputs get clear errors.

use lumos::dmqpm::net::{DmQpmConfig, FusionOp, Variant};
use lumos::engine::metrics;
use lumos::engine::model::{Model, ModelKind, SegmentOptions};
use lumos::engine::progress::Monitor;
use lumos::engine::train::{TrainConfig, evaluate_samples, train};
use lumos::sim::ssqpm::{SsqpmConfig, write_dataset};

fn small(arch: DmQpmConfig, seed: u64) -> TrainConfig {
    TrainConfig {
        kind: "dmqpm".into(),
        dmqpm: arch,
        epochs: 10,
        iterations_per_epoch: 15,
        batch_size: 4,
        patch_size: [64, 64],
        val_fraction: 0.0,
        seed,
        device: "cpu".into(),
        ..Default::default()
    }
}

fn arch() -> DmQpmConfig {
    DmQpmConfig { n_stages: 4, base_features: 8, max_features: 64, heads: 2, ..Default::default() }
}

#[test]
fn dm_qpmnet_learns_to_segment_held_out_images() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 10, 3, &SsqpmConfig { size: 96, ..Default::default() }, 11).unwrap();
    let out = dir.path().join("dm.lumos");
    let res = train(&small(arch(), 3), &dir.path().join("train"), &out, &mut Monitor::none()).unwrap();
    let model = Model::load(&out, tch::Device::Cpu).unwrap();
    assert_eq!(model.meta.kind, ModelKind::Dmqpm);
    // per-modality normalization is stored: angles by training-set z-score, phase by quantiles
    let norm = serde_json::to_value(&model.meta.normalization).unwrap();
    let methods: Vec<&str> =
        norm["channels"].as_array().unwrap().iter().map(|c| c["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["dataset_zscore", "dataset_zscore", "dataset_zscore", "dataset_zscore", "robust_quantile"]);
    let test = lumos::engine::dataset::load_folder(&dir.path().join("test")).unwrap();
    let refs: Vec<_> = test.iter().collect();
    let s = metrics::summarize(&evaluate_samples(&model, &refs).unwrap());
    println!("DM-QPMNet held-out Dice {} IoU {}", s.mean_fg_dice, s.mean_fg_iou);
    assert!(s.mean_fg_dice.mean > 0.7, "held-out Dice {} is below 0.7", s.mean_fg_dice);
    // the reloaded model segments exactly as the trained one, also on tiles larger than
    // the training patch (the attention runs over all tokens of the tile)
    for tile in [None, Some([96, 96])] {
        let o = SegmentOptions { tile, ..Default::default() };
        let a = res.model.segment_labels(test[0].image.data.view(), &o).unwrap();
        let b = model.segment_labels(test[0].image.data.view(), &o).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn same_seed_gives_the_same_dm_qpmnet() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 3, 0, &SsqpmConfig { size: 64, ..Default::default() }, 2).unwrap();
    let mut cfg =
        small(DmQpmConfig { n_stages: 3, base_features: 4, max_features: 16, fusion_stage: 1, heads: 2, ..arch() }, 5);
    cfg.epochs = 2;
    cfg.iterations_per_epoch = 3;
    cfg.patch_size = [32, 32];
    let w = |name: &str| {
        let out = dir.path().join(name);
        train(&cfg, &dir.path().join("train"), &out, &mut Monitor::none()).unwrap();
        let f = lumos::engine::weights::load(&out).unwrap();
        f.tensors.iter().map(|(n, t)| (n.clone(), Vec::<f32>::try_from(t.view([-1])).unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(w("a.lumos"), w("b.lumos"));
}

#[test]
fn dmqpm_rejects_data_without_five_channels_and_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    // a 2-channel data set
    let d = dir.path().join("two");
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    let img = lumos::Image::new(ndarray::Array3::<f32>::from_shape_fn((2, 32, 32), |(c, y, x)| (c + y + x) as f32));
    lumos::io::tiff::write_image_f32(&d.join("images/a.tif"), &img).unwrap();
    let m = ndarray::Array2::<u8>::from_shape_fn((32, 32), |(y, _)| (y > 16) as u8);
    lumos::io::tiff::write_mask_u8(&d.join("masks/a.tif"), &m).unwrap();
    let mut cfg = small(arch(), 0);
    cfg.patch_size = [32, 32];
    let e = train(&cfg, &d, &dir.path().join("x.lumos"), &mut Monitor::none()).err().unwrap().to_string();
    assert!(e.contains("5 input channels") && e.contains("2"), "{e}");
    assert!(!dir.path().join("x.lumos").exists(), "no model file after a failed training");
    // invalid architecture options are named
    let bad = TrainConfig { dmqpm: DmQpmConfig { fusion_stage: 3, n_stages: 4, ..arch() }, ..cfg.clone() };
    assert!(bad.validate().unwrap_err().to_string().contains("fusion_stage"));
    let bad = TrainConfig {
        dmqpm: DmQpmConfig { variant: Variant::EarlyFusion, channels: vec![5], ..arch() },
        ..cfg.clone()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("channels"));
    let ok = TrainConfig { dmqpm: DmQpmConfig { fusion: FusionOp::Concat, heads: 3, ..arch() }, ..cfg };
    ok.validate().unwrap(); // heads do not matter without attention
    // a JSON config names the unknown field
    let e = TrainConfig::from_json(r#"{"kind": "dmqpm", "dmqpm": {"fusion_stag": 2}}"#).unwrap_err().to_string();
    assert!(e.contains("fusion_stag"), "{e}");
}
