//! The one training loop (every model kind trains through it).
//!
//! Order of work: the config and seed are written next to the output first
//! (`OUTPUT.train.json`); the data are loaded, split and normalized; each epoch runs
//! `iterations_per_epoch` SGD steps on augmented random patches, validates, and writes a
//! checkpoint atomically. Each epoch seeds its own RNGs from (seed, epoch), so a run
//! resumed from a checkpoint continues exactly as the uninterrupted run would have.
//! Cancellation (from any thread) stops at the next iteration; the last checkpoint stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::nnunet::augment::{augment_batch, AugmentConfig};
use crate::engine::dataset::{load_folder, Sample};
use crate::engine::device::{device_name, parse_device};
use crate::error::{Error, Result};
use crate::image::{array3_to_tensor, mask_to_tensor, Image};
use crate::engine::metrics;
use crate::engine::model::{EpochRecord, Model, ModelKind, ModelMeta, SegmentOptions};
use crate::nnunet::loss::deep_supervision_loss;
use crate::dmqpm::net::DmQpmConfig;
use crate::pgdiff::PgDiffConfig;
use crate::musplit::net::MuSplitConfig;
use crate::nnunet::net::UnetConfig;
use crate::engine::normalize::{NormMethod, Normalizer};
use crate::engine::progress::{Monitor, Progress, Stage};
use crate::engine::weights;

/// Everything that defines a training run (JSON; unknown fields are rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model kind: "unet", "dmqpm", "musplit" or "pgdiff".
    pub kind: String,
    /// Architecture of a "unet" model.
    pub unet: UnetConfig,
    /// Architecture of a "dmqpm" model (DM-QPMNet or one of its baselines).
    pub dmqpm: DmQpmConfig,
    /// Architecture and optimizer of a "musplit" model (decomposition; trained with
    /// Adamax on `DIR/targets` + optional `DIR/inputs`, see `split`). The SGD settings
    /// below (learning_rate, momentum, weight_decay, grad_clip, foreground_oversampling,
    /// deep_supervision, augmentation, normalization, classes) apply to segmentation kinds.
    pub musplit: MuSplitConfig,
    /// Architecture, optimizer and default sampling of a "pgdiff" model (PG-DiffSeg;
    /// trained with Adam on `DIR/images` + `DIR/masks`, see `diffseg`). `epochs` counts
    /// the diffusion epochs, which follow `pgdiff.ae_epochs` autoencoder epochs.
    pub pgdiff: PgDiffConfig,
    pub epochs: usize,
    pub iterations_per_epoch: usize,
    pub batch_size: usize,
    /// Training patch `[height, width]`; multiples of the network's downsampling factor.
    pub patch_size: [usize; 2],
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Gradient-norm clip.
    pub grad_clip: f64,
    /// Fraction of each batch centred on a foreground pixel.
    pub foreground_oversampling: f64,
    pub deep_supervision: bool,
    pub augmentation: AugmentConfig,
    /// One method per channel, or one for all; empty = automatic (ssQPM channel names get
    /// per-channel training-set z-score for the angles and robust quantiles for phase;
    /// anything else per-image z-score).
    pub normalization: Vec<NormMethod>,
    /// Fraction of the images held out for validation (at least one when > 0).
    pub val_fraction: f64,
    pub seed: u64,
    /// "cpu", "cuda", "cuda:N" or "auto".
    pub device: String,
    /// libtorch intra-op threads (0 = libtorch's default).
    pub threads: usize,
    /// Class names; empty = from the masks ("background", "class1", ...; binary masks:
    /// "background", "cell").
    pub classes: Vec<String>,
    /// Checkpoint path; default `OUTPUT.ckpt`.
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint when it exists.
    pub resume: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            kind: "unet".into(),
            unet: UnetConfig::default(),
            dmqpm: DmQpmConfig::default(),
            musplit: MuSplitConfig::default(),
            pgdiff: PgDiffConfig::default(),
            epochs: 50,
            iterations_per_epoch: 50,
            batch_size: 4,
            patch_size: [256, 256],
            learning_rate: 1e-2,
            momentum: 0.99,
            weight_decay: 3e-5,
            grad_clip: 12.0,
            foreground_oversampling: 0.33,
            deep_supervision: true,
            augmentation: AugmentConfig::default(),
            normalization: Vec::new(),
            val_fraction: 0.2,
            seed: 0,
            device: "auto".into(),
            threads: 0,
            classes: Vec::new(),
            checkpoint: None,
            resume: false,
        }
    }
}

impl TrainConfig {
    pub fn from_json(s: &str) -> Result<Self> {
        let c: TrainConfig = serde_json::from_str(s).map_err(|e| Error::Config(format!("training config JSON: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let kind = ModelKind::parse(&self.kind)?;
        match kind {
            ModelKind::Unet => self.unet.validate()?,
            ModelKind::Dmqpm => self.dmqpm.validate()?,
            ModelKind::Pgdiff => {
                self.pgdiff.validate()?;
                if self.patch_size[0] != self.patch_size[1] {
                    return Err(Error::Config(format!("patch_size {:?}: a pgdiff model trains on square tiles", self.patch_size)));
                }
            }
            ModelKind::Musplit => {
                self.musplit.validate()?;
                if self.patch_size[0] != self.patch_size[1] {
                    return Err(Error::Config(format!(
                        "patch_size {:?}: a musplit model trains on square patches",
                        self.patch_size
                    )));
                }
            }
        }
        let pos = |v: usize, n: &str| if v == 0 { Err(Error::Config(format!("{n} must be >= 1"))) } else { Ok(()) };
        pos(self.epochs, "epochs")?;
        pos(self.iterations_per_epoch, "iterations_per_epoch")?;
        pos(self.batch_size, "batch_size")?;
        let d = match kind {
            ModelKind::Unet => self.unet.divisor(),
            ModelKind::Dmqpm => self.dmqpm.divisor(),
            ModelKind::Musplit => self.musplit.divisor(),
            ModelKind::Pgdiff => self.pgdiff.divisor(),
        };
        if self.patch_size.iter().any(|&p| p == 0 || p % d != 0) {
            return Err(Error::Config(format!(
                "patch_size {:?} must be positive multiples of {d} (2^(n_stages-1))",
                self.patch_size
            )));
        }
        let fin = |v: f64, n: &str, lo: f64, hi: f64| {
            if !(v.is_finite() && v >= lo && v <= hi) {
                Err(Error::Config(format!("{n} = {v}; expected a number in [{lo}, {hi}]")))
            } else {
                Ok(())
            }
        };
        fin(self.learning_rate, "learning_rate", 0.0, 10.0)?;
        fin(self.momentum, "momentum", 0.0, 0.9999)?;
        fin(self.weight_decay, "weight_decay", 0.0, 1.0)?;
        fin(self.grad_clip, "grad_clip", 0.0, 1e9)?;
        fin(self.foreground_oversampling, "foreground_oversampling", 0.0, 1.0)?;
        fin(self.val_fraction, "val_fraction", 0.0, 0.9)?;
        parse_device(&self.device)?;
        Ok(())
    }

    fn checkpoint_path(&self, output: &Path) -> PathBuf {
        self.checkpoint.clone().unwrap_or_else(|| sibling(output, "ckpt"))
    }
}

/// Where a run writes (the model, its checkpoint) must be writable file paths before any
/// work starts: a directory at the model path or a checkpoint in a missing folder would
/// otherwise fail only after the first epoch or at the very end.
pub(crate) fn check_output_paths(output: &Path, checkpoint: &Path) -> Result<()> {
    for (what, p) in [("output model", output), ("checkpoint", checkpoint)] {
        if p.is_dir() {
            return Err(Error::InvalidArgument(format!("the {what} path '{}' is a directory; expected a file path", p.display())));
        }
        if p.file_name().is_none() {
            return Err(Error::InvalidArgument(format!("the {what} path '{}' names no file", p.display())));
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "the {what} path '{}' is in a folder that does not exist ('{}'); create it first",
                p.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// `model.lumos` -> `model.lumos.EXT`.
pub fn sibling(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// The result of a finished run.
pub struct TrainOutcome {
    pub model: Model,
    pub history: Vec<EpochRecord>,
}

/// Training state stored in a checkpoint's `lumos.checkpoint` metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    epochs_completed: usize,
    config: TrainConfig,
    history: Vec<EpochRecord>,
}

pub(crate) const CHECKPOINT_KEY: &str = "lumos.checkpoint";

pub(crate) fn per_epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add((epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(1))
}

/// DM-QPMNet's per-modality normalization for ssQPM data (any dmqpm model, or five
/// channels named as the simulator names them); per-image z-score otherwise.
fn default_normalization(kind: ModelKind, channel_names: &[String]) -> Vec<NormMethod> {
    let ssqpm = crate::dmqpm::net::SSQPM_CHANNELS;
    let named = channel_names.len() == 5 && channel_names.iter().zip(ssqpm).all(|(a, b)| a.eq_ignore_ascii_case(b));
    if named || (kind == ModelKind::Dmqpm && channel_names.len() == 5) {
        let mut v = vec![NormMethod::DatasetZscore; 4];
        v.push(NormMethod::RobustQuantile { q_low: 0.005, q_high: 0.995 });
        v
    } else {
        vec![NormMethod::PerImageZscore]
    }
}

/// In-memory training data on the device: normalized images and masks, padded to at
/// least one patch, with the foreground pixel positions of each image.
struct TrainSet {
    images: Vec<Tensor>,
    masks: Vec<Tensor>,
    foreground: Vec<Vec<(usize, usize)>>,
    sizes: Vec<(usize, usize)>,
}

impl TrainSet {
    fn new(samples: &[&Sample], norm: &Normalizer, patch: [usize; 2], device: Device) -> Result<Self> {
        let mut s = TrainSet { images: vec![], masks: vec![], foreground: vec![], sizes: vec![] };
        for smp in samples {
            let img = norm.apply_image(&smp.image)?;
            let (h, w) = smp.mask.dim();
            let (ph, pw) = (patch[0].saturating_sub(h) as i64, patch[1].saturating_sub(w) as i64);
            let t = array3_to_tensor(img.data.view(), device).constant_pad_nd([0, pw, 0, ph]);
            let m = mask_to_tensor(&smp.mask, device).constant_pad_nd([0, pw, 0, ph]);
            s.foreground.push(smp.mask.indexed_iter().filter(|(_, v)| **v > 0).map(|(i, _)| i).collect());
            s.sizes.push((h.max(patch[0]), w.max(patch[1])));
            s.images.push(t);
            s.masks.push(m);
        }
        Ok(s)
    }

    /// A batch `(B, C, ph, pw)`, `(B, ph, pw)`; the last `fg_fraction` of it is centred
    /// on foreground pixels (nnU-Net's oversampling).
    fn batch(&self, rng: &mut ChaCha8Rng, b: usize, patch: [usize; 2], fg_fraction: f64) -> (Tensor, Tensor) {
        let n_fg = (b as f64 * fg_fraction).round() as usize;
        let (mut xs, mut ms) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for k in 0..b {
            let i = rng.random_range(0..self.images.len());
            let (h, w) = self.sizes[i];
            let (y, x) = if k >= b - n_fg && !self.foreground[i].is_empty() {
                let (cy, cx) = self.foreground[i][rng.random_range(0..self.foreground[i].len())];
                (
                    cy.saturating_sub(patch[0] / 2).min(h - patch[0]),
                    cx.saturating_sub(patch[1] / 2).min(w - patch[1]),
                )
            } else {
                (rng.random_range(0..=h - patch[0]), rng.random_range(0..=w - patch[1]))
            };
            let crop = |t: &Tensor, d0: i64| t.narrow(d0, y as i64, patch[0] as i64).narrow(d0 + 1, x as i64, patch[1] as i64);
            xs.push(crop(&self.images[i], 1).unsqueeze(0));
            ms.push(crop(&self.masks[i], 0).unsqueeze(0));
        }
        (Tensor::cat(&xs, 0), Tensor::cat(&ms, 0))
    }
}

/// SGD with Nesterov momentum and decoupled-from-nothing (PyTorch-style) weight decay;
/// written out so that its momentum buffers can be checkpointed and restored.
struct Sgd {
    params: Vec<(String, Tensor)>,
    momentum_buffers: HashMap<String, Tensor>,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    fn new(vs: &tch::nn::VarStore, momentum: f64, weight_decay: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Sgd { params, momentum_buffers: HashMap::new(), momentum, weight_decay }
    }
    /// Drops the gradients (the next backward pass writes fresh ones).
    fn zero_grad(&mut self) -> Result<()> {
        crate::backend::optim::drop_grads(self.params.iter().map(|(_, p)| p))
    }
    /// Clips the global gradient norm to `max_norm` (`<= 0`: no clipping), then one step
    /// of libtorch's fused SGD over every parameter with a gradient. Returns the norm
    /// before clipping.
    fn clip_and_step(&mut self, max_norm: f64, lr: f64) -> Result<f64> {
        let (ps, gs, bufs) = crate::backend::optim::gather(&self.params, &mut [&mut self.momentum_buffers]);
        let norm = crate::backend::optim::clip_grad_norm_(&gs, max_norm)?;
        crate::backend::optim::sgd_(&ps, &gs, &bufs[0], lr, self.momentum, self.weight_decay, true)?;
        Ok(norm)
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.momentum_buffers.iter().map(|(n, t)| (format!("optimizer.momentum.{n}"), t.shallow_clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
    fn load_state(&mut self, tensors: &std::collections::BTreeMap<String, Tensor>, device: Device) {
        for (n, t) in tensors {
            if let Some(name) = n.strip_prefix("optimizer.momentum.") {
                self.momentum_buffers.insert(name.to_string(), t.to_device(device));
            }
        }
    }
}

/// One optimization step of the segmentation trainer (kinds `unet` and `dmqpm`), exactly
/// as [`train`] runs it for every iteration: the forward pass (with deep supervision when
/// the config asks for it), nnU-Net's loss (`deep_supervision_loss`: CE + soft Dice), the
/// backward pass, gradient-norm clipping at `grad_clip`, and one step of the SGD Nesterov
/// optimizer (`momentum`, `weight_decay`) at the given learning rate. The optimizer's
/// momentum buffers live here. [`train`] drives it; `benches/compare.rs` times it on a
/// fixed batch.
pub struct SegmentationStep {
    sgd: Sgd,
    deep_supervision: bool,
    grad_clip: f64,
}

impl SegmentationStep {
    /// A fresh optimizer over the model's trainable variables, with `cfg`'s `momentum`,
    /// `weight_decay`, `grad_clip` and `deep_supervision`.
    pub fn new(model: &Model, cfg: &TrainConfig) -> Self {
        SegmentationStep {
            sgd: Sgd::new(&model.lock().vs, cfg.momentum, cfg.weight_decay),
            deep_supervision: cfg.deep_supervision,
            grad_clip: cfg.grad_clip,
        }
    }

    /// One step on a batch: normalized images `x` `(N, C, H, W)` and labels `y` `(N, H, W)`
    /// (int64), on the model's device, at learning rate `lr`. Returns the loss before the
    /// update (reading it waits for the device).
    pub fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, lr: f64) -> Result<f64> {
        let loss = crate::backend::onednn::train_step(|| {
            let loss = {
                let inner = model.lock();
                let outs = inner.net.forward(x, self.deep_supervision)?;
                deep_supervision_loss(&outs, y)
            };
            self.sgd.zero_grad()?;
            loss.f_backward()?;
            Ok(loss)
        })?;
        self.sgd.clip_and_step(self.grad_clip, lr)?;
        Ok(loss.double_value(&[]))
    }
}

/// Mean foreground Dice of `model` on raw (unnormalized) samples.
pub fn evaluate_samples(model: &Model, samples: &[&Sample]) -> Result<Vec<metrics::ImageScores>> {
    evaluate_samples_with(model, samples, &Monitor::none())
}

/// [`evaluate_samples`], stopped by `monitor`'s cancel token (checked tile by tile; its
/// progress callback is not called): a cancelled training does not wait for validation.
pub fn evaluate_samples_with(model: &Model, samples: &[&Sample], monitor: &Monitor) -> Result<Vec<metrics::ImageScores>> {
    let mut cancel_only = monitor.cancel_only();
    samples
        .iter()
        .map(|s| {
            let pred = model.segment_labels_with(s.image.data.view(), &SegmentOptions::default(), &mut cancel_only)?;
            metrics::score(&pred, &s.mask, model.n_classes())
        })
        .collect()
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Trains a model on `data_dir` and writes it to `output`.
pub fn train(cfg: &TrainConfig, data_dir: &Path, output: &Path, monitor: &mut Monitor) -> Result<TrainOutcome> {
    let t0 = Instant::now();
    cfg.validate()?;
    let kind = ModelKind::parse(&cfg.kind)?;
    if kind == ModelKind::Musplit {
        return crate::musplit::train(cfg, data_dir, output, monitor);
    }
    if kind == ModelKind::Pgdiff {
        return crate::pgdiff::train(cfg, data_dir, output, monitor);
    }
    if output.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("the output model path is empty".into()));
    }
    let record_path = sibling(output, "train.json");
    let ckpt_path = cfg.checkpoint_path(output);
    check_output_paths(output, &ckpt_path)?;
    let device = parse_device(&cfg.device)?;
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    }
    monitor.emit(Progress::new(Stage::Preparing));

    // the data, split reproducibly by the seed
    let samples = load_folder(data_dir)?;
    let (train_idx, val_idx) = crate::engine::dataset::split_indices(samples.len(), cfg.val_fraction, cfg.seed);
    let train_s: Vec<&Sample> = train_idx.iter().map(|&i| &samples[i]).collect();
    let val_s: Vec<&Sample> = val_idx.iter().map(|&i| &samples[i]).collect();

    // the run is recorded before any work
    let run = RunInfo {
        cfg,
        data_dir,
        train_names: train_s.iter().map(|s| s.name.clone()).collect(),
        val_names: val_s.iter().map(|s| s.name.clone()).collect(),
        device,
        t0,
    };
    run.write_record(&record_path)?;

    let channel_names = samples[0].image.channel_names.clone();
    let classes = class_names(cfg, &samples)?;
    let methods = if cfg.normalization.is_empty() { default_normalization(kind, &channel_names) } else { cfg.normalization.clone() };
    let normalizer = Normalizer::fit(&methods, &train_s.iter().map(|s| &s.image).collect::<Vec<&Image>>())?;
    let architecture = match kind {
        ModelKind::Unet => serde_json::to_value(&cfg.unet).expect("json"),
        ModelKind::Dmqpm => serde_json::to_value(&cfg.dmqpm).expect("json"),
        ModelKind::Musplit => unreachable!("musplit trains in split::train"),
        ModelKind::Pgdiff => unreachable!("pgdiff trains in diffseg::train"),
    };
    let meta = ModelMeta::new(kind, architecture, channel_names, classes, cfg.patch_size, normalizer.clone());

    let mut model = Model::new_seeded(meta, device, Some(cfg.seed))?;
    let data = TrainSet::new(&train_s, &normalizer, cfg.patch_size, device)?;

    let mut stepper = SegmentationStep::new(&model, cfg);
    let mut start_epoch = 0;
    let mut history: Vec<EpochRecord> = Vec::new();
    if cfg.resume && ckpt_path.is_file() {
        let file = weights::load(&ckpt_path)?;
        let st: CheckpointState = serde_json::from_str(
            file.metadata.get(CHECKPOINT_KEY).ok_or_else(|| {
                Error::ModelFormat(format!("'{}' is a model file, not a training checkpoint", ckpt_path.display()))
            })?,
        )
        .map_err(|e| Error::ModelFormat(format!("'{}': corrupt checkpoint state ({e})", ckpt_path.display())))?;
        check_resume_config(&ckpt_path, &st.config, cfg)?;
        let ck_meta = ModelMeta::from_metadata(&ckpt_path, &file.metadata)?;
        check_resume_data(&ckpt_path, "image", &ck_meta.normalization, &normalizer)?;
        if ck_meta.architecture != model.meta.architecture || ck_meta.classes != model.meta.classes || ck_meta.input_channels != model.meta.input_channels {
            return Err(Error::Config(format!(
                "checkpoint '{}' was written for another architecture, channels or classes; delete it or set resume = false",
                ckpt_path.display()
            )));
        }
        weights::copy_into(&model.lock().vs, &file.tensors, &["optimizer."])?;
        stepper.sgd.load_state(&file.tensors, device);
        model.meta.normalization = ck_meta.normalization;
        start_epoch = st.epochs_completed;
        history = st.history;
        log::info!("resuming from '{}' after epoch {start_epoch}", ckpt_path.display());
    }

    for epoch in start_epoch..cfg.epochs {
        let te = Instant::now();
        let lr = cfg.learning_rate * (1.0 - epoch as f64 / cfg.epochs as f64).powf(0.9);
        let es = per_epoch_seed(cfg.seed, epoch);
        let mut rng = ChaCha8Rng::seed_from_u64(es);
        let mut loss_sum = 0.0;
        for it in 0..cfg.iterations_per_epoch {
            monitor.check()?;
            let (x, y) = data.batch(&mut rng, cfg.batch_size, cfg.patch_size, cfg.foreground_oversampling);
            let (x, y) = augment_batch(&x, &y, &cfg.augmentation, &mut rng);
            let l = stepper.step(&model, &x, &y, lr)?;
            if !l.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "training diverged (loss {l}) at epoch {epoch}, iteration {it}; lower learning_rate"
                )));
            }
            loss_sum += l;
            monitor.emit(Progress {
                stage: Stage::Training,
                epoch,
                epochs: cfg.epochs,
                iteration: it,
                iterations: cfg.iterations_per_epoch,
                loss: l,
                val_metric: f64::NAN,
            });
        }
        monitor.check()?;
        let val_dice = if val_s.is_empty() {
            f64::NAN
        } else {
            // a cancel during validation ends the run at once; the last checkpoint (the previous
            // epoch's) stays
            metrics::mean(&evaluate_samples_with(&model, &val_s, monitor)?.iter().map(|s| s.mean_fg_dice()).collect::<Vec<_>>())
        };
        let rec = EpochRecord {
            epoch,
            learning_rate: lr,
            train_loss: loss_sum / cfg.iterations_per_epoch as f64,
            val_dice,
            val_psnr: None,
            seconds: te.elapsed().as_secs_f64(),
        };
        monitor.emit(Progress {
            stage: Stage::Validation,
            epoch,
            epochs: cfg.epochs,
            iteration: cfg.iterations_per_epoch,
            iterations: cfg.iterations_per_epoch,
            loss: rec.train_loss,
            val_metric: val_dice,
        });
        history.push(rec);
        let st = CheckpointState { epochs_completed: epoch + 1, config: cfg.clone(), history: history.clone() };
        let mut md = HashMap::new();
        md.insert(CHECKPOINT_KEY.to_string(), serde_json::to_string(&st).expect("json"));
        model.meta.provenance = run.provenance(epoch + 1, &history);
        model.save_with(&ckpt_path, &stepper.sgd.state(), md)?;
        monitor.emit(Progress { stage: Stage::Checkpoint, epoch, epochs: cfg.epochs, ..Progress::new(Stage::Checkpoint) });
    }
    model.meta.provenance = run.provenance(cfg.epochs, &history);
    model.save(output)?;
    monitor.emit(Progress { stage: Stage::Done, epoch: cfg.epochs, epochs: cfg.epochs, ..Progress::new(Stage::Done) });
    Ok(TrainOutcome { model, history })
}

/// One training run's identity: written as `OUTPUT.train.json` before any work and
/// stored as the model's provenance after every epoch.
pub(crate) struct RunInfo<'a> {
    pub cfg: &'a TrainConfig,
    pub data_dir: &'a Path,
    pub train_names: Vec<String>,
    pub val_names: Vec<String>,
    pub device: Device,
    pub t0: Instant,
}

impl RunInfo<'_> {
    /// Writes the run record (config, seed, data split, device) atomically.
    pub fn write_record(&self, path: &Path) -> Result<()> {
        let record = serde_json::json!({
            "lumos_version": env!("CARGO_PKG_VERSION"),
            "started_unix": now_unix(),
            "config": self.cfg,
            "seed": self.cfg.seed,
            "data": self.data_dir.display().to_string(),
            "train_images": self.train_names,
            "val_images": self.val_names,
            "device": device_name(self.device),
        });
        weights::write_atomic(path, serde_json::to_string_pretty(&record).expect("json").as_bytes())
    }

    pub fn provenance(&self, epochs_completed: usize, history: &[EpochRecord]) -> crate::engine::model::Provenance {
        crate::engine::model::Provenance {
            lumos_version: env!("CARGO_PKG_VERSION").into(),
            created_unix: now_unix(),
            seed: self.cfg.seed,
            train_config: serde_json::to_value(self.cfg).expect("json"),
            data: self.data_dir.display().to_string(),
            train_images: self.train_names.clone(),
            val_images: self.val_names.clone(),
            epochs_completed,
            val_dice: history.iter().rev().map(|h| h.val_dice).find(|v| v.is_finite()),
            device: device_name(self.device),
            wall_seconds: self.t0.elapsed().as_secs_f64(),
            history: history.to_vec(),
        }
    }
}

/// Reads a training checkpoint of `kind` for `model`: the weights are copied into the
/// model (optimizer tensors skipped); returns the file (for optimizer state), the
/// loop's state from the `lumos.checkpoint` entry and the checkpoint's metadata.
/// Refuses a checkpoint written for another kind, architecture or classes.
/// Resuming continues the run that wrote the checkpoint: its settings must be this run's,
/// except where the run happens (`device`, `threads`), where its checkpoint goes
/// (`checkpoint`, `resume`) and how long it lasts (`epochs`: to train longer or stop
/// sooner; the learning-rate schedule follows the new total from the next epoch on).
/// Another seed would draw another train / validation split (images trained on would be
/// validated on) and other batches, another learning rate or architecture would make a
/// different run under the old one's name, so a difference is an error that names the
/// settings.
pub(crate) fn check_resume_config(path: &Path, saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    const MAY_CHANGE: [&str; 5] = ["resume", "device", "threads", "checkpoint", "epochs"];
    let fields = |c: &TrainConfig| -> serde_json::Map<String, serde_json::Value> {
        let mut m = match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        for k in MAY_CHANGE {
            m.remove(k);
        }
        m
    };
    let (a, b) = (fields(saved), fields(now));
    if a == b {
        return Ok(());
    }
    let short = |v: Option<&serde_json::Value>| -> String {
        let s = v.map_or_else(|| "absent".to_string(), |v| v.to_string());
        if s.chars().count() > 80 {
            format!("{}...", s.chars().take(77).collect::<String>())
        } else {
            s
        }
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
    keys.sort();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} in the checkpoint, {} now", short(a.get(k)), short(b.get(k))))
        .collect();
    Err(Error::Config(format!(
        "checkpoint '{}' belongs to a run with other settings ({}); resuming continues that run, where only {} may change: \
         restore its settings, or delete the checkpoint or set resume = false to start over",
        path.display(),
        diffs.join("; "),
        MAY_CHANGE.join(", ")
    )))
}

/// Resuming needs the data the checkpoint was trained on: the normalization fitted on this
/// run's training images must be the checkpoint's (the images are normalized with it).
pub(crate) fn check_resume_data(path: &Path, what: &str, saved: &Normalizer, now: &Normalizer) -> Result<()> {
    if saved == now {
        return Ok(());
    }
    Err(Error::Config(format!(
        "checkpoint '{}': the {what} normalization fitted on this run's training images differs from the checkpoint's \
         (the training data changed since it was written); resume with the same data, or delete the checkpoint or \
         set resume = false to start over",
        path.display()
    )))
}

pub(crate) fn read_checkpoint<T: serde::de::DeserializeOwned>(
    path: &Path,
    model: &Model,
) -> Result<(weights::TensorFile, T, ModelMeta)> {
    let file = weights::load(path)?;
    let st: T = serde_json::from_str(
        file.metadata
            .get(CHECKPOINT_KEY)
            .ok_or_else(|| Error::ModelFormat(format!("'{}' is a model file, not a training checkpoint", path.display())))?,
    )
    .map_err(|e| Error::ModelFormat(format!("'{}': corrupt checkpoint state ({e})", path.display())))?;
    let ck = ModelMeta::from_metadata(path, &file.metadata)?;
    if ck.kind != model.meta.kind
        || ck.architecture != model.meta.architecture
        || ck.classes != model.meta.classes
        || ck.input_channels != model.meta.input_channels
    {
        return Err(Error::Config(format!(
            "checkpoint '{}' was written for another architecture, channels or classes; delete it or set resume = false",
            path.display()
        )));
    }
    weights::copy_into(&model.lock().vs, &file.tensors, &["optimizer."])?;
    Ok((file, st, ck))
}

/// Class names: the config's (at least one per mask label), or "background" and "cell"
/// for binary masks, or "background", "class1", ... otherwise.
pub(crate) fn class_names(cfg: &TrainConfig, samples: &[Sample]) -> Result<Vec<String>> {
    let used = crate::engine::dataset::labels_used(samples);
    let max_label = (0..256).rev().find(|&v| used[v]).unwrap_or(0);
    // class masks use few, dense labels; instance masks (one label per cell) or 8-bit
    // intensities would silently become a network of up to 256 classes
    if cfg.classes.is_empty() && max_label > 1 {
        let n_used = (1..=max_label).filter(|&v| used[v]).count();
        if max_label > 32 || 2 * n_used < max_label {
            return Err(Error::InvalidInput(format!(
                "the masks use {n_used} different labels between 1 and {max_label}: they look like instance IDs (one label \
                 per cell) or intensities, not classes. lumos learns classes: background 0, then 1, 2, ... Convert the \
                 masks (e.g. every cell to 1), or list {} class names in the config's `classes` to confirm that many classes",
                max_label + 1
            )));
        }
    }
    Ok(if !cfg.classes.is_empty() {
        if cfg.classes.len() <= max_label {
            return Err(Error::Config(format!(
                "{} class names given but the masks contain label {max_label}; expected at least {} names",
                cfg.classes.len(),
                max_label + 1
            )));
        }
        cfg.classes.clone()
    } else if max_label <= 1 {
        vec!["background".into(), "cell".into()]
    } else {
        std::iter::once("background".to_string()).chain((1..=max_label).map(|k| format!("class{k}"))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};

    fn sample(labels: Vec<u8>) -> Sample {
        let n = labels.len();
        Sample { name: "s".into(), image: Image::new(Array3::zeros((1, 1, n))), mask: Array2::from_shape_vec((1, n), labels).unwrap() }
    }

    /// Instance masks (a label per cell) and sparse labels are refused unless the classes
    /// are named; dense class labels pass.
    #[test]
    fn instance_like_masks_are_refused_unless_the_classes_are_named() {
        let cfg = TrainConfig::default();
        assert_eq!(class_names(&cfg, &[sample(vec![0, 1, 2])]).unwrap(), vec!["background", "class1", "class2"]);
        let instances = sample((0..=40).collect());
        let e = class_names(&cfg, std::slice::from_ref(&instances)).unwrap_err().to_string();
        assert!(e.contains("instance IDs"), "{e}");
        let sparse = sample(vec![0, 3, 9]);
        assert!(class_names(&cfg, std::slice::from_ref(&sparse)).is_err());
        let named = TrainConfig { classes: (0..=40).map(|k| format!("c{k}")).collect(), ..TrainConfig::default() };
        assert_eq!(class_names(&named, &[instances]).unwrap().len(), 41);
    }
}
