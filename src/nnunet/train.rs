//! The segmentation trainer (kinds `unet` and `dmqpm`): nnU-Net's recipe. Random patches,
//! a third of them centred on foreground, nnU-Net's 2D augmentation, deep-supervision
//! CE + soft Dice, SGD with Nesterov momentum at a poly learning rate, gradient-norm
//! clipping, and the validation images' mean foreground Dice after each epoch.

use std::collections::BTreeMap;
use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

use crate::engine::dataset::{Loaded, Sample, load_segmentation};
use crate::engine::instances::InstanceSpec;
use crate::engine::metrics;
use crate::engine::model::{Model, ModelKind, ModelMeta};
use crate::engine::normalize::{NormMethod, Normalizer};
use crate::engine::progress::Monitor;
use crate::engine::train::optim::{Clip, Optimizer, Rule};
use crate::engine::train::{
    Checkpoint, KindTrainer, Sampler, TrainConfig, TrainingData, Validation, class_names, evaluate_samples_with,
    split_train_val,
};
use crate::error::Result;
use crate::image::{Image, array3_to_tensor, mask_to_tensor};
use crate::nnunet::augment::{AugmentConfig, augment_batch};
use crate::nnunet::loss::deep_supervision_loss;

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

/// A segmentation folder (`DIR/images`, `DIR/masks`), split.
pub(crate) struct SegmentationData {
    kind: ModelKind,
    channel_names: Vec<String>,
    classes: Vec<String>,
    instances: Option<InstanceSpec>,
    train: Vec<Sample>,
    val: Vec<Sample>,
}

/// Loads a segmentation folder for a `kind` model.
pub(crate) fn load(kind: ModelKind, cfg: &TrainConfig, data_dir: &Path) -> Result<Box<dyn TrainingData>> {
    let Loaded { samples, instances } = load_segmentation(data_dir, cfg.masks, cfg.instance_targets)?;
    let channel_names = samples[0].image.channel_names.clone();
    let classes = class_names(cfg, &samples, instances.as_ref())?;
    let (train, val) = split_train_val(samples, cfg);
    Ok(Box::new(SegmentationData { kind, channel_names, classes, instances, train, val }))
}

fn names(v: &[Sample]) -> Vec<String> {
    v.iter().map(|s| s.name.clone()).collect()
}

impl TrainingData for SegmentationData {
    fn names(&self) -> (Vec<String>, Vec<String>) {
        (names(&self.train), names(&self.val))
    }

    fn model_meta(&self, cfg: &TrainConfig) -> Result<ModelMeta> {
        let methods = if cfg.normalization.is_empty() {
            default_normalization(self.kind, &self.channel_names)
        } else {
            cfg.normalization.clone()
        };
        let normalizer = Normalizer::fit(&methods, &self.train.iter().map(|s| &s.image).collect::<Vec<&Image>>())?;
        let architecture = match self.kind {
            ModelKind::Dmqpm => serde_json::to_value(&cfg.dmqpm),
            _ => serde_json::to_value(&cfg.unet),
        }
        .expect("json");
        let mut meta = ModelMeta::new(
            self.kind,
            architecture,
            self.channel_names.clone(),
            self.classes.clone(),
            cfg.patch_size,
            normalizer,
        );
        meta.instances = self.instances;
        Ok(meta)
    }

    fn trainer(self: Box<Self>, model: &Model, cfg: &TrainConfig) -> Result<Box<dyn KindTrainer>> {
        let norm = &model.meta.normalization;
        let refs: Vec<&Sample> = self.train.iter().collect();
        let set = TrainSet::new(&refs, norm, cfg, model.device())?;
        Ok(Box::new(SegmentationTrainer {
            step: SegmentationStep::new(model, cfg),
            set,
            val: self.val,
            base_lr: cfg.learning_rate,
            epochs: cfg.epochs,
            lr: cfg.learning_rate,
        }))
    }
}

/// In-memory training data on the device: normalized images and masks, padded to at
/// least one patch, with the foreground pixel positions of each image; batches are
/// augmented.
struct TrainSet {
    images: Vec<Tensor>,
    masks: Vec<Tensor>,
    foreground: Vec<Vec<(usize, usize)>>,
    sizes: Vec<(usize, usize)>,
    patch: [usize; 2],
    fg_fraction: f64,
    augmentation: AugmentConfig,
}

impl TrainSet {
    fn new(samples: &[&Sample], norm: &Normalizer, cfg: &TrainConfig, device: Device) -> Result<Self> {
        let patch = cfg.patch_size;
        let mut s = TrainSet {
            images: vec![],
            masks: vec![],
            foreground: vec![],
            sizes: vec![],
            patch,
            fg_fraction: cfg.foreground_oversampling,
            augmentation: cfg.augmentation.clone(),
        };
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
}

impl Sampler for TrainSet {
    /// A batch `(B, C, ph, pw)`, `(B, ph, pw)`; the last `fg_fraction` of it is centred
    /// on foreground pixels (nnU-Net's oversampling), then augmented.
    fn batch(&self, rng: &mut ChaCha8Rng, b: usize) -> (Tensor, Tensor) {
        let patch = self.patch;
        let n_fg = (b as f64 * self.fg_fraction).round() as usize;
        let (mut xs, mut ms) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for k in 0..b {
            let i = rng.random_range(0..self.images.len());
            let (h, w) = self.sizes[i];
            let (y, x) = if k >= b - n_fg && !self.foreground[i].is_empty() {
                let (cy, cx) = self.foreground[i][rng.random_range(0..self.foreground[i].len())];
                (cy.saturating_sub(patch[0] / 2).min(h - patch[0]), cx.saturating_sub(patch[1] / 2).min(w - patch[1]))
            } else {
                (rng.random_range(0..=h - patch[0]), rng.random_range(0..=w - patch[1]))
            };
            let crop =
                |t: &Tensor, d0: i64| t.narrow(d0, y as i64, patch[0] as i64).narrow(d0 + 1, x as i64, patch[1] as i64);
            xs.push(crop(&self.images[i], 1).unsqueeze(0));
            ms.push(crop(&self.masks[i], 0).unsqueeze(0));
        }
        augment_batch(&Tensor::cat(&xs, 0), &Tensor::cat(&ms, 0), &self.augmentation, rng)
    }
}

/// One optimization step of the segmentation trainer (kinds `unet` and `dmqpm`), exactly
/// as the training loop runs it for every iteration: the forward pass (with deep
/// supervision when the config asks for it), nnU-Net's loss (`deep_supervision_loss`:
/// CE + soft Dice), the backward pass, gradient-norm clipping at `grad_clip`, and one
/// step of SGD with Nesterov momentum (`momentum`, `weight_decay`) at the given learning
/// rate. The optimizer's state lives here. `benches/compare.rs` times it on a fixed batch.
pub struct SegmentationStep {
    opt: Optimizer,
    deep_supervision: bool,
}

impl SegmentationStep {
    /// A fresh optimizer over the model's trainable variables, with `cfg`'s `momentum`,
    /// `weight_decay`, `grad_clip` and `deep_supervision`.
    pub fn new(model: &Model, cfg: &TrainConfig) -> Self {
        let rule = Rule::Sgd { momentum: cfg.momentum, weight_decay: cfg.weight_decay, nesterov: true };
        SegmentationStep {
            opt: Optimizer::new(&model.lock().vs, rule, Clip::Norm(cfg.grad_clip), "optimizer.", &[]),
            deep_supervision: cfg.deep_supervision,
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
            self.opt.zero_grad()?;
            loss.f_backward()?;
            Ok(loss)
        })?;
        self.opt.step(lr)?;
        Ok(loss.double_value(&[]))
    }
}

/// The segmentation kinds' side of the training loop.
struct SegmentationTrainer {
    step: SegmentationStep,
    set: TrainSet,
    val: Vec<Sample>,
    base_lr: f64,
    epochs: usize,
    lr: f64,
}

impl KindTrainer for SegmentationTrainer {
    /// nnU-Net's poly schedule: `lr = base * (1 - epoch / epochs)^0.9`.
    fn begin_epoch(&mut self, _model: &Model, epoch: usize) -> Result<()> {
        self.lr = self.base_lr * (1.0 - epoch as f64 / self.epochs as f64).powf(0.9);
        Ok(())
    }
    fn sampler(&self) -> &dyn Sampler {
        &self.set
    }
    fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, _seed: u64) -> Result<f64> {
        self.step.step(model, x, y, self.lr)
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn learning_rate_setting(&self) -> &'static str {
        "learning_rate"
    }
    fn validate(&mut self, model: &Model, monitor: &Monitor) -> Result<Validation> {
        if self.val.is_empty() {
            return Ok(Validation::NONE);
        }
        let refs: Vec<&Sample> = self.val.iter().collect();
        let dice = metrics::mean(
            &evaluate_samples_with(model, &refs, monitor)?.iter().map(|s| s.mean_fg_dice()).collect::<Vec<_>>(),
        );
        Ok(Validation { dice, psnr: None })
    }
    fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        self.step.opt.state()
    }
    fn resume(&mut self, tensors: &BTreeMap<String, Tensor>, _ck: &Checkpoint, device: Device) -> Result<()> {
        self.step.opt.load_state(tensors, device);
        Ok(())
    }
}
