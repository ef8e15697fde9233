//! The one training loop: every model kind trains through [`train`].
//!
//! Order of work: the config and seed are written next to the output first
//! (`OUTPUT.train.json`); the data are loaded, split and normalized; each epoch runs
//! `iterations_per_epoch` optimizer steps on batches from the kind's [`Sampler`],
//! validates, and writes a checkpoint atomically. Each epoch seeds its own RNGs from
//! (seed, epoch), so a run resumed from a checkpoint continues exactly as the uninterrupted
//! run would have. Cancellation (from any thread) stops at the next iteration; the last
//! checkpoint stays.
//!
//! What differs between the kinds (their data, sampling, loss, optimizers, validation and
//! learning-rate schedule) sits in each method's folder behind [`TrainingData`] and
//! [`KindTrainer`]; [`crate::methods`] maps a kind to its [`Method`](crate::engine::method::Method).

pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::dmqpm::net::DmQpmConfig;
use crate::engine::dataset::{MaskMode, Sample};
use crate::engine::device::{device_name, parse_device};
use crate::engine::instances::{InstanceSpec, InstanceTargets};
use crate::engine::metrics;
use crate::engine::model::{EpochRecord, Model, ModelKind, ModelMeta, SegmentOptions};
use crate::engine::normalize::{NormMethod, Normalizer};
use crate::engine::progress::{Monitor, Progress, Stage};
use crate::engine::weights;
use crate::error::{Error, Result};
use crate::musplit::net::MuSplitConfig;
use crate::nnunet::augment::AugmentConfig;
use crate::nnunet::net::UnetConfig;
use crate::pgdiff::PgDiffConfig;

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
    /// "background", "cell"). With instance masks, name the background and the cell
    /// classes; the `boundary` class is added.
    pub classes: Vec<String>,
    /// How the masks are read: "auto" (8-bit = classes, 16-bit or wider = instance labels),
    /// "classes" or "instances" (see `engine::dataset`).
    pub masks: MaskMode,
    /// What a model learns from instance masks: "boundary" (background, cell interiors and
    /// their boundaries; touching cells stay apart) or "foreground" (cells only).
    pub instance_targets: InstanceTargets,
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
            masks: MaskMode::Auto,
            instance_targets: InstanceTargets::Boundary,
            checkpoint: None,
            resume: false,
        }
    }
}

impl TrainConfig {
    pub fn from_json(s: &str) -> Result<Self> {
        let c: TrainConfig =
            serde_json::from_str(s).map_err(|e| Error::Config(format!("training config JSON: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let method = crate::methods::method(ModelKind::parse(&self.kind)?);
        method.check_config(self)?;
        let pos = |v: usize, n: &str| {
            if v == 0 { Err(Error::Config(format!("{n} must be >= 1"))) } else { Ok(()) }
        };
        pos(self.epochs, "epochs")?;
        pos(self.iterations_per_epoch, "iterations_per_epoch")?;
        pos(self.batch_size, "batch_size")?;
        let d = method.patch_divisor(self);
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
            return Err(Error::InvalidArgument(format!(
                "the {what} path '{}' is a directory; expected a file path",
                p.display()
            )));
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

/// The training state stored in a checkpoint's `lumos.checkpoint` metadata, one format
/// for every kind: where the run is, its config and history, and what the kind's loop
/// keeps between epochs (`state`, e.g. muSplit's plateau schedule), flattened into the
/// same JSON object. The optimizers' tensors sit next to the weights
/// ([`optim`]'s names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epochs_completed: usize,
    pub config: TrainConfig,
    pub history: Vec<EpochRecord>,
    #[serde(flatten)]
    pub state: serde_json::Map<String, serde_json::Value>,
}

pub(crate) const CHECKPOINT_KEY: &str = "lumos.checkpoint";

pub(crate) fn per_epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(1))
}

/// Mean foreground Dice of `model` on raw (unnormalized) samples.
pub fn evaluate_samples(model: &Model, samples: &[&Sample]) -> Result<Vec<metrics::ImageScores>> {
    evaluate_samples_with(model, samples, &Monitor::none())
}

/// [`evaluate_samples`], stopped by `monitor`'s cancel token (checked tile by tile; its
/// progress callback is not called): a cancelled training does not wait for validation.
pub fn evaluate_samples_with(
    model: &Model,
    samples: &[&Sample],
    monitor: &Monitor,
) -> Result<Vec<metrics::ImageScores>> {
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

/// Where a kind's training batches come from: random crops of the training data on the
/// device, with the kind's augmentation, drawn from `rng` only (so that a resumed run draws
/// what the uninterrupted one would have).
pub trait Sampler {
    /// One batch `(inputs, targets)` of `batch_size` samples, normalized, on the device.
    fn batch(&self, rng: &mut ChaCha8Rng, batch_size: usize) -> (Tensor, Tensor);
}

/// A kind's training folder, loaded and split into training and validation images
/// ([`Method::load`](crate::engine::method::Method::load)).
pub trait TrainingData {
    /// The names of the training and the validation images (recorded with the run).
    fn names(&self) -> (Vec<String>, Vec<String>);
    /// The new model's metadata: its architecture, channels, classes and the
    /// normalization fitted on the training images.
    fn model_meta(&self, cfg: &TrainConfig) -> Result<ModelMeta>;
    /// The kind's side of the loop for `model` (built from [`model_meta`](Self::model_meta);
    /// the training data are normalized with its metadata's statistics): the training data
    /// on the model's device, the optimizers and the schedule.
    fn trainer(self: Box<Self>, model: &Model, cfg: &TrainConfig) -> Result<Box<dyn KindTrainer>>;
}

/// One epoch's validation.
#[derive(Debug, Clone, Copy)]
pub struct Validation {
    /// Mean foreground Dice (NaN where not measured).
    pub dice: f64,
    /// Mean PSNR in dB, where the kind measures it.
    pub psnr: Option<f64>,
}

impl Validation {
    /// Nothing measured (no validation images).
    pub const NONE: Validation = Validation { dice: f64::NAN, psnr: None };
    /// The number progress reports: the PSNR where measured, else the Dice.
    pub fn metric(&self) -> f64 {
        self.psnr.unwrap_or(self.dice)
    }
}

/// What a model kind does inside the loop. [`train`] calls, per epoch: `begin_epoch`, then
/// for each iteration `sampler().batch` and `step`, then `validate`, `end_epoch`, and
/// writes a checkpoint with `optimizer_state` and `loop_state`.
pub trait KindTrainer {
    /// Epochs of the whole run (PG-DiffSeg: its autoencoder epochs and its diffusion
    /// epochs).
    fn epochs(&self, cfg: &TrainConfig) -> usize {
        cfg.epochs
    }
    /// Before the epoch's first step: the learning rate, the training phase.
    fn begin_epoch(&mut self, _model: &Model, _epoch: usize) -> Result<()> {
        Ok(())
    }
    fn sampler(&self) -> &dyn Sampler;
    /// One optimizer step on a batch; `seed` (from seed, epoch and iteration) seeds what
    /// the step draws from libtorch's generator. Returns the loss before the update.
    fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<f64>;
    /// The learning rate recorded for the epoch (asked after `end_epoch`).
    fn learning_rate(&self) -> f64;
    /// The config setting to lower when the loss diverges.
    fn learning_rate_setting(&self) -> &'static str;
    /// Scores the model on the validation images; a cancel stops it.
    fn validate(&mut self, model: &Model, monitor: &Monitor) -> Result<Validation>;
    /// After validation: a schedule that follows the validation score.
    fn end_epoch(&mut self, _v: &Validation) {}
    /// The optimizers' state, for the checkpoint.
    fn optimizer_state(&self) -> Vec<(String, Tensor)>;
    /// What the kind's loop keeps between epochs, for the checkpoint.
    fn loop_state(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    /// Restores the optimizers and the loop state from a checkpoint.
    fn resume(
        &mut self,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        ck: &Checkpoint,
        device: Device,
    ) -> Result<()>;
    /// What the name of the input normalization is in messages ("image", "input").
    fn input_label(&self) -> &'static str {
        "image"
    }
    /// After the last epoch, before the model is written.
    fn finish(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }
}

/// Trains a model on `data_dir` and writes it to `output`.
pub fn train(cfg: &TrainConfig, data_dir: &Path, output: &Path, monitor: &mut Monitor) -> Result<TrainOutcome> {
    let t0 = Instant::now();
    cfg.validate()?;
    let method = crate::methods::method(ModelKind::parse(&cfg.kind)?);
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

    // the data, split reproducibly by the seed; the run is recorded before any work
    let data = method.load(cfg, data_dir)?;
    let (train_names, val_names) = data.names();
    let run = RunInfo { cfg, data_dir, train_names, val_names, device, t0 };
    run.write_record(&record_path)?;
    let meta = data.model_meta(cfg)?;
    let mut model = Model::new_seeded(meta, device, Some(cfg.seed))?;
    let mut trainer = data.trainer(&model, cfg)?;
    let epochs = trainer.epochs(cfg);

    let mut start_epoch = 0;
    let mut history: Vec<EpochRecord> = Vec::new();
    if cfg.resume && ckpt_path.is_file() {
        let (file, st, ck) = read_checkpoint(&ckpt_path, &model)?;
        check_resume_config(&ckpt_path, &st.config, cfg)?;
        check_resume_data(&ckpt_path, trainer.input_label(), &ck.normalization, &model.meta.normalization)?;
        if let (Some(saved), Some(now)) = (&ck.target_normalization, &model.meta.target_normalization) {
            check_resume_data(&ckpt_path, "target", saved, now)?;
        }
        trainer.resume(&file.tensors, &st, device)?;
        model.meta.normalization = ck.normalization;
        model.meta.target_normalization = ck.target_normalization;
        start_epoch = st.epochs_completed;
        history = st.history;
        log::info!("resuming from '{}' after epoch {start_epoch}", ckpt_path.display());
    }

    for epoch in start_epoch..epochs {
        let te = Instant::now();
        trainer.begin_epoch(&model, epoch)?;
        let es = per_epoch_seed(cfg.seed, epoch);
        let mut rng = ChaCha8Rng::seed_from_u64(es);
        let mut loss_sum = 0.0;
        for it in 0..cfg.iterations_per_epoch {
            monitor.check()?;
            let (x, y) = trainer.sampler().batch(&mut rng, cfg.batch_size);
            let l = trainer.step(&model, &x, &y, per_epoch_seed(es, it))?;
            if !l.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "training diverged (loss {l}) at epoch {epoch}, iteration {it}; lower {}",
                    trainer.learning_rate_setting()
                )));
            }
            loss_sum += l;
            monitor.emit(Progress {
                stage: Stage::Training,
                epoch,
                epochs,
                iteration: it,
                iterations: cfg.iterations_per_epoch,
                loss: l,
                val_metric: f64::NAN,
            });
        }
        monitor.check()?;
        // a cancel during validation ends the run at once; the last checkpoint (the
        // previous epoch's) stays
        let v = trainer.validate(&model, monitor)?;
        trainer.end_epoch(&v);
        let rec = EpochRecord {
            epoch,
            learning_rate: trainer.learning_rate(),
            train_loss: loss_sum / cfg.iterations_per_epoch as f64,
            val_dice: v.dice,
            val_psnr: v.psnr,
            seconds: te.elapsed().as_secs_f64(),
        };
        monitor.emit(Progress {
            stage: Stage::Validation,
            epoch,
            epochs,
            iteration: cfg.iterations_per_epoch,
            iterations: cfg.iterations_per_epoch,
            loss: rec.train_loss,
            val_metric: v.metric(),
        });
        log::info!(
            "{} epoch {}/{epochs}: loss {:.4}, validation {:.4}, {:.1} s",
            cfg.kind,
            epoch + 1,
            rec.train_loss,
            v.metric(),
            rec.seconds
        );
        history.push(rec);
        let st = Checkpoint {
            epochs_completed: epoch + 1,
            config: cfg.clone(),
            history: history.clone(),
            state: trainer.loop_state(),
        };
        let mut md = HashMap::new();
        md.insert(CHECKPOINT_KEY.to_string(), serde_json::to_string(&st).expect("json"));
        model.meta.provenance = run.provenance(epoch + 1, &history);
        model.save_with(&ckpt_path, &trainer.optimizer_state(), md)?;
        monitor.emit(Progress { stage: Stage::Checkpoint, epoch, epochs, ..Progress::new(Stage::Checkpoint) });
    }
    trainer.finish(&model)?;
    model.meta.provenance = run.provenance(epochs, &history);
    model.save(output)?;
    monitor.emit(Progress { stage: Stage::Done, epoch: epochs, epochs, ..Progress::new(Stage::Done) });
    Ok(TrainOutcome { model, history })
}

/// Splits `items` into the training and the validation part by `cfg`'s `val_fraction`
/// and `seed` (the same split for every kind), each in the order the split draws.
pub fn split_train_val<T>(items: Vec<T>, cfg: &TrainConfig) -> (Vec<T>, Vec<T>) {
    let (train_idx, val_idx) = crate::engine::dataset::split_indices(items.len(), cfg.val_fraction, cfg.seed);
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let mut take =
        |idx: Vec<usize>| idx.into_iter().map(|i| slots[i].take().expect("indices are distinct")).collect::<Vec<T>>();
    let train = take(train_idx);
    let val = take(val_idx);
    (train, val)
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
        if s.chars().count() > 80 { format!("{}...", s.chars().take(77).collect::<String>()) } else { s }
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

fn read_checkpoint(path: &Path, model: &Model) -> Result<(weights::TensorFile, Checkpoint, ModelMeta)> {
    let file = weights::load(path)?;
    let st: Checkpoint = serde_json::from_str(file.metadata.get(CHECKPOINT_KEY).ok_or_else(|| {
        Error::ModelFormat(format!("'{}' is a model file, not a training checkpoint", path.display()))
    })?)
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
/// for binary masks, or "background", "class1", ... otherwise. With boundary targets from
/// instance masks, `boundary` is the last class.
pub(crate) fn class_names(
    cfg: &TrainConfig,
    samples: &[Sample],
    instances: Option<&InstanceSpec>,
) -> Result<Vec<String>> {
    let used = crate::engine::dataset::labels_used(samples);
    let boundary = instances.and_then(|s| s.boundary_class);
    // the labels the names are for: background and cell classes
    let max_label = match boundary {
        Some(b) => b as usize - 1,
        None => (0..256).rev().find(|&v| used[v]).unwrap_or(0),
    };
    // class masks use few, dense labels; instance masks (one label per cell) or 8-bit
    // intensities would silently become a network of up to 256 classes
    if cfg.classes.is_empty() && max_label > 1 && instances.is_none() {
        let n_used = (1..=max_label).filter(|&v| used[v]).count();
        if max_label > 32 || 2 * n_used < max_label {
            return Err(Error::InvalidInput(format!(
                "the masks use {n_used} different labels between 1 and {max_label}: they look like instance IDs (one label \
                 per cell) or intensities, not classes. Train from instance labels with masks = \"instances\" \
                 (--masks instances), or convert the masks (e.g. every cell to 1), or list {} class names in the config's \
                 `classes` to confirm that many classes",
                max_label + 1
            )));
        }
    }
    let mut names = if !cfg.classes.is_empty() {
        let given_boundary = boundary.is_some() && cfg.classes.last().is_some_and(|c| c == "boundary");
        let n = cfg.classes.len() - usize::from(given_boundary);
        if n <= max_label {
            return Err(Error::Config(format!(
                "{} class names given but the masks contain label {max_label}; expected at least {} names",
                n,
                max_label + 1
            )));
        }
        cfg.classes[..n].to_vec()
    } else if max_label <= 1 {
        vec!["background".into(), "cell".into()]
    } else {
        std::iter::once("background".to_string()).chain((1..=max_label).map(|k| format!("class{k}"))).collect()
    };
    if let Some(b) = boundary {
        names.truncate(b as usize);
        names.push("boundary".into());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use ndarray::{Array2, Array3};

    fn sample(labels: Vec<u8>) -> Sample {
        let n = labels.len();
        Sample {
            name: "s".into(),
            image: Image::new(Array3::zeros((1, 1, n))),
            mask: Array2::from_shape_vec((1, n), labels).unwrap(),
        }
    }

    /// Instance masks (a label per cell) and sparse labels are refused unless the classes
    /// are named; dense class labels pass.
    #[test]
    fn instance_like_masks_are_refused_unless_the_classes_are_named() {
        let cfg = TrainConfig::default();
        assert_eq!(class_names(&cfg, &[sample(vec![0, 1, 2])], None).unwrap(), vec!["background", "class1", "class2"]);
        let instances = sample((0..=40).collect());
        let e = class_names(&cfg, std::slice::from_ref(&instances), None).unwrap_err().to_string();
        assert!(e.contains("instance IDs"), "{e}");
        let sparse = sample(vec![0, 3, 9]);
        assert!(class_names(&cfg, std::slice::from_ref(&sparse), None).is_err());
        let named = TrainConfig { classes: (0..=40).map(|k| format!("c{k}")).collect(), ..TrainConfig::default() };
        assert_eq!(class_names(&named, &[instances], None).unwrap().len(), 41);
    }
}
