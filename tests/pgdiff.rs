//! PG-DiffSeg: DDIM steps against diffusers, and a tiny model trained, saved, reloaded
//! and used to segment.

use std::collections::VecDeque;

use lumos::engine::model::ModelKind;
use lumos::engine::progress::{CancelToken, Monitor};
use lumos::engine::train::{TrainConfig, train};
use lumos::pgdiff::ddim::{self, Schedule};
use lumos::pgdiff::{DiffusionOptions, PgDiffConfig, PgDiffNet, StartNoise};
use lumos::{Model, SegmentOptions};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Case {
    kind: String,
    eta: f64,
    timesteps: Vec<usize>,
    x: Vec<f64>,
    eps: Vec<Vec<f64>>,
    noise: Vec<Vec<f64>>,
    result: Vec<f64>,
}

#[derive(Deserialize)]
struct Fixture {
    diffusers_version: String,
    shape: Vec<i64>,
    steps: usize,
    alphas_cumprod: Vec<f64>,
    cases: Vec<Case>,
}

/// The fixture holds diffusers' DDIMScheduler / DDIMInverseScheduler outputs for seeded
/// epsilon and noise sequences (tests/python/ddim_reference.py wrote it; rerun that
/// script to regenerate). The engine, fed the same sequences, must land on the same
/// values to float tolerance (diffusers keeps its schedule in float32).
#[test]
fn ddim_sampling_and_inversion_match_diffusers() {
    let fx: Fixture =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/ddim_diffusers.json").unwrap()).unwrap();
    assert!(!fx.diffusers_version.is_empty());
    let s = Schedule::ldm();
    assert_eq!(fx.alphas_cumprod.len(), s.len());
    let worst = s.alphas_cumprod.iter().zip(&fx.alphas_cumprod).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-6, "alphas_cumprod differ by {worst}");
    let t = |v: &[f64]| Tensor::from_slice(v).view(fx.shape.as_slice());
    assert_eq!(fx.cases.len(), 3);
    for case in &fx.cases {
        let mut eps: VecDeque<(usize, Tensor)> =
            case.timesteps.iter().copied().zip(case.eps.iter().map(|e| t(e))).collect();
        let mut noise: VecDeque<Tensor> = case.noise.iter().map(|n| t(n)).collect();
        let mut eps_fn = |_x: &Tensor, step: usize| {
            let (expected_t, e) = eps.pop_front().expect("one epsilon per step");
            assert_eq!(step, expected_t, "{} visits timesteps in diffusers' order", case.kind);
            Ok(e)
        };
        let x0 = t(&case.x);
        let out = match case.kind.as_str() {
            "sample" => {
                let mut noise_fn = || noise.pop_front().expect("one noise per stochastic step");
                ddim::sample(&s, fx.steps, case.eta, &x0, &mut eps_fn, &mut noise_fn, &Monitor::none()).unwrap()
            }
            "invert" => ddim::invert(&s, fx.steps, &x0, &mut eps_fn, &Monitor::none()).unwrap(),
            other => panic!("unknown case {other}"),
        };
        let want = t(&case.result);
        let err = (&out - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(err < 1e-5 * scale.max(1.0), "{} eta {}: max error {err} (values up to {scale})", case.kind, case.eta);
        assert!(eps.is_empty(), "every epsilon consumed");
    }
}

fn tiny_config(seed: u64) -> TrainConfig {
    TrainConfig {
        kind: "pgdiff".into(),
        pgdiff: PgDiffConfig::tiny(),
        epochs: 2,
        iterations_per_epoch: 4,
        batch_size: 4,
        patch_size: [32, 32],
        val_fraction: 0.25,
        seed,
        device: "cpu".into(),
        ..Default::default()
    }
}

#[test]
fn tiny_model_trains_saves_reloads_and_segments_deterministically() {
    use lumos::sim::qpi::{QpiConfig, write_dataset};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 4, 1, &QpiConfig { size: 64, ..Default::default() }, 9).unwrap();
    let out = dir.path().join("pg.lumos");
    let cfg = tiny_config(5);
    let trained = train(&cfg, &data.join("train"), &out, &mut Monitor::none()).unwrap();
    // 1 autoencoder epoch + 2 diffusion epochs, each checkpointed
    assert_eq!(trained.history.len(), 3);
    assert!(trained.history[0].val_psnr.is_some(), "the autoencoder epoch reports its reconstruction PSNR");
    assert!(trained.history[2].val_dice.is_finite(), "diffusion epochs report validation Dice");
    let m1 = trained.model;
    assert_eq!(m1.meta.kind, ModelKind::Pgdiff);
    assert_eq!(m1.meta.classes, vec!["background", "live", "dead"]);
    assert!(dir.path().join("pg.lumos.ckpt").is_file());
    // the latent scale was fitted (1 / std of the latents), not left at 1
    let scale = m1.with_net(|n| n.downcast::<PgDiffNet>().expect("pgdiff net").latent_scale.double_value(&[0]));
    assert!(scale.is_finite() && scale > 0.0 && (scale - 1.0).abs() > 1e-6, "latent_scale {scale}");

    let img = lumos::io::tiff::read_image(&data.join("test/images/qpi_0000.tif")).unwrap();
    let m2 = Model::load(&out, Device::Cpu).unwrap();
    let seg = |m: &Model, d: DiffusionOptions| {
        let o = SegmentOptions { diffusion: Some(d), ..Default::default() };
        m.segment_labels(img.data.view(), &o).unwrap()
    };
    let prior = DiffusionOptions { inversion_steps: 8, sampling_steps: 8, ..Default::default() };
    let a = seg(&m1, prior);
    assert!(a.iter().all(|&v| v < 3));
    assert_eq!(a, seg(&m2, prior), "the reloaded model segments identically");
    assert_eq!(a, seg(&m2, prior), "prior start with eta 0 is deterministic");
    let random = DiffusionOptions {
        start: StartNoise::Random,
        samples: 3,
        eta: 0.5,
        sampling_steps: 6,
        seed: 4,
        ..Default::default()
    };
    assert_eq!(seg(&m1, random), seg(&m2, random), "random starts are reproducible for a seed");
    let fwd = DiffusionOptions { start: StartNoise::Forward, forward_t: 300, sampling_steps: 6, ..Default::default() };
    assert_eq!(seg(&m1, fwd), seg(&m2, fwd));
    // the model's saved sampling is what plain segment uses
    assert_eq!(m2.diffusion_defaults().unwrap(), PgDiffConfig::tiny().sampling);
    let d = m2.segment_labels(img.data.view(), &SegmentOptions::default()).unwrap();
    assert_eq!(d, seg(&m2, PgDiffConfig::tiny().sampling));

    // bad options name the field
    let bad = DiffusionOptions { sampling_steps: 0, ..Default::default() };
    let e =
        m2.segment_labels(img.data.view(), &SegmentOptions { diffusion: Some(bad), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("sampling_steps"), "{e}");
    let bad = DiffusionOptions { eta: 2.0, ..Default::default() };
    let e =
        m2.segment_labels(img.data.view(), &SegmentOptions { diffusion: Some(bad), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("eta"), "{e}");

    // cancelling stops the sampler
    let token = CancelToken::new();
    token.cancel();
    let mut mon = Monitor { progress: None, cancel: Some(token) };
    let mut labels = lumos::Mask::zeros((64, 64));
    let r = m2.segment(
        img.data.view(),
        &SegmentOptions::default(),
        lumos::engine::model::SegmentOutput::Labels(labels.view_mut()),
        &mut mon,
    );
    assert!(matches!(r, Err(lumos::Error::Cancelled)), "{r:?}");

    // DDIM round trip through the trained LDM-P: inverting an image latent then sampling
    // back reconstructs it, better with more steps
    let x = m2.meta.normalization.apply_image(&img).unwrap();
    let x = lumos::image::array3_to_tensor(x.data.view(), Device::Cpu).unsqueeze(0).narrow(2, 0, 32).narrow(3, 0, 32);
    let round_trip = |steps: usize| {
        m2.with_net(|n| {
            let net = n.downcast::<PgDiffNet>().expect("pgdiff net");
            let _g = tch::no_grad_guard();
            let z = net.encode(&x);
            let mut eps = |v: &Tensor, t: usize| Ok(net.eps_p(v, t));
            let n = ddim::invert(&net.schedule, steps, &z, &mut eps, &Monitor::none()).unwrap();
            let back = ddim::sample(&net.schedule, steps, 0.0, &n, &mut eps, &mut || unreachable!(), &Monitor::none())
                .unwrap();
            ((back - &z).square().sum(Kind::Double) / z.square().sum(Kind::Double)).sqrt().double_value(&[])
        })
    };
    let (e10, e200) = (round_trip(10), round_trip(200));
    assert!(e200 < 0.05, "relative round-trip error with 200 steps: {e200}");
    assert!(e200 <= e10 + 1e-3, "more steps should not reconstruct worse: {e10} -> {e200}");
}

#[test]
fn resume_continues_to_the_same_model() {
    use lumos::sim::qpi::{QpiConfig, write_dataset};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 3, 0, &QpiConfig { size: 48, ..Default::default() }, 2).unwrap();
    let cfg = TrainConfig { val_fraction: 0.0, epochs: 2, ..tiny_config(1) };
    let full = dir.path().join("full.lumos");
    train(&cfg, &data.join("train"), &full, &mut Monitor::none()).unwrap();
    // stop after the autoencoder epoch and the first diffusion epoch, then resume
    let part = dir.path().join("part.lumos");
    let short = TrainConfig { epochs: 1, ..cfg.clone() };
    train(&short, &data.join("train"), &part, &mut Monitor::none()).unwrap();
    let resumed = TrainConfig { resume: true, checkpoint: Some(dir.path().join("part.lumos.ckpt")), ..cfg.clone() };
    train(&resumed, &data.join("train"), &part, &mut Monitor::none()).unwrap();
    let a = lumos::engine::weights::load(&full).unwrap();
    let b = lumos::engine::weights::load(&part).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        assert!(t.equal(u), "{name} differs after resume");
    }
}
