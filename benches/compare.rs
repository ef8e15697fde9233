//! The engine side of the engine-vs-PyTorch comparison (issue 7): one measurement per
//! process, printed as one JSON line. `scripts/bench.sh` runs every measurement of the
//! plan twice, here and in `benches/peers/bench_peers.py` (the PyTorch peers), with the
//! same arguments, and `benches/peers/report.py` writes docs/benchmarks.md.
//!
//! ```text
//! compare --bench --model M --mode MODE [--size paper|tiny] [--device cpu|cuda|cuda:N]
//!         [--threads N] [--batch B] [--warmup W] [--reps R] [--frame N] [--steps I,S]
//!         [--breakdown] [--precision float32|bfloat16] --work DIR
//! ```
//!
//! - models: the recipe names of `lumos::recipes` (`dm-qpmnet`, `early-fusion`, `nnunet`,
//!   `musplit-unet`, `musplit-hvae`, `pg-diffseg`), built from `recipe(model, size)`:
//!   `paper` is the papers' sizes, `tiny` the smoke configuration.
//! - modes:
//!   - `train_step`: one optimization step of the engine's own trainer on a fixed batch
//!     (`nnunet::train::SegmentationStep`: forward with deep supervision, CE + Dice, backward,
//!     gradient-norm clip, SGD Nesterov; `musplit::train::DecompositionStep`: Adamax, clip by value;
//!     `pgdiff::train::DiffusionStep`, diffusion phase: LDM-P + LDM-S, Adam). `--breakdown` also
//!     times the forward pass + loss and forward + loss + backward alone (segmentation and
//!     muSplit kinds), so that the optimizer's share can be read off.
//!   - `inference`: the network forward without gradients on a batch of tiles of the
//!     training patch (PG-DiffSeg: one evaluation of LDM-P and one of LDM-S on the
//!     latents of the tiles, t = 500).
//!   - `segment_2048`: `Model::segment` of a simulated ssQPM frame (`--frame`, 2048 in the
//!     benchmark): sliding window, Gaussian blending, step 0.5, `--batch` tiles per
//!     forward pass, labels out.
//! - `--precision bfloat16`: inference modes run under bfloat16 autocast
//!   (`Model::set_precision`); training steps are always float32.
//!   - `decompose`: `Model::decompose` (muSplit inner-padding tiling, batch 16) of a
//!     simulated fluorescence frame of `--frame` pixels.
//!   - `pgdiff_tiles`: `PgDiffNet::predict` (encode, DDIM inversion with LDM-P, DDIM
//!     sampling with LDM-S, prior start, eta 0, clipping) on `--batch` tiles with
//!     `--steps inversion,sampling`; its warm-up runs 1 + 1 steps.
//!
//! Weights: seeded (seed 0); speed does not depend on them. The first process that needs
//! them writes the model file `DIR/MODEL/model.lumos` and each measurement's inputs
//! (`DIR/MODEL/MODE-bB-fF.safetensors`, simulated data, normalized as the trainer would),
//! so that the peer, run after it, loads the same weights and the same inputs.
//!
//! Timing: `--warmup` untimed repetitions, then `--reps` timed ones, each ended by a
//! device synchronization (CUDA); the JSON line has every time and the median. Peak
//! memory: the process's resident high-water mark (VmHWM) is reset (`/proc/self/clear_refs`)
//! after the model and inputs are ready, so `peak_rss_mib` is the peak of the measured work
//! (weights, activations, gradients, optimizer state included); on a GPU, scripts/bench.sh
//! samples the device memory of each process from outside (the engine has no allocator
//! statistics through tch).
//!
//! Outside `cargo bench` (no `--bench` argument, as `cargo test --all-targets` runs it)
//! it prints "skipped" and exits 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lumos::Image;
use lumos::backend::precision::with_precision;
use lumos::engine::model::{Model, ModelKind, ModelMeta, Precision, SegmentOptions, SegmentOutput};
use lumos::engine::normalize::{NormMethod, Normalizer};
use lumos::engine::progress::Monitor;
use lumos::engine::train::TrainConfig;
use lumos::musplit::DecomposeOptions;
use lumos::musplit::net::MuSplitNet;
use lumos::musplit::train::DecompositionStep;
use lumos::nnunet::train::SegmentationStep;
use lumos::pgdiff::train::DiffusionStep;
use lumos::pgdiff::{DiffusionOptions, PgDiffNet};
use ndarray::{Array2, Array3, Axis};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

type Res<T> = std::result::Result<T, String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

#[derive(Debug, Clone)]
struct Opts {
    model: String,
    mode: String,
    size: String,
    device: Device,
    threads: usize,
    batch: usize,
    warmup: usize,
    reps: usize,
    frame: usize,
    steps: (usize, usize),
    /// Sliding-window step as a fraction of the tile (segment_2048; nnU-Net's 0.5).
    step_fraction: f64,
    breakdown: bool,
    precision: Precision,
    work: PathBuf,
}

fn parse_args(args: &[String]) -> Res<Opts> {
    let mut kv: HashMap<String, String> = HashMap::new();
    let mut flags = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        if let Some(k) = a.strip_prefix("--") {
            if matches!(k, "bench" | "breakdown") {
                flags.push(k.to_string());
            } else {
                let v = args.get(i + 1).ok_or_else(|| format!("--{k} needs a value"))?;
                kv.insert(k.to_string(), v.clone());
                i += 1;
            }
        }
        i += 1;
    }
    let get = |k: &str, d: &str| kv.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: usize| -> Res<usize> { get(k, &d.to_string()).parse().map_err(|e| format!("--{k}: {e}")) };
    let steps = get("steps", "100,200");
    let (a, b) = steps.split_once(',').ok_or("--steps takes INVERSION,SAMPLING")?;
    let device = lumos::engine::device::parse_device(&get("device", "cpu")).map_err(err)?;
    let threads = match num("threads", 0)? {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    Ok(Opts {
        model: kv.get("model").cloned().ok_or("--model is required")?,
        mode: kv.get("mode").cloned().ok_or("--mode is required")?,
        size: get("size", "paper"),
        device,
        threads,
        batch: num("batch", 2)?,
        warmup: num("warmup", 1)?,
        reps: num("reps", 3)?,
        frame: num("frame", 2048)?,
        steps: (a.trim().parse().map_err(err)?, b.trim().parse().map_err(err)?),
        step_fraction: get("step-fraction", "0.5").parse().map_err(|e| format!("--step-fraction: {e}"))?,
        breakdown: flags.iter().any(|f| f == "breakdown"),
        precision: Precision::parse(&get("precision", "float32")).map_err(err)?,
        work: PathBuf::from(kv.get("work").cloned().ok_or("--work is required")?),
    })
}

// ---------------------------------------------------------------------------------------
// Memory and time

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(f64::NAN)
}

/// Resets the resident high-water mark to the current RSS (Linux >= 4.0); returns
/// whether it worked.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        f64::NAN
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// `warmup` untimed then `reps` timed calls of `f` (each followed by a device sync; `f`
/// is told whether it is a warm-up call). Returns the times and the first finite value
/// `f` returned (a check value: the first training loss, an output statistic).
fn timed(warmup: usize, reps: usize, device: Device, f: &mut dyn FnMut(bool) -> Res<f64>) -> Res<(Vec<f64>, f64)> {
    let mut first = f64::NAN;
    for _ in 0..warmup {
        let v = f(true)?;
        sync(device);
        if first.is_nan() {
            first = v;
        }
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let v = f(false)?;
        sync(device);
        times.push(t.elapsed().as_secs_f64());
        if first.is_nan() {
            first = v;
        }
    }
    Ok((times, first))
}

// ---------------------------------------------------------------------------------------
// Models and inputs

fn sim(modality: &str, size: usize, seed: u64) -> Res<lumos::sim::Frame> {
    lumos::sim::simulate_frame(modality, &format!(r#"{{"size": {size}}}"#), seed).map_err(err)
}

fn mask_of(truth: &Image) -> Tensor {
    // (1, H, W) float labels -> (H, W) int64
    lumos::image::array3_to_tensor(truth.data.view(), Device::Cpu).get(0).to_kind(Kind::Int64)
}

/// Frames the normalization is fitted on: the same for every measurement of a model, so
/// that every process builds the same model file.
const NORM_FRAMES: u64 = 4;

struct Built {
    cfg: TrainConfig,
    model: Model,
    /// Normalized training-like frames (musplit: the pool the crops come from).
    pool: Vec<(Tensor, Tensor)>,
}

fn modality(model: &str) -> &'static str {
    match model {
        "dm-qpmnet" | "early-fusion" | "angles-only" | "phase-only" => "ssqpm",
        "nnunet" | "pg-diffseg" => "qpi",
        _ => "fluo",
    }
}

fn build(o: &Opts) -> Res<Built> {
    let cfg = lumos::recipes::recipe(&o.model, &o.size).map_err(err)?;
    let kind = ModelKind::parse(&cfg.kind).map_err(err)?;
    let patch = cfg.patch_size;
    let m = modality(&o.model);
    // musplit draws its crops from frames larger than the patch
    let frame_size = if kind == ModelKind::Musplit { (4 * patch[0]).max(256) } else { patch[0] };
    let frames: Vec<lumos::sim::Frame> = (0..NORM_FRAMES).map(|i| sim(m, frame_size, 1000 + i)).collect::<Res<_>>()?;
    let images: Vec<&Image> = frames.iter().map(|f| &f.image).collect();
    let methods: Vec<NormMethod> = match kind {
        ModelKind::Dmqpm => {
            // DM-QPMNet's per-modality normalization (the trainer's default for ssQPM)
            let mut v = vec![NormMethod::DatasetZscore; 4];
            v.push(NormMethod::RobustQuantile { q_low: 0.005, q_high: 0.995 });
            v
        }
        ModelKind::Unet => vec![NormMethod::PerImageZscore],
        ModelKind::Pgdiff => vec![NormMethod::DatasetZscore],
        ModelKind::Musplit => vec![NormMethod::RobustQuantile { q_low: 0.0, q_high: 0.995 }],
    };
    let norm = Normalizer::fit(&methods, &images).map_err(err)?;
    let (architecture, classes) = match kind {
        ModelKind::Dmqpm => {
            (serde_json::to_value(&cfg.dmqpm).map_err(err)?, vec!["background".to_string(), "cell".to_string()])
        }
        ModelKind::Unet => (
            serde_json::to_value(&cfg.unet).map_err(err)?,
            lumos::sim::qpi::CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        ),
        ModelKind::Pgdiff => (
            serde_json::to_value(&cfg.pgdiff).map_err(err)?,
            lumos::sim::qpi::CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        ),
        ModelKind::Musplit => (serde_json::to_value(&cfg.musplit).map_err(err)?, frames[0].truth.channel_names.clone()),
    };
    let mut meta =
        ModelMeta::new(kind, architecture, frames[0].image.channel_names.clone(), classes, patch, norm.clone());
    let mut pool = Vec::new();
    if kind == ModelKind::Musplit {
        let truths: Vec<&Image> = frames.iter().map(|f| &f.truth).collect();
        let tg = Normalizer::fit(&[NormMethod::RobustQuantile { q_low: 0.0, q_high: 0.995 }], &truths).map_err(err)?;
        for f in &frames {
            let x = lumos::image::array3_to_tensor(norm.apply_image(&f.image).map_err(err)?.data.view(), Device::Cpu)
                .get(0);
            let y = lumos::image::array3_to_tensor(tg.apply_image(&f.truth).map_err(err)?.data.view(), Device::Cpu);
            pool.push((x, y));
        }
        meta.target_normalization = Some(tg);
    }
    let model = Model::new_seeded(meta, o.device, Some(0)).map_err(err)?;
    if kind == ModelKind::Pgdiff {
        // The diffusion U-Nets' output convs start at zero (openaimodel's zero_module), so
        // an untrained model predicts eps = 0 everywhere and the checks of the
        // measurements would compare zeros. Small random weights make them compare work.
        tch::no_grad(|| {
            tch::manual_seed(1);
            for (_, mut t) in model.variables() {
                if t.dim() >= 2 && t.abs().max().double_value(&[]) == 0.0 {
                    t.copy_(&(t.randn_like() * 0.02));
                }
            }
        });
    }
    Ok(Built { cfg, model, pool })
}

/// A batch of `b` normalized frames of the patch size and their labels (segmentation
/// kinds and PG-DiffSeg), from simulated frames with seeds `seed0..`.
fn frame_batch(model: &Model, modality: &str, b: usize, t: usize, seed0: u64) -> Res<(Tensor, Tensor)> {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..b {
        let f = sim(modality, t, seed0 + i as u64)?;
        let x = model.meta.normalization.apply_image(&f.image).map_err(err)?;
        xs.push(lumos::image::array3_to_tensor(x.data.view(), Device::Cpu));
        ys.push(mask_of(&f.truth));
    }
    Ok((Tensor::stack(&xs, 0), Tensor::stack(&ys, 0)))
}

/// muSplit: `b` random patches with their LC crops and targets, as the trainer draws them.
fn musplit_batch(built: &Built, b: usize) -> (Tensor, Tensor) {
    let t = built.cfg.patch_size[0] as i64;
    let levels = built.cfg.musplit.input_channels();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2000);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..b {
        let (x, y) = &built.pool[rng.random_range(0..built.pool.len())];
        let (h, w) = (x.size()[0], x.size()[1]);
        let cy = rng.random_range(t / 2..=h - t / 2);
        let cx = rng.random_range(t / 2..=w - t / 2);
        xs.push(lumos::musplit::lc::crops(x, cy, cx, t, levels));
        ys.push(Tensor::stack(
            &(0..2).map(|c| lumos::musplit::lc::gather(&y.get(c), cy - t / 2, t, cx - t / 2, t)).collect::<Vec<_>>(),
            0,
        ));
    }
    (Tensor::stack(&xs, 0), Tensor::stack(&ys, 0))
}

/// Writes a measurement's inputs (float32; labels as floats) with the training config in
/// the metadata (`train_config`), from which the peer takes its hyperparameters.
fn save_tensors(path: &Path, cfg: &TrainConfig, tensors: &[(&str, &Tensor)]) -> Res<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let v: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    let md = HashMap::from([("train_config".to_string(), serde_json::to_string(cfg).map_err(err)?)]);
    lumos::engine::weights::save(path, &v, md).map_err(err)
}

// ---------------------------------------------------------------------------------------
// Measurements

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it
    if !args.iter().any(|a| a == "--bench") {
        println!("compare bench: skipped outside `cargo bench`");
        return;
    }
    if !args.iter().any(|a| a == "--model") {
        println!(
            "compare bench: one measurement per call; e.g.\n  cargo bench --bench compare -- --model dm-qpmnet --mode train_step \
             --work target/bench/work\n(scripts/bench.sh runs the whole plan; see the header of benches/compare.rs)"
        );
        return;
    }
    let o = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::exit(2);
        }
    };
    match run(&o) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("compare: {} {}: {e}", o.model, o.mode);
            std::process::exit(1);
        }
    }
}

fn run(o: &Opts) -> Res<Value> {
    tch::set_num_threads(o.threads as i32);
    let t_setup = Instant::now();
    let built = build(o)?;
    let model = &built.model;
    // inference precision (segment, decompose, and the network calls below); training is float32
    model.set_precision(o.precision);
    let prec = if o.mode == "train_step" { Precision::Float32 } else { o.precision };
    let cfg = &built.cfg;
    let dir = o.work.join(&o.model);
    std::fs::create_dir_all(&dir).map_err(err)?;
    let model_file = dir.join("model.lumos");
    // the peer loads this file: one left by an earlier recipe (`--keep-work` across a
    // recipe change) would give the two sides different networks, so it is replaced
    // unless it holds the same architecture
    let stale = model_file.is_file()
        && Model::load(&model_file, Device::Cpu)
            .map(|m| m.n_parameters() != model.n_parameters() || m.meta.architecture != model.meta.architecture)
            .unwrap_or(true);
    if stale {
        eprintln!("compare: {} was written by another recipe; replacing it", model_file.display());
    }
    if stale || !model_file.is_file() {
        model.save(&model_file).map_err(err)?;
    }
    let inputs = dir.join(format!("{}-b{}-f{}.safetensors", o.mode, o.batch, o.frame));
    let kind = model.meta.kind;
    let t = cfg.patch_size[0];
    let dev = o.device;
    let mut extra = serde_json::Map::new();
    let (tile, frame): (Option<usize>, Option<usize>);
    let pixels_per_rep: f64;
    let mut tiles_per_rep = 0.0f64;
    let mut for_breakdown: Option<(Tensor, Tensor)> = None;

    // each arm prepares its inputs, resets the peak and returns (times, check)
    let (times, check, t0) = match o.mode.as_str() {
        "train_step" => {
            tile = Some(t);
            frame = None;
            pixels_per_rep = (o.batch * t * t) as f64;
            let (x, y) = match kind {
                ModelKind::Musplit => musplit_batch(&built, o.batch),
                _ => frame_batch(model, modality(&o.model), o.batch, t, 2000)?,
            };
            save_tensors(&inputs, cfg, &[("x", &x), ("y", &y)])?;
            let (x, y) = (x.to_device(dev), y.to_device(dev));
            let lr = match kind {
                ModelKind::Musplit => cfg.musplit.learning_rate,
                ModelKind::Pgdiff => cfg.pgdiff.learning_rate,
                _ => cfg.learning_rate,
            };
            extra.insert("learning_rate".into(), json!(lr));
            let (times, check, t0) = match kind {
                ModelKind::Unet | ModelKind::Dmqpm => {
                    extra.insert("optimizer".into(), json!(format!(
                        "lumos SGD Nesterov (libtorch _fused_sgd_), momentum {}, weight decay {}, grad-norm clip {}; deep supervision {}",
                        cfg.momentum, cfg.weight_decay, cfg.grad_clip, cfg.deep_supervision)));
                    let mut step = SegmentationStep::new(model, cfg);
                    let (b, t0) = (reset_peak(), now_unix());
                    extra.insert("peak_reset".into(), json!(b));
                    extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
                    let r = timed(o.warmup, o.reps, dev, &mut |_| step.step(model, &x, &y, lr).map_err(err))?;
                    (r.0, r.1, t0)
                }
                ModelKind::Musplit => {
                    extra.insert(
                        "optimizer".into(),
                        json!(format!(
                            "lumos Adamax (libtorch _foreach_ ops), lr {lr}, grad clip by value {}",
                            cfg.musplit.grad_clip_value
                        )),
                    );
                    let mut step = DecompositionStep::new(model, cfg);
                    let (b, t0) = (reset_peak(), now_unix());
                    extra.insert("peak_reset".into(), json!(b));
                    extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
                    let mut k = 0u64;
                    let r = timed(o.warmup, o.reps, dev, &mut |_| {
                        k += 1;
                        step.step(model, &x, &y, lr, k).map_err(err)
                    })?;
                    (r.0, r.1, t0)
                }
                ModelKind::Pgdiff => {
                    extra.insert("optimizer".into(), json!(format!(
                        "lumos Adam (libtorch _fused_adam_) on LDM-P + LDM-S, lr {lr}, grad-norm clip {} (diffusion phase)", cfg.pgdiff.grad_clip)));
                    let mut step = DiffusionStep::new(model, cfg);
                    let (b, t0) = (reset_peak(), now_unix());
                    extra.insert("peak_reset".into(), json!(b));
                    extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
                    let mut k = 0u64;
                    let r = timed(o.warmup, o.reps, dev, &mut |_| {
                        k += 1;
                        step.step(model, &x, &y, false, k).map_err(err)
                    })?;
                    (r.0, r.1, t0)
                }
            };
            if o.breakdown && kind != ModelKind::Pgdiff {
                for_breakdown = Some((x, y));
            }
            (times, check, t0)
        }
        "inference" => {
            tile = Some(t);
            frame = None;
            pixels_per_rep = (o.batch * t * t) as f64;
            match kind {
                ModelKind::Pgdiff => {
                    let (x, _) = frame_batch(model, "qpi", o.batch, t, 2000)?;
                    let k = model.n_classes() as i64;
                    let factor =
                        model.with_net(|n| n.downcast::<PgDiffNet>().map_or(1, |d| d.cfg.autoencoder.factor())) as i64;
                    tch::manual_seed(7);
                    let m = Tensor::randn(
                        [o.batch as i64, k, (t as i64) / factor, (t as i64) / factor],
                        (Kind::Float, Device::Cpu),
                    );
                    save_tensors(&inputs, cfg, &[("x", &x), ("m", &m)])?;
                    let (x, m) = (x.to_device(dev), m.to_device(dev));
                    let z = tch::no_grad(|| {
                        model.with_net(|n| n.downcast::<PgDiffNet>().expect("a pgdiff model").encode(&x))
                    });
                    extra.insert(
                        "what".into(),
                        json!("one LDM-P and one LDM-S evaluation on the tiles' latents (t = 500)"),
                    );
                    let (b, t0) = (reset_peak(), now_unix());
                    extra.insert("peak_reset".into(), json!(b));
                    extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
                    let r = timed(o.warmup, o.reps, dev, &mut |_| {
                        tch::no_grad(|| {
                            model.with_net(|n| {
                                let d = n.downcast::<PgDiffNet>().expect("a pgdiff model");
                                with_precision(prec, dev, || {
                                    let a = d.eps_p(&z, 500);
                                    let b = d.eps_s(&m, &z, 500);
                                    a.abs().mean(Kind::Float).double_value(&[])
                                        + b.abs().mean(Kind::Float).double_value(&[])
                                })
                                .map_err(err)
                            })
                        })
                    })?;
                    (r.0, r.1, t0)
                }
                _ => {
                    let x = match kind {
                        ModelKind::Musplit => musplit_batch(&built, o.batch).0,
                        _ => frame_batch(model, modality(&o.model), o.batch, t, 2000)?.0,
                    };
                    save_tensors(&inputs, cfg, &[("x", &x)])?;
                    let x = x.to_device(dev);
                    let (b, t0) = (reset_peak(), now_unix());
                    extra.insert("peak_reset".into(), json!(b));
                    extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
                    let r = timed(o.warmup, o.reps, dev, &mut |_| {
                        if kind == ModelKind::Musplit {
                            tch::manual_seed(7);
                        }
                        let out = with_precision(prec, dev, || tch::no_grad(|| model.with_net(|n| n.infer(&x))))
                            .map_err(err)?
                            .map_err(err)?;
                        Ok(out.mean(Kind::Float).double_value(&[]))
                    })?;
                    (r.0, r.1, t0)
                }
            }
        }
        "segment_2048" => {
            tile = Some(t);
            frame = Some(o.frame);
            pixels_per_rep = (o.frame * o.frame) as f64;
            let n = o.frame;
            let f = sim("ssqpm", n, 7)?;
            save_tensors(
                &inputs,
                cfg,
                &[("frame", &lumos::image::array3_to_tensor(f.image.data.view(), Device::Cpu))],
            )?;
            let data: Array3<f32> = f.image.data;
            let opts =
                SegmentOptions { batch_size: o.batch, step_fraction: o.step_fraction, ..SegmentOptions::default() };
            let sw_tiles = lumos::engine::tiling::tile_starts(n, t, opts.step_fraction).len().pow(2);
            tiles_per_rep = sw_tiles as f64;
            extra.insert("sliding_window".into(), json!({"step_fraction": opts.step_fraction, "batch": opts.batch_size, "tiles": sw_tiles, "mirror": false}));
            let mut labels = Array2::<u8>::zeros((n, n));
            let (b, t0) = (reset_peak(), now_unix());
            extra.insert("peak_reset".into(), json!(b));
            extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
            let r = timed(o.warmup, o.reps, dev, &mut |warm| {
                if warm && dev.is_cuda() {
                    // on a GPU the warm-up segments the whole frame: cuDNN's autotuner and the
                    // fused kernels' compilation see the measured shapes before the timing
                    // (until session 13's runs it was one tile, as on the CPU: the first timed
                    // repetition then carried the tuning, the median did not)
                    model
                        .segment(data.view(), &opts, SegmentOutput::Labels(labels.view_mut()), &mut Monitor::none())
                        .map_err(err)?;
                    return Ok(f64::NAN);
                }
                if warm {
                    // warm-up on one tile of the frame
                    let mut l = Array2::<u8>::zeros((t.min(n), t.min(n)));
                    let crop = data.slice(ndarray::s![.., ..t.min(n), ..t.min(n)]);
                    model
                        .segment(crop, &opts, SegmentOutput::Labels(l.view_mut()), &mut Monitor::none())
                        .map_err(err)?;
                    return Ok(f64::NAN);
                }
                model
                    .segment(data.view(), &opts, SegmentOutput::Labels(labels.view_mut()), &mut Monitor::none())
                    .map_err(err)?;
                Ok(labels.iter().map(|&v| v as u64).sum::<u64>() as f64 / (n * n) as f64)
            })?;
            if o.breakdown {
                let b = segment_breakdown(o, model, &data, t, &opts)?;
                extra.insert("segment_breakdown".into(), b);
            }
            (r.0, r.1, t0)
        }
        "decompose" => {
            tile = Some(t);
            frame = Some(o.frame);
            pixels_per_rep = (o.frame * o.frame) as f64;
            let n = o.frame;
            let f = sim("fluo", n, 7)?;
            let input: Array2<f32> = f.image.data.index_axis(Axis(0), 0).to_owned();
            save_tensors(
                &inputs,
                cfg,
                &[("frame", &lumos::image::array3_to_tensor(f.image.data.view(), Device::Cpu).get(0))],
            )?;
            let opts = DecomposeOptions::default();
            let keep = t / 2;
            tiles_per_rep = (n.div_ceil(keep) * n.div_ceil(keep)) as f64;
            extra.insert("tiling".into(), json!({"tile": t, "keep": keep, "batch": opts.batch_size, "samples": opts.samples, "tiles": tiles_per_rep as usize}));
            let mut out = Array3::<f32>::zeros((2, n, n));
            let (b, t0) = (reset_peak(), now_unix());
            extra.insert("peak_reset".into(), json!(b));
            extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
            let r = timed(o.warmup, o.reps, dev, &mut |warm| {
                if warm {
                    let w = (2 * t).min(n);
                    model.decompose_array(input.slice(ndarray::s![..w, ..w]), &opts).map_err(err)?;
                    return Ok(f64::NAN);
                }
                model.decompose(input.view(), &opts, out.view_mut(), &mut Monitor::none()).map_err(err)?;
                Ok(out.mean().unwrap_or(f32::NAN) as f64)
            })?;
            (r.0, r.1, t0)
        }
        "pgdiff_tiles" => {
            tile = Some(t);
            frame = None;
            pixels_per_rep = (o.batch * t * t) as f64;
            tiles_per_rep = o.batch as f64;
            let (x, _) = frame_batch(model, "qpi", o.batch, t, 3000)?;
            save_tensors(&inputs, cfg, &[("x", &x)])?;
            let x = x.to_device(dev);
            let base = model.diffusion_defaults().map_err(err)?;
            let opts = DiffusionOptions { inversion_steps: o.steps.0, sampling_steps: o.steps.1, ..base };
            let warm_opts = DiffusionOptions { inversion_steps: 1, sampling_steps: 1, ..base };
            extra.insert("steps".into(), json!([o.steps.0, o.steps.1]));
            extra.insert("sampling".into(), serde_json::to_value(opts).map_err(err)?);
            let (b, t0) = (reset_peak(), now_unix());
            extra.insert("peak_reset".into(), json!(b));
            extra.insert("base_rss_mib".into(), json!(status_kib("VmRSS:") / 1024.0));
            let r = timed(o.warmup, o.reps, dev, &mut |warm| {
                let op = if warm { &warm_opts } else { &opts };
                let p = model
                    .with_net(|n| {
                        let d = n.downcast::<PgDiffNet>().expect("a pgdiff model");
                        with_precision(prec, dev, || d.predict(&x, op, 0, &Monitor::none()).map(|r| r.probabilities))
                            .and_then(|r| r)
                    })
                    .map_err(err)?;
                Ok(p.select(1, 1).mean(Kind::Float).double_value(&[]))
            })?;
            (r.0, r.1, t0)
        }
        other => {
            return Err(format!(
                "unknown mode '{other}'; expected train_step, inference, segment_2048, decompose, pgdiff_tiles"
            ));
        }
    };
    let t1 = now_unix();
    let peak_rss_mib = status_kib("VmHWM:") / 1024.0;
    if let Some((x, y)) = &for_breakdown {
        breakdown(o, &built, x, y, &mut extra)?;
    }
    let med = median(&times);
    let mut v = json!({
        "side": "engine",
        "impl": format!("lumos {} (Rust, tch 0.24, libtorch)", lumos::VERSION),
        "model": o.model,
        "mode": o.mode,
        "size": o.size,
        "kind": kind.name(),
        "device": lumos::engine::device::device_name(dev),
        "threads": tch::get_num_threads(),
        "batch": o.batch,
        "precision": prec.name(),
        "tile": tile,
        "frame": frame,
        "warmup": o.warmup,
        "reps": o.reps,
        "times_s": times,
        "median_s": med,
        "mp_per_s": pixels_per_rep / 1e6 / med,
        "tiles_per_s": if tiles_per_rep > 0.0 { json!(tiles_per_rep / med) } else { Value::Null },
        "peak_rss_mib": peak_rss_mib,
        "params": model.n_parameters(),
        "check": if check.is_finite() { json!(check) } else { Value::Null },
        "pid": std::process::id(),
        "t_start": t0,
        "t_end": t1,
        "setup_s": t_setup.elapsed().as_secs_f64() - (t1 - t0),
        "model_file": model_file.display().to_string(),
        "inputs_file": inputs.display().to_string(),
    });
    if let Value::Object(m) = &mut v {
        m.extend(extra);
    }
    Ok(v)
}

/// `segment_2048 --breakdown`: medians (seconds) of the parts of one frame's segmentation,
/// each timed on its own and ended by a device synchronization: the host's finiteness check
/// of the frame (what a band-by-band segmentation runs), the frame's copy to the device
/// (`tiling::rows_to_device`, as `Model::segment` makes it),
/// the network on one full batch of tiles (and the host time to enqueue it, before the
/// synchronization: a GPU that waits for its launches shows it close to the total).
fn segment_breakdown(o: &Opts, model: &Model, data: &Array3<f32>, t: usize, opts: &SegmentOptions) -> Res<Value> {
    let dev = o.device;
    let reps = o.reps.max(3);
    let time = |f: &mut dyn FnMut() -> Res<()>| -> Res<f64> {
        f()?;
        sync(dev);
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = Instant::now();
            f()?;
            sync(dev);
            v.push(t0.elapsed().as_secs_f64());
        }
        Ok(median(&v))
    };
    let check = time(&mut || lumos::image::check_finite(data.view()).map_err(err))?;
    // the copy `Model::segment` makes (the whole frame at once on a GPU)
    let h2d = time(&mut || {
        let _ = lumos::backend::staging::rows_to_device(data.view(), 0, data.dim().1, dev);
        Ok(())
    })?;
    let c = data.dim().0 as i64;
    let (n, k) = (data.dim().1, t);
    let b = opts.batch_size.min(lumos::engine::tiling::tile_starts(n, k, opts.step_fraction).len().pow(2)) as i64;
    let x = Tensor::randn([b, c, t as i64, t as i64], (Kind::Float, dev));
    let prec = model.precision();
    let mut enqueue = Vec::new();
    let network = time(&mut || {
        let t0 = Instant::now();
        let y = with_precision(prec, dev, || tch::no_grad(|| model.with_net(|n| n.infer(&x))))
            .map_err(err)?
            .map_err(err)?;
        enqueue.push(t0.elapsed().as_secs_f64());
        drop(y);
        Ok(())
    })?;
    // the first call was the untimed one
    enqueue.remove(0);
    Ok(json!({
        "host_check_finite_s": check,
        "frame_to_device_s": h2d,
        "network_batch": b,
        "network_s": network,
        "network_enqueue_s": median(&enqueue),
    }))
}

/// Forward + loss, and forward + loss + backward, without the optimizer (medians over
/// `reps`), for reading the optimizer's share of a training step.
fn breakdown(o: &Opts, built: &Built, x: &Tensor, y: &Tensor, extra: &mut serde_json::Map<String, Value>) -> Res<()> {
    let model = &built.model;
    let cfg = &built.cfg;
    let loss = || -> Res<Tensor> {
        model.with_net(|n| match n.downcast::<MuSplitNet>() {
            Some(m) => {
                tch::manual_seed(1);
                Ok(m.loss(&m.forward_t(x, true), y))
            }
            None => {
                Ok(lumos::nnunet::loss::deep_supervision_loss(&n.forward(x, cfg.deep_supervision).map_err(err)?, y))
            }
        })
    };
    let reps = o.reps.max(1);
    let (fwd, _) = timed(0, reps, o.device, &mut |_| Ok(loss()?.double_value(&[])))?;
    let (fb, _) = timed(0, reps, o.device, &mut |_| {
        let l = loss()?;
        l.f_backward().map_err(err)?;
        Ok(l.double_value(&[]))
    })?;
    extra.insert("forward_loss_s".into(), json!(median(&fwd)));
    extra.insert("forward_backward_s".into(), json!(median(&fb)));
    Ok(())
}
