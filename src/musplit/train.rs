//! The decomposition trainer (kind `musplit`): random `T x T` patches with their lateral
//! context and the matching target patches, random flips and 90 degree rotations, Adamax
//! with gradient clipping by value, the learning rate halved when the validation PSNR has
//! not improved for `lr_patience` epochs (that schedule's state is checkpointed).

use std::collections::BTreeMap;
use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::engine::metrics;
use crate::engine::model::{Model, ModelKind, ModelMeta, TORCH_RNG};
use crate::engine::normalize::{NormMethod, Normalizer};
use crate::engine::progress::Monitor;
use crate::engine::train::optim::{Clip, Optimizer, Rule};
use crate::engine::train::{Checkpoint, KindTrainer, Sampler, TrainConfig, TrainingData, Validation, split_train_val};
use crate::error::{Error, Result};
use crate::image::array3_to_tensor;
use crate::musplit::lc;
use crate::musplit::net::{MuSplitNet, SplitVariant};
use crate::musplit::{DecomposeOptions, SplitSample, evaluate_split, load_split_folder};

/// A decomposition folder, split.
pub(crate) struct SplitData {
    classes: Vec<String>,
    train: Vec<SplitSample>,
    val: Vec<SplitSample>,
}

pub(crate) fn load(cfg: &TrainConfig, data_dir: &Path) -> Result<Box<dyn TrainingData>> {
    let samples = load_split_folder(data_dir)?;
    let classes = samples[0].targets.channel_names.clone();
    let (train, val) = split_train_val(samples, cfg);
    Ok(Box::new(SplitData { classes, train, val }))
}

impl TrainingData for SplitData {
    fn names(&self) -> (Vec<String>, Vec<String>) {
        let names = |v: &[SplitSample]| v.iter().map(|s| s.name.clone()).collect();
        (names(&self.train), names(&self.val))
    }

    /// Input and targets: clipped at the 0.995 quantile of the training data and z-scored,
    /// the input with one mean / std, each target channel with its own.
    fn model_meta(&self, cfg: &TrainConfig) -> Result<ModelMeta> {
        let q = [NormMethod::RobustQuantile { q_low: 0.0, q_high: 0.995 }];
        let in_norm = Normalizer::fit(&q, &self.train.iter().map(|s| &s.input).collect::<Vec<_>>())?;
        let tg_norm = Normalizer::fit(&q, &self.train.iter().map(|s| &s.targets).collect::<Vec<_>>())?;
        let mut meta = ModelMeta::new(
            ModelKind::Musplit,
            serde_json::to_value(&cfg.musplit).expect("json"),
            vec!["mixed".into()],
            self.classes.clone(),
            cfg.patch_size,
            in_norm,
        );
        meta.target_normalization = Some(tg_norm);
        Ok(meta)
    }

    fn trainer(self: Box<Self>, model: &Model, cfg: &TrainConfig) -> Result<Box<dyn KindTrainer>> {
        let in_norm = &model.meta.normalization;
        let tg_norm = model
            .meta
            .target_normalization
            .as_ref()
            .ok_or_else(|| Error::ModelFormat("a musplit model needs target normalization statistics".into()))?;
        let device = model.device();
        let set = SplitSet {
            inputs: self
                .train
                .iter()
                .map(|s| Ok(array3_to_tensor(in_norm.apply_image(&s.input)?.data.view(), device).get(0)))
                .collect::<Result<_>>()?,
            targets: self
                .train
                .iter()
                .map(|s| Ok(array3_to_tensor(tg_norm.apply_image(&s.targets)?.data.view(), device)))
                .collect::<Result<_>>()?,
            tile: cfg.patch_size[0] as i64,
            levels: cfg.musplit.input_channels(),
        };
        Ok(Box::new(SplitTrainer {
            step: DecompositionStep::new(model, cfg),
            set,
            val: self.val,
            eval_opts: DecomposeOptions { seed: cfg.seed, ..Default::default() },
            patience: cfg.musplit.lr_patience,
            schedule: Plateau { learning_rate: cfg.musplit.learning_rate, best_val_psnr: None, bad_epochs: 0 },
        }))
    }
}

/// Training frames on the device, normalized: inputs `(H, W)`, targets `(2, H, W)`.
struct SplitSet {
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
    tile: i64,
    levels: usize,
}

impl Sampler for SplitSet {
    /// Inputs with their lateral context `(B, levels, T, T)` and targets `(B, 2, T, T)`,
    /// centred anywhere a whole tile fits, with one random flip / rotation for both.
    fn batch(&self, rng: &mut ChaCha8Rng, b: usize) -> (Tensor, Tensor) {
        let tile = self.tile;
        let (mut xs, mut ys) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for _ in 0..b {
            let i = rng.random_range(0..self.inputs.len());
            let (h, w) = (self.inputs[i].size()[0], self.inputs[i].size()[1]);
            let pick = |rng: &mut ChaCha8Rng, n: i64| {
                if n > tile { rng.random_range(tile / 2..=n - tile / 2) } else { n / 2 }
            };
            let (cy, cx) = (pick(rng, h), pick(rng, w));
            let x = lc::crops(&self.inputs[i], cy, cx, tile, self.levels);
            let y = Tensor::stack(
                &(0..2)
                    .map(|c| lc::gather(&self.targets[i].get(c), cy - tile / 2, tile, cx - tile / 2, tile))
                    .collect::<Vec<_>>(),
                0,
            );
            let rot = rng.random_range(0..4i64);
            let flip = rng.random_bool(0.5);
            let aug = |t: Tensor| {
                let t = if rot > 0 { t.rot90(rot, [1, 2]) } else { t };
                if flip { t.flip([2]) } else { t }
            };
            xs.push(aug(x));
            ys.push(aug(y));
        }
        (Tensor::stack(&xs, 0), Tensor::stack(&ys, 0))
    }
}

/// One optimization step of the decomposition trainer (kind `musplit`), exactly as the
/// training loop runs it for every iteration: the forward pass in training mode, the
/// model's loss (MSE for the U-Net; Gaussian NLL + KL for the HVAE), the backward pass,
/// gradient clipping by value (`musplit.grad_clip_value`) and one Adamax step at the given
/// learning rate. The optimizer's state lives here. `benches/compare.rs` times it on a
/// fixed batch.
pub struct DecompositionStep {
    opt: Optimizer,
    variant: SplitVariant,
}

impl DecompositionStep {
    /// A fresh Adamax over the model's trainable variables, with `cfg.musplit`'s
    /// `grad_clip_value`.
    pub fn new(model: &Model, cfg: &TrainConfig) -> Self {
        let opt =
            Optimizer::new(&model.lock().vs, Rule::ADAMAX, Clip::Value(cfg.musplit.grad_clip_value), "optimizer.", &[]);
        DecompositionStep { opt, variant: cfg.musplit.variant }
    }

    /// One step on a batch: normalized inputs with their lateral context `x`
    /// `(N, 1 + lc_levels, T, T)` and normalized targets `y` `(N, 2, T, T)`, on the model's
    /// device, at learning rate `lr`. The HVAE's latent samples and dropout come from
    /// libtorch's process-wide generator, seeded with `seed` and held for the step (the
    /// trainer passes a seed derived from (seed, epoch, iteration)); the U-Net draws
    /// nothing. Returns the loss before the update (reading it waits for the device).
    pub fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, lr: f64, seed: u64) -> Result<f64> {
        let hvae = self.variant == SplitVariant::Hvae;
        let _rng = hvae.then(|| TORCH_RNG.lock());
        // a retry on libtorch's operators (backend::onednn::train_step) draws the same samples
        let loss = crate::backend::onednn::train_step(|| {
            if hvae {
                tch::manual_seed(seed as i64);
            }
            let loss = {
                let inner = model.lock();
                let net = inner.net.downcast::<MuSplitNet>().ok_or_else(|| {
                    Error::Unsupported(format!(
                        "a '{}' model is not trained by the decomposition trainer",
                        model.meta.kind.name()
                    ))
                })?;
                let out = net.forward_t(x, true);
                if log::log_enabled!(log::Level::Debug) {
                    let kl = out.kl.as_ref().map(|k| k.double_value(&[])).unwrap_or(f64::NAN);
                    let mean_abs = out.mean.abs().max().double_value(&[]);
                    log::debug!("training step: KL {kl:.4}, max |mean| {mean_abs:.3}");
                }
                net.loss(&out, y)
            };
            self.opt.zero_grad()?;
            loss.f_backward()?;
            Ok(loss)
        })?;
        self.opt.step(lr)?;
        Ok(loss.double_value(&[]))
    }
}

/// The learning-rate schedule that follows the validation PSNR (checkpointed as these
/// three fields of the checkpoint's state).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plateau {
    learning_rate: f64,
    best_val_psnr: Option<f64>,
    bad_epochs: usize,
}

struct SplitTrainer {
    step: DecompositionStep,
    set: SplitSet,
    val: Vec<SplitSample>,
    eval_opts: DecomposeOptions,
    patience: usize,
    schedule: Plateau,
}

impl KindTrainer for SplitTrainer {
    fn sampler(&self) -> &dyn Sampler {
        &self.set
    }
    /// The HVAE's samples and dropout come from libtorch's process-wide generator: seeded
    /// per iteration and held for the step, so that other threads cannot change this run.
    fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<f64> {
        self.step.step(model, x, y, self.schedule.learning_rate, seed)
    }
    /// After `end_epoch`: the rate of the next epoch.
    fn learning_rate(&self) -> f64 {
        self.schedule.learning_rate
    }
    fn learning_rate_setting(&self) -> &'static str {
        "musplit.learning_rate"
    }
    fn validate(&mut self, model: &Model, _monitor: &Monitor) -> Result<Validation> {
        if self.val.is_empty() {
            return Ok(Validation::NONE);
        }
        let refs: Vec<&SplitSample> = self.val.iter().collect();
        let scores = evaluate_split(model, &refs, &self.eval_opts)?;
        let psnr = metrics::mean(&scores.iter().map(|s| metrics::mean(&s.psnr)).collect::<Vec<_>>());
        Ok(Validation { dice: f64::NAN, psnr: Some(psnr) })
    }
    fn end_epoch(&mut self, v: &Validation) {
        let Some(psnr) = v.psnr else { return };
        let s = &mut self.schedule;
        // a NaN PSNR (a broken prediction) is never the best: it counts as a bad epoch
        if psnr.is_finite() && s.best_val_psnr.is_none_or(|b| psnr > b + 1e-4) {
            s.best_val_psnr = Some(psnr);
            s.bad_epochs = 0;
        } else {
            s.bad_epochs += 1;
            if s.bad_epochs > self.patience {
                s.learning_rate *= 0.5;
                s.bad_epochs = 0;
            }
        }
    }
    fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        self.step.opt.state()
    }
    fn loop_state(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(&self.schedule) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }
    fn resume(&mut self, tensors: &BTreeMap<String, Tensor>, ck: &Checkpoint, device: Device) -> Result<()> {
        self.step.opt.load_state(tensors, device);
        self.schedule = serde_json::from_value(serde_json::Value::Object(ck.state.clone())).map_err(|e| {
            Error::ModelFormat(format!("the checkpoint's muSplit schedule is missing or corrupt ({e})"))
        })?;
        Ok(())
    }
    fn input_label(&self) -> &'static str {
        "input"
    }
}
