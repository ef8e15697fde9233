//! The PG-DiffSeg trainer (kind `pgdiff`): first `pgdiff.ae_epochs` epochs of the
//! autoencoder (L1 reconstruction + weighted KL, Adam), then the latent scale fitted to
//! the training latents, then `epochs` epochs of LDM-P and LDM-S together (epsilon
//! prediction, Adam). Validation: the autoencoder's reconstruction PSNR in its phase, the
//! segmentation Dice of fast sampling afterwards.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::engine::dataset::{Loaded, Sample, load_segmentation};
use crate::engine::instances::InstanceSpec;
use crate::engine::metrics;
use crate::engine::model::{Model, ModelKind, ModelMeta, SegmentOptions, TORCH_RNG};
use crate::engine::normalize::{NormMethod, Normalizer};
use crate::engine::progress::Monitor;
use crate::engine::train::optim::{Clip, Optimizer, Rule};
use crate::engine::train::{
    Checkpoint, KindTrainer, Sampler, TrainConfig, TrainingData, Validation, class_names, split_train_val,
};
use crate::error::{Error, Result};
use crate::image::{array3_to_tensor, mask_to_tensor};
use crate::pgdiff::{DiffusionOptions, PgDiffConfig, reconstruction_psnr};

/// A segmentation folder of QPI (`DIR/images` phase, `DIR/masks` labels), split.
pub(crate) struct TileData {
    channel_names: Vec<String>,
    classes: Vec<String>,
    instances: Option<InstanceSpec>,
    train: Vec<Sample>,
    val: Vec<Sample>,
}

pub(crate) fn load(cfg: &TrainConfig, data_dir: &Path) -> Result<Box<dyn TrainingData>> {
    let Loaded { samples, instances } = load_segmentation(data_dir, cfg.masks, cfg.instance_targets)?;
    let mut classes = class_names(cfg, &samples, instances.as_ref())?;
    let boundary = usize::from(instances.is_some_and(|s| s.boundary_class.is_some()));
    if cfg.classes.is_empty() && classes.len() - boundary == 3 {
        // three labels are the live / dead setting of the paper and the simulator
        for (c, name) in classes.iter_mut().zip(crate::sim::qpi::CLASS_NAMES) {
            *c = name.to_string();
        }
    }
    let channel_names = samples[0].image.channel_names.clone();
    let (train, val) = split_train_val(samples, cfg);
    Ok(Box::new(TileData { channel_names, classes, instances, train, val }))
}

impl TrainingData for TileData {
    fn names(&self) -> (Vec<String>, Vec<String>) {
        let names = |v: &[Sample]| v.iter().map(|s| s.name.clone()).collect();
        (names(&self.train), names(&self.val))
    }

    fn model_meta(&self, cfg: &TrainConfig) -> Result<ModelMeta> {
        let norm =
            if cfg.normalization.is_empty() { vec![NormMethod::DatasetZscore] } else { cfg.normalization.clone() };
        let normalizer = Normalizer::fit(&norm, &self.train.iter().map(|s| &s.image).collect::<Vec<_>>())?;
        let mut meta = ModelMeta::new(
            ModelKind::Pgdiff,
            serde_json::to_value(&cfg.pgdiff).expect("json"),
            self.channel_names.clone(),
            self.classes.clone(),
            cfg.patch_size,
            normalizer,
        );
        meta.instances = self.instances;
        Ok(meta)
    }

    fn trainer(self: Box<Self>, model: &Model, cfg: &TrainConfig) -> Result<Box<dyn KindTrainer>> {
        let normalizer = &model.meta.normalization;
        let device = model.device();
        let set = TileSet {
            images: self
                .train
                .iter()
                .map(|s| Ok(array3_to_tensor(normalizer.apply_image(&s.image)?.data.view(), device)))
                .collect::<Result<_>>()?,
            masks: self.train.iter().map(|s| mask_to_tensor(&s.mask, device).to_kind(Kind::Int64)).collect(),
            tile: cfg.patch_size[0] as i64,
        };
        Ok(Box::new(DiffusionTrainer {
            step: DiffusionStep::new(model, cfg),
            set,
            val: self.val,
            pgdiff: cfg.pgdiff.clone(),
            seed: cfg.seed,
            ae_phase: true,
        }))
    }
}

/// One optimization step of the PG-DiffSeg trainer (kind `pgdiff`), exactly as the training
/// loop runs it for every iteration. Autoencoder phase: L1 reconstruction of a posterior
/// sample plus the weighted KL, Adam on the autoencoder. Diffusion phase: the image
/// latents (encoder without gradients), uniform timesteps and Gaussian noise for LDM-P
/// (image latents) and LDM-S (mask latents conditioned on the image latent), the sum of
/// both epsilon-prediction L2 losses, Adam on LDM-P and LDM-S. Then the backward pass,
/// gradient-norm clipping (`pgdiff.grad_clip`) and the Adam update at the phase's learning
/// rate. Both optimizers' state lives here. `benches/compare.rs` times it on a fixed
/// batch.
pub struct DiffusionStep {
    opt_ae: Optimizer,
    opt_dm: Optimizer,
    cfg: PgDiffConfig,
}

impl DiffusionStep {
    /// Fresh Adam optimizers for the autoencoder (`ae.*`) and the denoisers
    /// (`ldm_p.*`, `ldm_s.*`), with `cfg.pgdiff`'s learning rates, clipping and KL weight.
    pub fn new(model: &Model, cfg: &TrainConfig) -> Self {
        let inner = model.lock();
        DiffusionStep {
            opt_ae: Optimizer::new(&inner.vs, Rule::ADAM, Clip::Norm(cfg.pgdiff.grad_clip), "optimizer.ae.", &["ae."]),
            opt_dm: Optimizer::new(
                &inner.vs,
                Rule::ADAM,
                Clip::Norm(cfg.pgdiff.grad_clip),
                "optimizer.ldm.",
                &["ldm_p.", "ldm_s."],
            ),
            cfg: cfg.pgdiff.clone(),
        }
    }

    /// One step on a batch: normalized tiles `x` `(N, C, T, T)` and labels `y` `(N, T, T)`
    /// (int64), on the model's device; `ae_phase` picks the autoencoder step, otherwise
    /// the diffusion step. Timesteps, noise and posterior samples come from libtorch's
    /// process-wide generator, seeded with `seed` and held while the loss and gradients
    /// are computed (the trainer passes a seed derived from (seed, epoch, iteration)).
    /// Returns the loss before the update (reading it waits for the device).
    pub fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, ae_phase: bool, seed: u64) -> Result<f64> {
        let pc = &self.cfg;
        let device = model.device();
        let guard = TORCH_RNG.lock();
        tch::manual_seed(seed as i64);
        let loss = {
            let inner = model.lock();
            let net = super::pgdiff_net(&inner.net, model, "is not trained by the PG-DiffSeg trainer")?;
            if ae_phase {
                let post = net.ae.encode(x);
                let rec = net.ae.decode(&post.sample());
                let per_px = (x.numel() / x.size()[0] as usize) as f64;
                (x - rec).abs().mean(Kind::Float) + post.kl().mean(Kind::Float) * (pc.autoencoder.kl_weight / per_px)
            } else {
                let z = tch::no_grad(|| net.encode(x));
                let n = z.size()[0];
                let tp = Tensor::randint(pc.timesteps as i64, [n], (Kind::Int64, device));
                let ep = z.randn_like();
                let lp = (net.ldm_p.forward_t(&net.schedule.q_sample(&z, &tp, &ep), &tp, true) - &ep)
                    .square()
                    .mean(Kind::Float);
                let m = net.mask_latent(y);
                let ts = Tensor::randint(pc.timesteps as i64, [n], (Kind::Int64, device));
                let es_ = m.randn_like();
                let xs = Tensor::cat(&[net.schedule.q_sample(&m, &ts, &es_), z], 1);
                let ls = (net.ldm_s.forward_t(&xs, &ts, true) - &es_).square().mean(Kind::Float);
                lp + ls
            }
        };
        let opt = if ae_phase { &mut self.opt_ae } else { &mut self.opt_dm };
        opt.zero_grad()?;
        loss.f_backward()?;
        drop(guard);
        opt.step(if ae_phase { pc.ae_learning_rate } else { pc.learning_rate })?;
        Ok(loss.double_value(&[]))
    }
}

/// Normalized training images `(C, H, W)` and masks `(H, W)` on the device.
struct TileSet {
    images: Vec<Tensor>,
    masks: Vec<Tensor>,
    tile: i64,
}

impl Sampler for TileSet {
    /// Random `T x T` crops with rot90 / flip and brightness / contrast jitter.
    fn batch(&self, rng: &mut ChaCha8Rng, b: usize) -> (Tensor, Tensor) {
        let tile = self.tile;
        let (mut xs, mut ys) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for _ in 0..b {
            let i = rng.random_range(0..self.images.len());
            let (h, w) = (self.images[i].size()[1], self.images[i].size()[2]);
            let (ph, pw) = ((tile - h).max(0), (tile - w).max(0));
            let (img, msk) = if ph > 0 || pw > 0 {
                (self.images[i].constant_pad_nd([0, pw, 0, ph]), self.masks[i].constant_pad_nd([0, pw, 0, ph]))
            } else {
                (self.images[i].shallow_clone(), self.masks[i].shallow_clone())
            };
            let y0 = rng.random_range(0..=(h + ph - tile));
            let x0 = rng.random_range(0..=(w + pw - tile));
            let x = img.narrow(1, y0, tile).narrow(2, x0, tile);
            let y = msk.narrow(0, y0, tile).narrow(1, x0, tile);
            let rot = rng.random_range(0..4i64);
            let flip = rng.random_bool(0.5);
            let contrast = rng.random_range(0.9..1.1);
            let bright = rng.random_range(-0.1..0.1);
            let x = if rot > 0 { x.rot90(rot, [1, 2]) } else { x };
            let y = if rot > 0 { y.rot90(rot, [0, 1]) } else { y };
            let (x, y) = if flip { (x.flip([2]), y.flip([1])) } else { (x, y) };
            xs.push(x * contrast + bright);
            ys.push(y);
        }
        (Tensor::stack(&xs, 0), Tensor::stack(&ys, 0))
    }
}

/// Fast sampling used for validation during training.
fn validation_options(seed: u64) -> DiffusionOptions {
    DiffusionOptions { inversion_steps: 10, sampling_steps: 20, seed, ..DiffusionOptions::default() }
}

/// The PG-DiffSeg side of the training loop.
struct DiffusionTrainer {
    step: DiffusionStep,
    set: TileSet,
    val: Vec<Sample>,
    pgdiff: PgDiffConfig,
    seed: u64,
    ae_phase: bool,
}

impl KindTrainer for DiffusionTrainer {
    fn epochs(&self, cfg: &TrainConfig) -> usize {
        self.pgdiff.ae_epochs + cfg.epochs
    }
    /// The phase; the latent scale is fitted when the diffusion epochs begin.
    fn begin_epoch(&mut self, model: &Model, epoch: usize) -> Result<()> {
        self.ae_phase = epoch < self.pgdiff.ae_epochs;
        if epoch == self.pgdiff.ae_epochs {
            fit_latent_scale(model, &self.set, self.seed)?;
        }
        Ok(())
    }
    fn sampler(&self) -> &dyn Sampler {
        &self.set
    }
    /// Timesteps, noise and posterior samples come from libtorch's generator: seeded per
    /// iteration and held for the step (reproducible while other threads use the engine).
    fn step(&mut self, model: &Model, x: &Tensor, y: &Tensor, seed: u64) -> Result<f64> {
        self.step.step(model, x, y, self.ae_phase, seed)
    }
    fn learning_rate(&self) -> f64 {
        if self.ae_phase { self.pgdiff.ae_learning_rate } else { self.pgdiff.learning_rate }
    }
    fn learning_rate_setting(&self) -> &'static str {
        if self.ae_phase { "pgdiff.ae_learning_rate" } else { "pgdiff.learning_rate" }
    }
    fn validate(&mut self, model: &Model, monitor: &Monitor) -> Result<Validation> {
        if self.val.is_empty() {
            return Ok(Validation::NONE);
        }
        if self.ae_phase {
            let psnr = reconstruction_psnr(model, &self.val.iter().map(|s| &s.image).collect::<Vec<_>>())?;
            return Ok(Validation { dice: f64::NAN, psnr: Some(psnr) });
        }
        let opts =
            SegmentOptions { step_fraction: 1.0, diffusion: Some(validation_options(self.seed)), ..Default::default() };
        // sampling takes long: a cancel stops it tile by tile
        let mut cancel_only = monitor.cancel_only();
        let scores = self
            .val
            .iter()
            .map(|s| {
                metrics::score(
                    &model.segment_labels_with(s.image.data.view(), &opts, &mut cancel_only)?,
                    &s.mask,
                    model.n_classes(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Validation { dice: metrics::summarize(&scores).mean_fg_dice.mean, psnr: None })
    }
    fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        let mut v = self.step.opt_ae.state();
        v.extend(self.step.opt_dm.state());
        v
    }
    fn resume(&mut self, tensors: &BTreeMap<String, Tensor>, _ck: &Checkpoint, device: Device) -> Result<()> {
        self.step.opt_ae.load_state(tensors, device);
        self.step.opt_dm.load_state(tensors, device);
        Ok(())
    }
}

/// `latent_scale = 1 / std` of the latents of (up to) 64 random training tiles.
fn fit_latent_scale(model: &Model, data: &TileSet, seed: u64) -> Result<()> {
    let inner = model.lock();
    let net = super::pgdiff_net(&inner.net, model, "has no autoencoder")?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ca1e);
    let (x, _) = data.batch(&mut rng, 64.min(16 * data.images.len()).max(1));
    let std = tch::no_grad(|| net.ae.encode(&x).mean.std(true)).double_value(&[]);
    if !(std.is_finite() && std > 1e-8) {
        return Err(Error::InvalidInput(format!(
            "the autoencoder's latents have standard deviation {std}; cannot scale them"
        )));
    }
    tch::no_grad(|| {
        let mut s = net.latent_scale.shallow_clone();
        let _ = s.fill_(1.0 / std);
    });
    log::info!("pgdiff latent std {std:.4}; latent_scale {:.4}", 1.0 / std);
    Ok(())
}
