//! The decompose verb (muSplit): training data, training loop and tiled prediction.
//!
//! # Data on disk
//!
//! ```text
//! DIR/targets/NAME.tif   (2, H, W) the two structures (float or integer TIFF)
//! DIR/inputs/NAME.tif    (H, W) the superimposed image; optional: without it the
//!                        input is the sum of the two targets
//! ```
//! or two folders of single-structure images, `DIR/structure1/NAME.tif` and
//! `DIR/structure2/NAME.tif` (the input is their sum). `DIR/train/...` (as the simulator
//! writes) is accepted as well.
//!
//! # Normalization (as in muSplit)
//!
//! Input and each target channel are clipped at the 0.995 quantile of the training data;
//! the input is z-scored with one mean/std, each target channel with its own. Both sets
//! of statistics are stored in the model, and predictions are mapped back to the
//! targets' units.
//!
//! # Training
//!
//! Random `T x T` patches (with their lateral-context crops, see `crate::musplit::lc`) and the
//! matching target patches, random flips and 90 degree rotations, Adamax with gradient
//! clipping by value, and the learning rate halved when the validation PSNR has not
//! improved for `lr_patience` epochs. A checkpoint after every epoch (atomic); resume
//! continues exactly. The HVAE draws its latent samples and dropout from libtorch's
//! process-wide generator: each iteration seeds it from (seed, epoch, iteration) and
//! holds the engine's generator lock while it runs, so the same seed gives the same model
//! even while other threads use the engine.

pub mod lc;
pub mod net;
pub mod recipes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array3, ArrayView2, ArrayViewMut3, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::engine::dataset::is_tiff;
use crate::engine::device::parse_device;
use crate::error::{Error, Result};
use crate::image::{array3_to_tensor, Image};
use crate::io::tiff;
use crate::musplit::lc::LcBand;
use crate::engine::metrics;
use crate::musplit::net::SplitVariant;
use crate::backend::precision::{to_float, with_precision};
use crate::engine::model::{EpochRecord, Model, ModelKind, ModelMeta, Net, TORCH_RNG};
use crate::engine::normalize::{ChannelNorm, NormMethod, Normalizer};
use crate::engine::progress::{Monitor, Progress, Stage};
use crate::engine::tiling::{centre_tiles, mirrored, CentreTiles};
use crate::engine::train::{per_epoch_seed, sibling, RunInfo, TrainConfig, TrainOutcome};

/// One training frame: the superimposed input and the two structures.
#[derive(Debug, Clone)]
pub struct SplitSample {
    pub name: String,
    /// `(1, H, W)`.
    pub input: Image,
    /// `(2, H, W)`.
    pub targets: Image,
}

fn tiffs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if is_tiff(&p) {
            v.push((p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string(), p));
        }
    }
    v.sort();
    if v.is_empty() {
        return Err(Error::InvalidArgument(format!("'{}' holds no .tif images", dir.display())));
    }
    Ok(v)
}

fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    ["tif", "tiff"].iter().map(|e| dir.join(format!("{stem}.{e}"))).find(|p| p.is_file())
}

fn plane(img: &Image, what: &Path) -> Result<ndarray::Array2<f32>> {
    if img.channels() != 1 {
        return Err(Error::Shape(format!("'{}' has {} channels; expected a single-channel image", what.display(), img.channels())));
    }
    Ok(img.data.index_axis(Axis(0), 0).to_owned())
}

/// Loads a decomposition data folder (see the module documentation).
pub fn load_split_folder(dir: &Path) -> Result<Vec<SplitSample>> {
    let root = [dir.to_path_buf(), dir.join("train")]
        .into_iter()
        .find(|d| d.join("targets").is_dir() || d.join("structure1").is_dir())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "'{}' has no targets/ (2-channel TIFFs, with optional inputs/) and no structure1/ + structure2/ folders",
                dir.display()
            ))
        })?;
    let mut out = Vec::new();
    if root.join("targets").is_dir() {
        for (name, tp) in tiffs(&root.join("targets"))? {
            let targets = tiff::read_image(&tp)?;
            if targets.channels() != 2 {
                return Err(Error::Shape(format!(
                    "target '{}' has {} channels; expected 2 (one per structure)",
                    tp.display(),
                    targets.channels()
                )));
            }
            let input = match find(&root.join("inputs"), &name) {
                Some(ip) => {
                    let im = tiff::read_image(&ip)?;
                    let p = plane(&im, &ip)?;
                    if p.dim() != (targets.height(), targets.width()) {
                        return Err(Error::Shape(format!(
                            "input '{}' is {:?} but its targets are {} x {}",
                            ip.display(),
                            p.dim(),
                            targets.height(),
                            targets.width()
                        )));
                    }
                    p
                }
                None => &targets.data.index_axis(Axis(0), 0) + &targets.data.index_axis(Axis(0), 1),
            };
            out.push(SplitSample { name, input: Image::with_names(input.insert_axis(Axis(0)), vec!["mixed".into()])?, targets });
        }
    } else {
        let d2 = root.join("structure2");
        for (name, p1) in tiffs(&root.join("structure1"))? {
            let p2 = find(&d2, &name).ok_or_else(|| {
                Error::InvalidArgument(format!("'{}' has no partner '{}/{name}.tif'", p1.display(), d2.display()))
            })?;
            let (a, b) = (plane(&tiff::read_image(&p1)?, &p1)?, plane(&tiff::read_image(&p2)?, &p2)?);
            if a.dim() != b.dim() {
                return Err(Error::Shape(format!("'{}' is {:?} but '{}' is {:?}", p1.display(), a.dim(), p2.display(), b.dim())));
            }
            let input = &a + &b;
            let t = ndarray::stack(Axis(0), &[a.view(), b.view()]).expect("same shape");
            out.push(SplitSample {
                name,
                input: Image::with_names(input.insert_axis(Axis(0)), vec!["mixed".into()])?,
                targets: Image::with_names(t, vec!["structure1".into(), "structure2".into()])?,
            });
        }
    }
    for s in &out {
        s.input.check_finite().map_err(|e| Error::InvalidInput(format!("input '{}': {e}", s.name)))?;
        s.targets.check_finite().map_err(|e| Error::InvalidInput(format!("targets '{}': {e}", s.name)))?;
    }
    Ok(out)
}

/// How a frame is decomposed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecomposeOptions {
    /// Square tile edge; `None` = the training patch ("inner padding").
    pub tile: Option<usize>,
    /// Kept centre of each tile; `None` = half the tile.
    pub keep: Option<usize>,
    /// Tiles per forward pass.
    pub batch_size: usize,
    /// Average over the 4 flips.
    pub mirror: bool,
    /// HVAE: posterior samples averaged (MMSE); ignored by deterministic models.
    pub samples: usize,
    /// HVAE: seed of the posterior samples (same seed, same output).
    pub seed: u64,
    /// HVAE: decode at the posterior means instead of sampling (deterministic; what a
    /// bioimage.io export computes). Ignored by deterministic models.
    pub posterior_mean: bool,
}

impl Default for DecomposeOptions {
    fn default() -> Self {
        DecomposeOptions { tile: None, keep: None, batch_size: 16, mirror: false, samples: 1, seed: 0, posterior_mean: false }
    }
}

impl DecomposeOptions {
    /// The prevalent "outer padding" scheme: tiles `factor` times the training patch,
    /// keeping all but a margin of a quarter patch on each side.
    pub fn outer_padding(patch: usize, factor: usize) -> Self {
        let tile = patch * factor.max(1);
        DecomposeOptions { tile: Some(tile), keep: Some(tile - patch / 2), ..Default::default() }
    }
}

/// The mean and std of a fitted channel normalization.
pub(crate) fn mean_std_of(c: &ChannelNorm) -> (f32, f32) {
    match *c {
        ChannelNorm::PerImageZscore => (0.0, 1.0),
        ChannelNorm::DatasetZscore { mean, std } | ChannelNorm::RobustQuantile { mean, std, .. } => (mean, std),
    }
}

impl Model {
    /// Decomposes an `(H, W)` frame of any size into `out` `(K, H, W)` (K = 2), tile by
    /// tile with inner padding (or the tiling in `opts`). Memory beyond the caller's
    /// buffers is bounded by one batch of tiles and its lateral context, whatever the
    /// frame size.
    pub fn decompose(&self, frame: ArrayView2<f32>, opts: &DecomposeOptions, mut out: ArrayViewMut3<f32>, monitor: &mut Monitor) -> Result<()> {
        self.check_decompose()?;
        let (h, w) = frame.dim();
        let k = self.n_classes();
        if h == 0 || w == 0 {
            return Err(Error::Shape(format!("the input is {h} x {w} pixels; expected at least 1 x 1")));
        }
        if out.dim() != (k, h, w) {
            return Err(Error::Shape(format!("the decomposition output is {:?}; expected ({k}, {h}, {w})", out.dim())));
        }
        let frame3 = frame.insert_axis(Axis(0));
        crate::image::check_finite(frame3)?;
        if opts.samples == 0 {
            return Err(Error::InvalidArgument("samples must be >= 1".into()));
        }
        let tile = opts.tile.unwrap_or(self.meta.patch_size[0]);
        let ct = CentreTiles { tile, keep: opts.keep.unwrap_or(tile / 2), batch_size: opts.batch_size };
        ct.validate(Net::divisor(&self.meta))?;
        let aff = self.meta.normalization.resolve(frame3)?[0];
        let tn = self.meta.target_normalization.as_ref().ok_or_else(|| Error::ModelFormat("the model lacks target normalization".into()))?;
        let (means, stds): (Vec<f32>, Vec<f32>) = tn.channels.iter().map(mean_std_of).unzip();
        let device = self.device();
        let mean_t = Tensor::from_slice(&means).view([1, k as i64, 1, 1]).to_device(device);
        let std_t = Tensor::from_slice(&stds).view([1, k as i64, 1, 1]).to_device(device);

        let contiguous = frame.as_standard_layout();
        // SAFETY: `contiguous` is a standard-layout (H, W) f32 array that outlives `src`
        // (declared later, dropped first); libtorch only reads it.
        let src = unsafe {
            Tensor::from_blob(contiguous.as_ptr() as *const u8, &[h as i64, w as i64], &[w as i64, 1], Kind::Float, Device::Cpu)
        };
        let precision = self.precision();
        let inner = self.lock();
        let Net::Musplit(net) = &inner.net else {
            return Err(Error::Unsupported(format!("a '{}' model cannot decompose", self.meta.kind.name())));
        };
        let levels = net.cfg.input_channels();
        let stochastic = net.is_stochastic() && !opts.posterior_mean;
        let _rng = if stochastic {
            let g = TORCH_RNG.lock();
            tch::manual_seed(opts.seed as i64);
            Some(g)
        } else {
            None
        };
        // one band of lateral context per batch of tiles: memory independent of the frame
        let mut inputs = |cy: i64, _row: &[i64], chunk: &[i64]| -> Result<Tensor> {
            let mut band = LcBand::new(&src, cy, tile as i64, levels, &aff, chunk, device);
            Ok(Tensor::stack(&chunk.iter().map(|&cx| band.crop(cx)).collect::<Vec<_>>(), 0))
        };
        let samples = if stochastic { opts.samples } else { 1 };
        // channels-last (NHWC strides), as in `Net::infer`: oneDNN's native layout, the
        // same function (latent draws are made in NCHW order whatever the layout)
        let mut one = |x: &Tensor| -> Result<Tensor> {
            let x = crate::engine::model::channels_last(x);
            if opts.posterior_mean {
                return Ok(net.forward_posterior_mean(&x).contiguous());
            }
            let mut acc = to_float(net.predict(&x));
            for _ in 1..samples {
                acc += to_float(net.predict(&x));
            }
            Ok((acc / samples as f64).contiguous())
        };
        let mut predict = |x: &Tensor| -> Result<Tensor> {
            let p = with_precision(precision, device, || tch::no_grad(|| if opts.mirror { mirrored(x, &mut one) } else { one(x) }))??;
            Ok(to_float(p) * &std_t + &mean_t)
        };
        let mut sink = |row0: usize, col0: usize, block: &Tensor| -> Result<()> {
            let a = crate::image::tensor_to_array3(block)?;
            out.slice_mut(ndarray::s![.., row0..row0 + a.shape()[1], col0..col0 + a.shape()[2]]).assign(&a);
            Ok(())
        };
        centre_tiles(h, w, &ct, k, &mut inputs, &mut predict, &mut sink, monitor)
    }

    /// Convenience: the `(K, H, W)` decomposition of an `(H, W)` frame.
    pub fn decompose_array(&self, frame: ArrayView2<f32>, opts: &DecomposeOptions) -> Result<Array3<f32>> {
        let (h, w) = frame.dim();
        let mut out = Array3::<f32>::zeros((self.n_classes(), h, w));
        self.decompose(frame, opts, out.view_mut(), &mut Monitor::none())?;
        Ok(out)
    }
}

/// Scores of a model on samples: per image, PSNR / RI-PSNR / SSIM per channel.
pub fn evaluate_split(model: &Model, samples: &[&SplitSample], opts: &DecomposeOptions) -> Result<Vec<metrics::SplitScores>> {
    samples
        .iter()
        .map(|s| {
            let pred = model.decompose_array(s.input.data.index_axis(Axis(0), 0), opts)?;
            metrics::split_scores(s.targets.data.view(), pred.view())
        })
        .collect()
}

/// Adamax (Kingma & Ba, 2015) with betas (0.9, 0.999), eps 1e-8; its state is
/// checkpointed.
struct Adamax {
    params: Vec<(String, Tensor)>,
    m: HashMap<String, Tensor>,
    u: HashMap<String, Tensor>,
    step: i64,
}

impl Adamax {
    fn new(vs: &tch::nn::VarStore) -> Self {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Adamax { params, m: HashMap::new(), u: HashMap::new(), step: 0 }
    }
    /// Drops the gradients (the next backward pass writes fresh ones).
    fn zero_grad(&mut self) -> Result<()> {
        crate::backend::optim::drop_grads(self.params.iter().map(|(_, p)| p))
    }
    /// Clips every gradient element to `[-clip_value, clip_value]` (`<= 0`: no
    /// clipping), then one Adamax step (libtorch's multi-tensor ops) over the parameters
    /// with a gradient.
    fn clip_and_update(&mut self, clip_value: f64, lr: f64) -> Result<()> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        self.step += 1;
        let (ps, gs, st) = crate::backend::optim::gather(&self.params, &mut [&mut self.m, &mut self.u]);
        if clip_value > 0.0 {
            crate::backend::optim::clamp_(&gs, -clip_value, clip_value)?;
        }
        crate::backend::optim::adamax_(&ps, &gs, &st[0], &st[1], self.step, lr, b1, b2, eps)
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self
            .m
            .iter()
            .map(|(n, t)| (format!("optimizer.m.{n}"), t.shallow_clone()))
            .chain(self.u.iter().map(|(n, t)| (format!("optimizer.u.{n}"), t.shallow_clone())))
            .collect();
        v.push(("optimizer.step".into(), Tensor::from_slice(&[self.step as f32])));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
    fn load_state(&mut self, tensors: &std::collections::BTreeMap<String, Tensor>, device: Device) {
        for (n, t) in tensors {
            if let Some(name) = n.strip_prefix("optimizer.m.") {
                self.m.insert(name.to_string(), t.to_device(device));
            } else if let Some(name) = n.strip_prefix("optimizer.u.") {
                self.u.insert(name.to_string(), t.to_device(device));
            } else if n == "optimizer.step" {
                self.step = t.double_value(&[0]) as i64;
            }
        }
    }
}

/// One optimization step of the decomposition trainer (kind `musplit`), exactly as
/// [`train`] runs it for every iteration: the forward pass in training mode, the model's
/// loss (MSE for the U-Net; Gaussian NLL + KL for the HVAE), the backward pass, gradient
/// clipping by value (`musplit.grad_clip_value`) and one Adamax step at the given
/// learning rate. The optimizer's state lives here. [`train`] drives it;
/// `benches/compare.rs` times it on a fixed batch.
pub struct DecompositionStep {
    opt: Adamax,
    variant: SplitVariant,
    grad_clip_value: f64,
}

impl DecompositionStep {
    /// A fresh Adamax over the model's trainable variables, with `cfg.musplit`'s
    /// `grad_clip_value`.
    pub fn new(model: &Model, cfg: &TrainConfig) -> Self {
        DecompositionStep { opt: Adamax::new(&model.lock().vs), variant: cfg.musplit.variant, grad_clip_value: cfg.musplit.grad_clip_value }
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
        // a retry on libtorch's operators (nn::onednn::train_step) draws the same samples
        let loss = crate::backend::onednn::train_step(|| {
            if hvae {
                tch::manual_seed(seed as i64);
            }
            let loss = {
                let inner = model.lock();
                let Net::Musplit(net) = &inner.net else {
                    return Err(Error::Unsupported(format!("a '{}' model is not trained by the decomposition trainer", model.meta.kind.name())));
                };
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
        self.opt.clip_and_update(self.grad_clip_value, lr)?;
        Ok(loss.double_value(&[]))
    }
}

/// Training state stored in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SplitCheckpoint {
    epochs_completed: usize,
    config: TrainConfig,
    history: Vec<EpochRecord>,
    learning_rate: f64,
    best_val_psnr: Option<f64>,
    bad_epochs: usize,
}


/// Training frames on the device, normalized: inputs `(H, W)`, targets `(2, H, W)`.
struct SplitSet {
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
}

impl SplitSet {
    fn batch(&self, rng: &mut ChaCha8Rng, b: usize, tile: i64, levels: usize) -> (Tensor, Tensor) {
        let (mut xs, mut ys) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for _ in 0..b {
            let i = rng.random_range(0..self.inputs.len());
            let (h, w) = (self.inputs[i].size()[0], self.inputs[i].size()[1]);
            let pick = |rng: &mut ChaCha8Rng, n: i64| if n > tile { rng.random_range(tile / 2..=n - tile / 2) } else { n / 2 };
            let (cy, cx) = (pick(rng, h), pick(rng, w));
            let x = lc::crops(&self.inputs[i], cy, cx, tile, levels);
            let y = Tensor::stack(
                &(0..2).map(|c| lc::gather(&self.targets[i].get(c), cy - tile / 2, tile, cx - tile / 2, tile)).collect::<Vec<_>>(),
                0,
            );
            // the same flip / rotation for the input stack and the targets
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

fn mean_psnr(scores: &[metrics::SplitScores]) -> f64 {
    metrics::mean(&scores.iter().map(|s| metrics::mean(&s.psnr)).collect::<Vec<_>>())
}

/// Trains a muSplit model (`cfg.kind == "musplit"`) on a decomposition folder.
pub fn train(cfg: &TrainConfig, data_dir: &Path, output: &Path, monitor: &mut Monitor) -> Result<TrainOutcome> {
    let t0 = Instant::now();
    cfg.validate()?;
    if output.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("the output model path is empty".into()));
    }
    let mc = &cfg.musplit;
    let record_path = sibling(output, "train.json");
    let ckpt_path = cfg.checkpoint.clone().unwrap_or_else(|| sibling(output, "ckpt"));
    crate::engine::train::check_output_paths(output, &ckpt_path)?;
    let device = parse_device(&cfg.device)?;
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    }
    monitor.emit(Progress::new(Stage::Preparing));

    let samples = load_split_folder(data_dir)?;
    let (train_idx, val_idx) = crate::engine::dataset::split_indices(samples.len(), cfg.val_fraction, cfg.seed);
    let train_s: Vec<&SplitSample> = train_idx.iter().map(|&i| &samples[i]).collect();
    let val_s: Vec<&SplitSample> = val_idx.iter().map(|&i| &samples[i]).collect();
    let names = |v: &[&SplitSample]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let run = RunInfo { cfg, data_dir, train_names: names(&train_s), val_names: names(&val_s), device, t0 };
    run.write_record(&record_path)?;

    let q = [NormMethod::RobustQuantile { q_low: 0.0, q_high: 0.995 }];
    let in_norm = Normalizer::fit(&q, &train_s.iter().map(|s| &s.input).collect::<Vec<_>>())?;
    let tg_norm = Normalizer::fit(&q, &train_s.iter().map(|s| &s.targets).collect::<Vec<_>>())?;
    let mut meta = ModelMeta::new(
        ModelKind::Musplit,
        serde_json::to_value(mc).expect("json"),
        vec!["mixed".into()],
        samples[0].targets.channel_names.clone(),
        cfg.patch_size,
        in_norm.clone(),
    );
    meta.target_normalization = Some(tg_norm.clone());
    let mut model = Model::new_seeded(meta, device, Some(cfg.seed))?;
    let data = SplitSet {
        inputs: train_s
            .iter()
            .map(|s| Ok(array3_to_tensor(in_norm.apply_image(&s.input)?.data.view(), device).get(0)))
            .collect::<Result<_>>()?,
        targets: train_s.iter().map(|s| Ok(array3_to_tensor(tg_norm.apply_image(&s.targets)?.data.view(), device))).collect::<Result<_>>()?,
    };
    let levels = mc.input_channels();
    let tile = cfg.patch_size[0] as i64;

    let mut stepper = DecompositionStep::new(&model, cfg);
    let mut start_epoch = 0;
    let mut history: Vec<EpochRecord> = Vec::new();
    let (mut lr, mut best, mut bad) = (mc.learning_rate, None::<f64>, 0usize);
    if cfg.resume && ckpt_path.is_file() {
        let (file, st, ck) = crate::engine::train::read_checkpoint::<SplitCheckpoint>(&ckpt_path, &model)?;
        crate::engine::train::check_resume_config(&ckpt_path, &st.config, cfg)?;
        crate::engine::train::check_resume_data(&ckpt_path, "input", &ck.normalization, &in_norm)?;
        if let Some(t) = &ck.target_normalization {
            crate::engine::train::check_resume_data(&ckpt_path, "target", t, &tg_norm)?;
        }
        stepper.opt.load_state(&file.tensors, device);
        model.meta.normalization = ck.normalization;
        model.meta.target_normalization = ck.target_normalization;
        start_epoch = st.epochs_completed;
        history = st.history;
        (lr, best, bad) = (st.learning_rate, st.best_val_psnr, st.bad_epochs);
    }

    let eval_opts = DecomposeOptions { seed: cfg.seed, ..Default::default() };
    for epoch in start_epoch..cfg.epochs {
        let te = Instant::now();
        let es = per_epoch_seed(cfg.seed, epoch);
        let mut rng = ChaCha8Rng::seed_from_u64(es);
        let mut loss_sum = 0.0;
        for it in 0..cfg.iterations_per_epoch {
            monitor.check()?;
            let (x, y) = data.batch(&mut rng, cfg.batch_size, tile, levels);
            // the HVAE's samples and dropout come from libtorch's process-wide generator:
            // seeded per iteration and held for the step, so that other threads cannot
            // change this run
            let l = stepper.step(&model, &x, &y, lr, per_epoch_seed(es, it))?;
            if !l.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "training diverged (loss {l}) at epoch {epoch}, iteration {it}; lower musplit.learning_rate"
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
        let val_psnr = if val_s.is_empty() { None } else { Some(mean_psnr(&evaluate_split(&model, &val_s, &eval_opts)?)) };
        if let Some(v) = val_psnr {
            // a NaN PSNR (a broken prediction) is never the best: it counts as a bad epoch
            if v.is_finite() && best.is_none_or(|b| v > b + 1e-4) {
                best = Some(v);
                bad = 0;
            } else {
                bad += 1;
                if bad > mc.lr_patience {
                    lr *= 0.5;
                    bad = 0;
                }
            }
        }
        let rec = EpochRecord {
            epoch,
            learning_rate: lr,
            train_loss: loss_sum / cfg.iterations_per_epoch as f64,
            val_dice: f64::NAN,
            val_psnr,
            seconds: te.elapsed().as_secs_f64(),
        };
        monitor.emit(Progress {
            stage: Stage::Validation,
            epoch,
            epochs: cfg.epochs,
            iteration: cfg.iterations_per_epoch,
            iterations: cfg.iterations_per_epoch,
            loss: rec.train_loss,
            val_metric: val_psnr.unwrap_or(f64::NAN),
        });
        history.push(rec);
        let st = SplitCheckpoint {
            epochs_completed: epoch + 1,
            config: cfg.clone(),
            history: history.clone(),
            learning_rate: lr,
            best_val_psnr: best,
            bad_epochs: bad,
        };
        let mut md = HashMap::new();
        md.insert(crate::engine::train::CHECKPOINT_KEY.to_string(), serde_json::to_string(&st).expect("json"));
        model.meta.provenance = run.provenance(epoch + 1, &history);
        model.save_with(&ckpt_path, &stepper.opt.state(), md)?;
        monitor.emit(Progress { stage: Stage::Checkpoint, epoch, epochs: cfg.epochs, ..Progress::new(Stage::Checkpoint) });
    }
    model.meta.provenance = run.provenance(cfg.epochs, &history);
    model.save(output)?;
    monitor.emit(Progress { stage: Stage::Done, epoch: cfg.epochs, epochs: cfg.epochs, ..Progress::new(Stage::Done) });
    Ok(TrainOutcome { model, history })
}
