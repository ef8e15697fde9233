//! Training end to end on tiny simulated ssQPM data: a model that clears a Dice threshold
//! on held-out images, reproducibility from the seed, and resuming from a checkpoint.

use std::path::Path;

use lumos::engine::metrics;
use lumos::engine::model::{Model, SegmentOptions};
use lumos::engine::progress::Monitor;
use lumos::engine::train::{TrainConfig, evaluate_samples, train};
use lumos::nnunet::net::UnetConfig;
use lumos::sim::ssqpm::{SsqpmConfig, write_dataset};

fn tiny(seed: u64, epochs: usize, iters: usize) -> TrainConfig {
    TrainConfig {
        unet: UnetConfig { n_stages: 3, base_features: 4, max_features: 16, convs_per_stage: 2 },
        epochs,
        iterations_per_epoch: iters,
        batch_size: 2,
        patch_size: [32, 32],
        seed,
        device: "cpu".into(),
        ..Default::default()
    }
}

fn weights_of(m: &Model, path: &Path) -> Vec<(String, Vec<f32>)> {
    m.save(path).unwrap();
    let f = lumos::engine::weights::load(path).unwrap();
    f.tensors.iter().map(|(n, t)| (n.clone(), Vec::<f32>::try_from(t.view([-1])).unwrap())).collect()
}

#[test]
fn tiny_model_learns_to_segment_held_out_images() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SsqpmConfig { size: 96, ..Default::default() };
    write_dataset(dir.path(), 10, 3, &cfg, 11).unwrap();
    let tc = TrainConfig {
        unet: UnetConfig { n_stages: 4, base_features: 8, max_features: 64, convs_per_stage: 2 },
        epochs: 12,
        iterations_per_epoch: 15,
        batch_size: 4,
        patch_size: [64, 64],
        seed: 3,
        device: "cpu".into(),
        ..Default::default()
    };
    let out = dir.path().join("m.lumos");
    let res = train(&tc, &dir.path().join("train"), &out, &mut Monitor::none()).unwrap();
    assert_eq!(res.history.len(), 12);
    assert!(dir.path().join("m.lumos.train.json").is_file(), "the run is recorded");
    let test = lumos::engine::dataset::load_folder(&dir.path().join("test")).unwrap();
    let refs: Vec<_> = test.iter().collect();
    let model = Model::load(&out, tch::Device::Cpu).unwrap();
    let scores = evaluate_samples(&model, &refs).unwrap();
    let s = metrics::summarize(&scores);
    println!("held-out Dice {} IoU {}", s.mean_fg_dice, s.mean_fg_iou);
    assert!(s.mean_fg_dice.mean > 0.75, "held-out Dice {} is below 0.75", s.mean_fg_dice);
    // the model file describes itself
    assert_eq!(model.meta.input_channels, vec!["I0", "I45", "I90", "I135", "phase"]);
    assert_eq!(model.meta.classes, vec!["background", "cell"]);
    assert_eq!(model.meta.provenance.epochs_completed, 12);
    assert_eq!(model.meta.provenance.seed, 3);
    // segmenting a reloaded model equals segmenting the trained one
    let a = res.model.segment_labels(test[0].image.data.view(), &SegmentOptions::default()).unwrap();
    let b = model.segment_labels(test[0].image.data.view(), &SegmentOptions::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn same_seed_same_model_and_resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 4, 0, &SsqpmConfig { size: 48, ..Default::default() }, 2).unwrap();
    let data = dir.path().join("train");
    let run = |name: &str, cfg: &TrainConfig| {
        let out = dir.path().join(name);
        let m = train(cfg, &data, &out, &mut Monitor::none()).unwrap().model;
        weights_of(&m, &dir.path().join(format!("{name}.copy")))
    };
    let a = run("a.lumos", &tiny(9, 2, 3));
    let b = run("b.lumos", &tiny(9, 2, 3));
    assert_eq!(a, b, "same seed, same weights");
    let c = run("c.lumos", &tiny(10, 2, 3));
    assert_ne!(a, c, "another seed, other weights");

    // one epoch, then resume to two: identical to the uninterrupted run
    let mut first = tiny(9, 1, 3);
    first.checkpoint = Some(dir.path().join("r.ckpt"));
    run("r1.lumos", &first);
    let mut resumed = tiny(9, 2, 3);
    resumed.checkpoint = Some(dir.path().join("r.ckpt"));
    resumed.resume = true;
    let r = run("r2.lumos", &resumed);
    assert_eq!(a, r, "resumed run equals the uninterrupted run");
}

/// Resuming continues the checkpoint's run: another seed (another split, other batches),
/// learning rate or data is refused with a message that names what differs; device,
/// threads and epochs may change.
#[test]
fn resume_refuses_other_settings_and_other_data() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 4, 0, &SsqpmConfig { size: 48, ..Default::default() }, 2).unwrap();
    let data = dir.path().join("train");
    let ckpt = dir.path().join("r.ckpt");
    let out = dir.path().join("r.lumos");
    let first = TrainConfig { checkpoint: Some(ckpt.clone()), ..tiny(9, 1, 2) };
    train(&first, &data, &out, &mut Monitor::none()).unwrap();
    let resume = |cfg: TrainConfig, data: &Path| {
        let cfg = TrainConfig { resume: true, checkpoint: Some(ckpt.clone()), ..cfg };
        train(&cfg, data, &out, &mut Monitor::none()).map(|_| ()).map_err(|e| e.to_string())
    };
    let e = resume(tiny(10, 2, 2), &data).unwrap_err();
    assert!(e.contains("seed: 9 in the checkpoint, 10 now"), "{e}");
    let e = resume(TrainConfig { learning_rate: 0.5, ..tiny(9, 2, 2) }, &data).unwrap_err();
    assert!(e.contains("learning_rate"), "{e}");
    // the same settings on other images: another fitted normalization
    let other = tempfile::tempdir().unwrap();
    write_dataset(other.path(), 4, 0, &SsqpmConfig { size: 48, ..Default::default() }, 77).unwrap();
    let e = resume(tiny(9, 2, 2), &other.path().join("train")).unwrap_err();
    assert!(e.contains("training data changed"), "{e}");
    // more epochs and another thread count: allowed
    resume(TrainConfig { threads: 2, ..tiny(9, 2, 2) }, &data).unwrap();
}

/// Unwritable destinations are refused before any work, not after the first epoch.
#[test]
fn output_and_checkpoint_paths_are_checked_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let err = |cfg: &TrainConfig, out: &Path| {
        train(cfg, dir.path(), out, &mut Monitor::none()).map(|_| ()).unwrap_err().to_string()
    };
    let e = err(&tiny(1, 1, 1), dir.path());
    assert!(e.contains("is a directory"), "{e}");
    let e = err(&tiny(1, 1, 1), &dir.path().join("missing").join("m.lumos"));
    assert!(e.contains("does not exist"), "{e}");
    let cfg = TrainConfig { checkpoint: Some(dir.path().join("nowhere").join("c.ckpt")), ..tiny(1, 1, 1) };
    let e = err(&cfg, &dir.path().join("m.lumos"));
    assert!(e.contains("checkpoint path") && e.contains("does not exist"), "{e}");
}

#[test]
fn cancelled_training_keeps_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 3, 0, &SsqpmConfig { size: 48, ..Default::default() }, 4).unwrap();
    let token = lumos::engine::progress::CancelToken::new();
    let t2 = token.clone();
    let mut cb = move |p: &lumos::engine::progress::Progress| {
        if p.stage == lumos::engine::progress::Stage::Checkpoint && p.epoch == 1 {
            t2.cancel();
        }
    };
    let mut mon = Monitor { progress: Some(&mut cb), cancel: Some(token) };
    let out = dir.path().join("m.lumos");
    let r = train(&tiny(1, 5, 2), &dir.path().join("train"), &out, &mut mon);
    assert!(matches!(r, Err(lumos::Error::Cancelled)));
    assert!(!out.exists(), "no final model for a cancelled run");
    let ck = Model::load(&dir.path().join("m.lumos.ckpt"), tch::Device::Cpu).unwrap();
    assert_eq!(ck.meta.provenance.epochs_completed, 2);
    // no temporary files are left behind
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".lumos-tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn bad_training_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |c: &TrainConfig, d: &Path| {
        train(c, d, &dir.path().join("x.lumos"), &mut Monitor::none()).err().unwrap().to_string()
    };
    assert!(err(&tiny(0, 1, 1), &dir.path().join("missing")).contains("images/"));
    let mut c = tiny(0, 1, 1);
    c.patch_size = [30, 30];
    assert!(err(&c, dir.path()).contains("multiples of 4"));
    assert!(TrainConfig::from_json("{\"epochs\": -1}").is_err());
    assert!(TrainConfig::from_json("{\"learning_rate\": 1e9}").unwrap_err().to_string().contains("learning_rate"));
    assert!(TrainConfig::from_json("{\"kind\": \"resnet\"}").unwrap_err().to_string().contains("unknown model kind"));
    // an image without its mask
    std::fs::create_dir_all(dir.path().join("d/images")).unwrap();
    std::fs::create_dir_all(dir.path().join("d/masks")).unwrap();
    let img = lumos::Image::new(ndarray::Array3::zeros((5, 32, 32)));
    lumos::io::tiff::write_image_f32(&dir.path().join("d/images/a.tif"), &img).unwrap();
    assert!(err(&tiny(0, 1, 1), &dir.path().join("d")).contains("has no mask"));
}
