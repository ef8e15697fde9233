//! PG-DiffSeg (Shao, Anastasio & Li): prior-guided latent-diffusion segmentation of
//! quantitative phase images.
//!
//! A model holds three networks (one file, weights under `ae.`, `ldm_p.`, `ldm_s.`):
//! - the f4 autoencoder (`nn::ldm::Autoencoder`), whose encoder maps a `T x T` phase tile
//!   to a `T/4 x T/4 x 3` latent `z` (scaled by `latent_scale = 1 / std(z)` over the
//!   training data, as latent diffusion's `scale_by_std`);
//! - LDM-P, an unconditional denoiser on image latents;
//! - LDM-S, a denoiser of the one-hot mask (resized to the latent size, scaled to
//!   [-1, 1]) conditioned on `z` by channel concatenation.
//!
//! Segmentation of a tile: `z = E(x)`; the starting noise is LDM-P's DDIM inversion of
//! `z` (the "prior": content-informed and Gaussian), averaged over its channels and
//! repeated to the number of classes; LDM-S samples the mask latent from it by DDIM; the
//! result is resized to the tile and the class is the argmax. The paper's baselines are
//! options: random starting noise (with majority voting over N samples) and "forward
//! diffusion t" noise (`z` diffused to timestep t, then averaged and repeated).
//!
//! Training (`train`) runs `pgdiff.ae_epochs` epochs of the autoencoder (L1
//! reconstruction + KL), fits `latent_scale`, then `epochs` epochs of LDM-P and LDM-S
//! together (epsilon prediction, L2, uniform timesteps), with Adam, a checkpoint after
//! every epoch and exact resume.

pub mod ddim;
pub mod ldm;
pub mod recipes;
pub mod train;

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::engine::dataset::Sample;
use crate::engine::metrics;
use crate::engine::model::{Model, ModelKind, ModelMeta, Net, Network, SegmentOptions};
use crate::engine::progress::Monitor;
use crate::engine::train::{TrainConfig, per_epoch_seed};
use crate::error::{Error, Result};
use crate::image::array3_to_tensor;
use crate::pgdiff::ddim::Schedule;
use crate::pgdiff::ldm::{Autoencoder, AutoencoderConfig, DiffusionUnet, DiffusionUnetConfig};

/// Where the sampler starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartNoise {
    /// PG-DiffSeg: LDM-P's DDIM inversion of the image latent.
    Prior,
    /// Random Gaussian noise (the DM baseline; use `samples` > 1 for majority voting).
    Random,
    /// The image latent diffused forward to timestep `forward_t` (the paper's
    /// "Forward Diff. t" ablation; t = 0 is the latent itself).
    Forward,
}

impl StartNoise {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "prior" | "pg" | "ldm-p" => Ok(StartNoise::Prior),
            "random" => Ok(StartNoise::Random),
            "forward" | "forward-diffusion" => Ok(StartNoise::Forward),
            o => Err(Error::InvalidArgument(format!("start noise '{o}'; expected prior, random or forward"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            StartNoise::Prior => "prior",
            StartNoise::Random => "random",
            StartNoise::Forward => "forward",
        }
    }
}

/// How a PG-DiffSeg model samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionOptions {
    pub start: StartNoise,
    /// DDIM inversion steps of LDM-P (prior start only); the paper uses 100.
    pub inversion_steps: usize,
    /// DDIM sampling steps of LDM-S; the paper uses 200.
    pub sampling_steps: usize,
    /// DDIM eta (0 = deterministic sampling).
    pub eta: f64,
    /// Samples per tile; more than one are combined by majority voting.
    pub samples: usize,
    /// Timestep of the forward-diffusion start.
    pub forward_t: usize,
    /// Seed of every random draw (random starts, eta > 0 noise): the same seed, frame
    /// and options give the same labels.
    pub seed: u64,
    /// Clip each step's predicted clean mask latent to [-1, 1] (the range of the one-hot
    /// targets) and re-derive the noise from it (diffusers' `clip_sample`). Keeps sampling
    /// from drifting where the high-noise regime is not learned well.
    pub clip_denoised: bool,
}

impl Default for DiffusionOptions {
    fn default() -> Self {
        DiffusionOptions {
            start: StartNoise::Prior,
            inversion_steps: 100,
            sampling_steps: 200,
            eta: 0.0,
            samples: 1,
            forward_t: 300,
            seed: 0,
            clip_denoised: true,
        }
    }
}

impl DiffusionOptions {
    pub fn validate(&self, timesteps: usize) -> Result<()> {
        let steps = |v: usize, n: &str| {
            if v == 0 || v >= timesteps {
                Err(Error::InvalidArgument(format!("{n} = {v}; expected 1..={}", timesteps - 1)))
            } else {
                Ok(())
            }
        };
        steps(self.sampling_steps, "sampling_steps")?;
        if self.start == StartNoise::Prior {
            steps(self.inversion_steps, "inversion_steps")?;
        }
        if self.forward_t >= timesteps {
            return Err(Error::InvalidArgument(format!(
                "forward_t = {}; expected 0..={}",
                self.forward_t,
                timesteps - 1
            )));
        }
        if !(self.eta.is_finite() && (0.0..=1.0).contains(&self.eta)) {
            return Err(Error::InvalidArgument(format!("eta = {}; expected a number in [0, 1]", self.eta)));
        }
        if !(1..=64).contains(&self.samples) {
            return Err(Error::InvalidArgument(format!("samples = {}; expected 1..=64", self.samples)));
        }
        Ok(())
    }
    /// Network evaluations per tile.
    pub fn evaluations(&self) -> usize {
        let inv = if self.start == StartNoise::Prior { self.inversion_steps } else { 0 };
        inv + self.samples * self.sampling_steps
    }
}

/// Architecture and optimizer of a PG-DiffSeg model (the `pgdiff` section of a training
/// config; stored as the model's architecture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgDiffConfig {
    pub autoencoder: AutoencoderConfig,
    pub ldm_p: DiffusionUnetConfig,
    pub ldm_s: DiffusionUnetConfig,
    /// Diffusion steps T and the linear beta range.
    pub timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// Epochs of autoencoder training before the diffusion models (>= 1).
    pub ae_epochs: usize,
    pub ae_learning_rate: f64,
    /// Adam learning rate of LDM-P and LDM-S (the paper: 2e-6 with its batch sizes and
    /// training length; small models trained briefly need ~1e-4).
    pub learning_rate: f64,
    /// Gradient-norm clip (0 = none).
    pub grad_clip: f64,
    /// Default sampling of the model (segment without explicit options).
    pub sampling: DiffusionOptions,
}

impl Default for PgDiffConfig {
    /// The paper's sizes (f4 autoencoder, LDM-P 224..896, LDM-S 128..512).
    fn default() -> Self {
        PgDiffConfig {
            autoencoder: AutoencoderConfig::default(),
            ldm_p: DiffusionUnetConfig::ldm_p_paper(),
            ldm_s: DiffusionUnetConfig::ldm_s_paper(),
            timesteps: 1000,
            beta_start: 0.0015,
            beta_end: 0.0195,
            ae_epochs: 10,
            ae_learning_rate: 1e-4,
            learning_rate: 2e-6,
            grad_clip: 1.0,
            sampling: DiffusionOptions::default(),
        }
    }
}

impl PgDiffConfig {
    /// Small networks for CPU training (minutes) at 128 x 128 tiles.
    pub fn cpu() -> Self {
        let unet = DiffusionUnetConfig {
            model_channels: 32,
            channel_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            attention_resolutions: vec![2, 4],
            num_head_channels: 32,
            dropout: 0.0,
            groups: 16,
        };
        PgDiffConfig {
            autoencoder: AutoencoderConfig {
                ch: 32,
                ch_mult: vec![1, 2, 2],
                num_res_blocks: 1,
                z_channels: 3,
                groups: 16,
                kl_weight: 1e-6,
            },
            ldm_p: unet.clone(),
            ldm_s: unet,
            ae_learning_rate: 5e-4,
            learning_rate: 2e-4,
            ..Self::default()
        }
    }
    /// Tiny networks for tests (seconds).
    pub fn tiny() -> Self {
        let unet = DiffusionUnetConfig {
            model_channels: 8,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_resolutions: vec![2],
            num_head_channels: 8,
            dropout: 0.0,
            groups: 4,
        };
        PgDiffConfig {
            autoencoder: AutoencoderConfig {
                ch: 8,
                ch_mult: vec![1, 2, 2],
                num_res_blocks: 1,
                z_channels: 3,
                groups: 4,
                kl_weight: 1e-6,
            },
            ldm_p: unet.clone(),
            ldm_s: unet,
            ae_epochs: 1,
            ae_learning_rate: 2e-3,
            learning_rate: 1e-3,
            sampling: DiffusionOptions { inversion_steps: 10, sampling_steps: 10, ..DiffusionOptions::default() },
            ..Self::default()
        }
    }
    /// Tile sides must be multiples of this.
    pub fn divisor(&self) -> usize {
        self.autoencoder.factor() * self.ldm_p.divisor().max(self.ldm_s.divisor())
    }
    pub fn schedule(&self) -> Result<Schedule> {
        Schedule::linear(self.timesteps, self.beta_start, self.beta_end)
    }
    pub fn validate(&self) -> Result<()> {
        self.autoencoder.validate()?;
        self.ldm_p.validate()?;
        self.ldm_s.validate()?;
        self.schedule()?;
        if self.ae_epochs == 0 {
            return Err(Error::Config(
                "pgdiff.ae_epochs = 0; the autoencoder is trained from scratch and needs >= 1 epoch".into(),
            ));
        }
        for (v, n) in [(self.ae_learning_rate, "pgdiff.ae_learning_rate"), (self.learning_rate, "pgdiff.learning_rate")]
        {
            if !(v.is_finite() && v > 0.0 && v < 1.0) {
                return Err(Error::Config(format!("{n} = {v}; expected a number in (0, 1)")));
            }
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(Error::Config(format!("pgdiff.grad_clip = {}; expected >= 0", self.grad_clip)));
        }
        self.sampling.validate(self.timesteps)
    }
}

/// Gaussian draws from a seeded ChaCha stream, independent of libtorch's global
/// generator (so inference needs no lock and is reproducible on any thread).
pub struct NormalStream(ChaCha8Rng);

impl NormalStream {
    pub fn new(seed: u64) -> Self {
        NormalStream(ChaCha8Rng::seed_from_u64(seed))
    }
    pub fn draw(&mut self, shape: &[i64], device: Device) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.0)).collect();
        Tensor::from_slice(&v).view(shape).to_device(device)
    }
}

/// The three networks of a PG-DiffSeg model.
#[derive(Debug)]
pub struct PgDiffNet {
    pub ae: Autoencoder,
    pub ldm_p: DiffusionUnet,
    pub ldm_s: DiffusionUnet,
    /// `1 / std` of the training latents (a non-trained variable, saved with the model).
    pub latent_scale: Tensor,
    pub schedule: Schedule,
    pub cfg: PgDiffConfig,
    pub n_classes: i64,
}

/// What the sampler produced for a batch of tiles.
pub struct TileResult {
    /// `(N, K, T, T)`: per-class scores in [0, 1] summing to 1 (vote fractions when
    /// several samples were drawn).
    pub probabilities: Tensor,
    /// `(N, T/f, T/f)`: the starting noise of the first sample, averaged over channels.
    pub noise: Tensor,
    /// `(N, T/f, T/f)`: the clean image latent (scaled), averaged over channels: the
    /// reference that fixes the sign of the latent space when the noise is compared with
    /// the image (see [`noise_quality`]).
    pub latent: Tensor,
}

impl PgDiffNet {
    pub fn new(p: &nn::Path, cfg: &PgDiffConfig, in_channels: i64, n_classes: i64) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.autoencoder.z_channels;
        Ok(PgDiffNet {
            ae: Autoencoder::new(&(p / "ae"), &cfg.autoencoder, in_channels)?,
            ldm_p: DiffusionUnet::new(&(p / "ldm_p"), &cfg.ldm_p, z, z)?,
            ldm_s: DiffusionUnet::new(&(p / "ldm_s"), &cfg.ldm_s, n_classes + z, n_classes)?,
            latent_scale: p.ones_no_train("latent_scale", &[1]),
            schedule: cfg.schedule()?,
            cfg: cfg.clone(),
            n_classes,
        })
    }

    /// The scaled latent (posterior mean) of normalized tiles `(N, C, T, T)`.
    pub fn encode(&self, x: &Tensor) -> Tensor {
        self.ae.encode(x).mean * &self.latent_scale
    }

    fn timesteps(t: usize, n: i64, device: Device) -> Tensor {
        Tensor::full([n], t as i64, (Kind::Int64, device))
    }

    /// LDM-P's noise prediction.
    pub fn eps_p(&self, x: &Tensor, t: usize) -> Tensor {
        self.ldm_p.forward_t(x, &Self::timesteps(t, x.size()[0], x.device()), false)
    }

    /// LDM-S's noise prediction for mask latents `x` given image latents `z`.
    pub fn eps_s(&self, x: &Tensor, z: &Tensor, t: usize) -> Tensor {
        self.ldm_s.forward_t(&Tensor::cat(&[x, z], 1), &Self::timesteps(t, x.size()[0], x.device()), false)
    }

    /// The starting noise `(N, K, h, w)` for latents `z`.
    pub fn start_noise(
        &self,
        z: &Tensor,
        opts: &DiffusionOptions,
        rng: &mut NormalStream,
        monitor: &Monitor,
    ) -> Result<Tensor> {
        let (n, _, h, w) = z.size4()?;
        let k = self.n_classes;
        let avg_repeat = |e: Tensor| e.mean_dim(1, true, Kind::Float).expand([n, k, h, w], false).contiguous();
        Ok(match opts.start {
            StartNoise::Random => rng.draw(&[n, k, h, w], z.device()),
            StartNoise::Forward => {
                if opts.forward_t == 0 {
                    avg_repeat(z.shallow_clone())
                } else {
                    avg_repeat(self.schedule.q_sample_at(z, opts.forward_t, &rng.draw(&z.size(), z.device())))
                }
            }
            StartNoise::Prior => {
                let mut eps = |x: &Tensor, t: usize| Ok(self.eps_p(x, t));
                avg_repeat(ddim::invert(&self.schedule, opts.inversion_steps, z, &mut eps, monitor)?)
            }
        })
    }

    /// DDIM sampling of LDM-S from `noise` given `z`: the mask latent `(N, K, h, w)`.
    pub fn sample_mask(
        &self,
        noise: &Tensor,
        z: &Tensor,
        opts: &DiffusionOptions,
        rng: &mut NormalStream,
        monitor: &Monitor,
    ) -> Result<Tensor> {
        let clip = opts.clip_denoised;
        let mut eps = |x: &Tensor, t: usize| {
            let e = self.eps_s(x, z, t);
            if !clip {
                return Ok(e);
            }
            let a = self.schedule.alpha_bar(t);
            let x0 = ((x - &e * (1.0 - a).sqrt()) / a.sqrt()).clamp(-1.0, 1.0);
            Ok((x - x0 * a.sqrt()) / (1.0 - a).sqrt())
        };
        let shape = noise.size();
        let dev = noise.device();
        let mut fresh = || rng.draw(&shape, dev);
        ddim::sample(&self.schedule, opts.sampling_steps, opts.eta, noise, &mut eps, &mut fresh, monitor)
    }

    /// Segments a batch of normalized tiles `(N, C, T, T)`; `stream_seed` seeds this
    /// batch's random draws.
    pub fn predict(
        &self,
        x: &Tensor,
        opts: &DiffusionOptions,
        stream_seed: u64,
        monitor: &Monitor,
    ) -> Result<TileResult> {
        tch::no_grad(|| {
            let (_, _, th, tw) = x.size4()?;
            let mut rng = NormalStream::new(stream_seed);
            let z = self.encode(x);
            let k = self.n_classes;
            let mut votes: Option<Tensor> = None;
            let mut soft: Option<Tensor> = None;
            let mut first_noise = None;
            // the prior start is deterministic: invert once, whatever the number of samples
            // (as evaluations() counts it)
            let prior = match opts.start {
                StartNoise::Prior => Some(self.start_noise(&z, opts, &mut rng, monitor)?),
                _ => None,
            };
            for _ in 0..opts.samples {
                let noise = match &prior {
                    Some(p) => p.shallow_clone(),
                    None => self.start_noise(&z, opts, &mut rng, monitor)?,
                };
                if first_noise.is_none() {
                    first_noise = Some(noise.select(1, 0));
                }
                let y = self.sample_mask(&noise, &z, opts, &mut rng, monitor)?;
                let up = y.upsample_bilinear2d([th, tw], false, None, None);
                // the mask latent is 2 * one-hot - 1: scores in [0, 1]
                let p = ((up + 1.0) * 0.5).clamp(0.0, 1.0);
                let p = &p / (p.sum_dim_intlist(1, true, Kind::Float) + 1e-6);
                let v = p.argmax(1, false).one_hot(k).permute([0, 3, 1, 2]).to_kind(Kind::Float);
                votes = Some(match votes {
                    Some(a) => a + v,
                    None => v,
                });
                soft = Some(match soft {
                    Some(a) => a + p,
                    None => p,
                });
            }
            let s = opts.samples as f64;
            let probabilities = if opts.samples == 1 {
                soft.expect("one sample")
            } else {
                // majority voting; ties go to the higher mean score
                let votes = votes.expect("samples") / s;
                let soft = soft.expect("samples") / s;
                let tie = &votes + &soft * 1e-3;
                let win = tie.argmax(1, true);
                // report vote fractions, but make sure the argmax is the tie-broken winner
                &votes + Tensor::zeros_like(&votes).scatter_value(1, &win, 1e-4)
            };
            Ok(TileResult {
                probabilities,
                noise: first_noise.expect("samples >= 1"),
                latent: z.mean_dim(1, false, Kind::Float),
            })
        })
    }

    /// The one-hot masks `(N, H, W)` as latent targets `(N, K, H/f, W/f)` in [-1, 1].
    pub fn mask_latent(&self, masks: &Tensor) -> Tensor {
        let f = self.cfg.autoencoder.factor() as i64;
        let oh = masks.to_kind(Kind::Int64).one_hot(self.n_classes).permute([0, 3, 1, 2]).to_kind(Kind::Float);
        oh.avg_pool2d([f, f], [f, f], [0, 0], false, true, None) * 2.0 - 1.0
    }
}

// ---------------------------------------------------------------------------------------
// Starting-noise quality (the paper's SSIM and KLD).

/// The paper's starting-noise quality of one tile: SSIM between the channel-averaged
/// noise and the image (area-resized to the latent size; both min-max scaled to [0, 1]),
/// and the KL divergence of the noise's Gaussian-KDE density from N(0, 1).
///
/// The autoencoder is trained from scratch, so the sign of its latent space is arbitrary:
/// a latent that is a faithful but inverted copy of the image would score a negative SSIM.
/// `latent` (the tile's channel-averaged clean latent) fixes the orientation: when it
/// correlates negatively with the image, the noise is negated before the SSIM is taken.
/// The choice depends only on the image and the model, never on the noise, so it gives
/// random noise no advantage. Returns `(ssim_aligned, ssim_raw, kld)`.
pub fn noise_quality(noise: &Tensor, image: &Tensor, latent: &Tensor) -> Result<(f64, f64, f64)> {
    let (h, w) = (noise.size()[0], noise.size()[1]);
    let img = image.to_kind(Kind::Float).unsqueeze(0).unsqueeze(0).adaptive_avg_pool2d([h, w]).view([h, w]);
    let centred = |t: &Tensor| {
        let t = t.to_kind(Kind::Float);
        &t - t.mean(Kind::Float)
    };
    let covariance = (centred(&img) * centred(latent)).sum(Kind::Double).double_value(&[]);
    let orientation = if covariance < 0.0 { -1.0 } else { 1.0 };
    let scale = |t: &Tensor| {
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        (t - lo) / (hi - lo).max(1e-12)
    };
    let to_arr = |t: Tensor| -> Result<ndarray::Array2<f32>> {
        let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous().view([-1]))?;
        Ok(ndarray::Array2::from_shape_vec((h as usize, w as usize), v).expect("shape"))
    };
    let a = to_arr(scale(&img))?;
    let raw = metrics::ssim(a.view(), to_arr(scale(noise))?.view())?;
    let aligned =
        if orientation < 0.0 { metrics::ssim(a.view(), to_arr(scale(&(noise * -1.0)))?.view())? } else { raw };
    let values = Vec::<f32>::try_from(noise.to_kind(Kind::Float).to_device(Device::Cpu).contiguous().view([-1]))?;
    Ok((aligned, raw, metrics::kde_kl_to_standard_normal(&values)))
}

// ---------------------------------------------------------------------------------------
// Autoencoder quality

/// Mean reconstruction PSNR (dB, normalized units, data range of each tile) of the
/// autoencoder over non-overlapping tiles of `images`.
pub fn reconstruction_psnr(model: &Model, images: &[&crate::image::Image]) -> Result<f64> {
    let inner = model.lock();
    let net = pgdiff_net(&inner.net, model, "has no autoencoder")?;
    let t = model.meta.patch_size[0] as i64;
    let mut scores = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for img in images {
            let x = model.meta.normalization.apply_image(img)?;
            let x = array3_to_tensor(x.data.view(), model.device());
            let (_, h, w) = x.size3()?;
            for y0 in (0..=h - t).step_by(t as usize) {
                for x0 in (0..=w - t).step_by(t as usize) {
                    let tile = x.narrow(1, y0, t).narrow(2, x0, t).unsqueeze(0);
                    let rec = net.ae.decode(&net.ae.encode(&tile).mean);
                    let a = crate::image::tensor_to_array3(&tile.get(0))?;
                    let b = crate::image::tensor_to_array3(&rec.get(0))?;
                    for c in 0..a.dim().0 {
                        scores
                            .push(metrics::psnr(a.index_axis(ndarray::Axis(0), c), b.index_axis(ndarray::Axis(0), c))?);
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(metrics::mean(&scores))
}

// ---------------------------------------------------------------------------------------
// Evaluation on labelled frames (the comparison tables)

/// Scores of one sampling configuration on labelled frames.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TileEvaluation {
    /// Per frame: mIoU over all classes (background included), as the paper.
    pub miou: Vec<f64>,
    /// Per frame: mean F1 (Dice) over all classes.
    pub f1: Vec<f64>,
    /// Per tile: SSIM between the starting noise and the image, the latent's sign aligned
    /// with the image (see [`noise_quality`]).
    pub noise_ssim: Vec<f64>,
    /// Per tile: the same SSIM without sign alignment.
    pub noise_ssim_raw: Vec<f64>,
    /// Per tile: KL divergence of the starting noise's KDE density from N(0, 1).
    pub noise_kld: Vec<f64>,
    /// Wall seconds per tile.
    pub seconds_per_tile: f64,
}

/// Segments labelled frames tile by tile (non-overlapping `T x T` tiles; frame sides
/// must be multiples of the model's patch) and scores them; also measures each tile's
/// starting noise. Tile batches draw from streams seeded by `(opts.seed, frame, batch)`.
pub fn evaluate_tiles(
    model: &Model,
    samples: &[&Sample],
    opts: &DiffusionOptions,
    batch_size: usize,
    monitor: &Monitor,
) -> Result<TileEvaluation> {
    opts.validate(
        model.with_net(|n| pgdiff_net(n, model, "cannot be evaluated by evaluate_tiles").map(|d| d.schedule.len()))?,
    )?;
    let t = model.meta.patch_size[0];
    let k = model.n_classes();
    let mut ev = TileEvaluation {
        miou: Vec::new(),
        f1: Vec::new(),
        noise_ssim: Vec::new(),
        noise_ssim_raw: Vec::new(),
        noise_kld: Vec::new(),
        seconds_per_tile: 0.0,
    };
    let mut tiles_done = 0usize;
    let t0 = Instant::now();
    for (fi, s) in samples.iter().enumerate() {
        let (h, w) = s.mask.dim();
        if h % t != 0 || w % t != 0 {
            return Err(Error::Shape(format!(
                "frame '{}' is {h} x {w}; evaluation needs multiples of the {t}-pixel tile",
                s.name
            )));
        }
        let x = array3_to_tensor(model.meta.normalization.apply_image(&s.image)?.data.view(), model.device());
        let origins: Vec<(usize, usize)> = (0..h / t).flat_map(|r| (0..w / t).map(move |c| (r * t, c * t))).collect();
        let mut labels = crate::image::Mask::zeros((h, w));
        for (bi, chunk) in origins.chunks(batch_size.max(1)).enumerate() {
            monitor.check()?;
            let batch = Tensor::stack(
                &chunk
                    .iter()
                    .map(|&(y, x0)| x.narrow(1, y as i64, t as i64).narrow(2, x0 as i64, t as i64))
                    .collect::<Vec<_>>(),
                0,
            );
            let stream = per_epoch_seed(per_epoch_seed(opts.seed, fi), bi);
            let res = model.with_net(|n| {
                pgdiff_net(n, model, "cannot be evaluated by evaluate_tiles")?.predict(&batch, opts, stream, monitor)
            })?;
            let am = res.probabilities.argmax(1, false).to_kind(Kind::Uint8).to_device(Device::Cpu);
            for (i, &(y, x0)) in chunk.iter().enumerate() {
                let v = Vec::<u8>::try_from(am.get(i as i64).contiguous().view([-1]))?;
                let tile = ndarray::ArrayView2::from_shape((t, t), &v).expect("tile shape");
                labels.slice_mut(ndarray::s![y..y + t, x0..x0 + t]).assign(&tile);
                let (ssim, raw, kld) =
                    noise_quality(&res.noise.get(i as i64), &batch.get(i as i64).get(0), &res.latent.get(i as i64))?;
                ev.noise_ssim.push(ssim);
                ev.noise_ssim_raw.push(raw);
                ev.noise_kld.push(kld);
            }
            tiles_done += chunk.len();
        }
        let sc = metrics::score(&labels, &s.mask, k)?;
        ev.miou.push(sc.miou());
        ev.f1.push(metrics::mean(&sc.classes.iter().map(|c| c.f1).collect::<Vec<_>>()));
    }
    ev.seconds_per_tile = t0.elapsed().as_secs_f64() / tiles_done.max(1) as f64;
    Ok(ev)
}

/// The `pgdiff` kind: prior-guided latent-diffusion segmentation of QPI.
pub struct PgDiff;

pub static PGDIFF: PgDiff = PgDiff;

fn architecture(meta: &ModelMeta) -> Result<PgDiffConfig> {
    serde_json::from_value(meta.architecture.clone())
        .map_err(|e| Error::ModelFormat(format!("invalid pgdiff architecture: {e}")))
}

impl crate::engine::method::Method for PgDiff {
    fn kind(&self) -> ModelKind {
        ModelKind::Pgdiff
    }
    fn check_config(&self, cfg: &TrainConfig) -> Result<()> {
        cfg.pgdiff.validate()?;
        if cfg.patch_size[0] != cfg.patch_size[1] {
            return Err(Error::Config(format!(
                "patch_size {:?}: a pgdiff model trains on square tiles",
                cfg.patch_size
            )));
        }
        Ok(())
    }
    fn patch_divisor(&self, cfg: &TrainConfig) -> usize {
        cfg.pgdiff.divisor()
    }
    fn build(&self, meta: &ModelMeta, p: &nn::Path) -> Result<Net> {
        let cfg = architecture(meta)?;
        Ok(Net::new(PgDiffNet::new(p, &cfg, meta.input_channels.len() as i64, meta.classes.len() as i64)?))
    }
    fn divisor(&self, meta: &ModelMeta) -> usize {
        architecture(meta).map(|c| c.divisor()).unwrap_or(1)
    }
    fn load(
        &self,
        cfg: &TrainConfig,
        data_dir: &std::path::Path,
    ) -> Result<Box<dyn crate::engine::train::TrainingData>> {
        train::load(cfg, data_dir)
    }
    fn export_info(&self) -> crate::engine::method::ExportInfo {
        crate::engine::method::ExportInfo {
            name: "PG-DiffSeg",
            tags: vec![
                "segmentation",
                "quantitative-phase-imaging",
                "diffusion",
                "cells",
                "live-dead",
                "2d",
                "pytorch",
            ],
            cite: vec![
                serde_json::json!({"text": "Shao Z, Anastasio MA, Li H. Prior-guided Diffusion Model for Cell Segmentation in Quantitative Phase Imaging (PG-DiffSeg); built on denoising diffusion implicit models (Song, Meng, Ermon, arXiv:2010.02502).", "url": "https://arxiv.org/abs/2010.02502"}),
                serde_json::json!({"text": "Rombach R, Blattmann A, Lorenz D, Esser P, Ommer B. High-Resolution Image Synthesis with Latent Diffusion Models. CVPR 2022.", "url": "https://arxiv.org/abs/2112.10752"}),
            ],
        }
    }
    fn simulator(&self, _meta: &ModelMeta) -> Option<&'static str> {
        Some("qpi")
    }
    fn recipes(&self) -> &'static [crate::engine::method::Recipe] {
        &[crate::engine::method::Recipe {
            name: "pg-diffseg",
            what: "PG-DiffSeg: prior-guided latent diffusion (live / dead / background)",
            input: "qpi",
        }]
    }
    fn recipe(&self, name: &str, size: &str) -> Result<TrainConfig> {
        match name {
            "pg-diffseg" => Ok(recipes::DiffPreset::parse(size)?.recipe()),
            o => Err(Error::InvalidArgument(format!("'{o}' is not a pgdiff recipe"))),
        }
    }
}

/// The PG-DiffSeg network of `model`, or an error saying that a model of its kind `what`.
pub(crate) fn pgdiff_net<'a>(net: &'a Net, model: &Model, what: &str) -> Result<&'a PgDiffNet> {
    net.downcast::<PgDiffNet>()
        .ok_or_else(|| Error::Unsupported(format!("a '{}' model {what}", model.meta.kind.name())))
}

/// A PG-DiffSeg network has no single forward pass: it segments by diffusion sampling.
impl Network for PgDiffNet {
    fn forward(&self, _x: &Tensor, _deep_supervision: bool) -> Result<Vec<Tensor>> {
        Err(Error::Unsupported("a pgdiff model has no single forward pass; it segments by diffusion sampling".into()))
    }
    fn infers_channels_last(&self) -> bool {
        false
    }
    /// The saved sampling on the first stream (export needs it deterministic).
    fn export_forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = self.cfg.sampling;
        Ok(self.predict(x, &o, per_epoch_seed(o.seed, 0), &Monitor::none())?.probabilities)
    }
    /// Diffusion sampling with the call's options (the model's defaults when unset);
    /// every batch of tiles draws from its own stream, `(seed, batch index)`.
    fn tile_predictor<'a>(
        &'a self,
        opts: &SegmentOptions,
        monitor: &'a Monitor,
    ) -> Result<crate::engine::model::TilePredictor<'a>> {
        let o = opts.diffusion.unwrap_or(self.cfg.sampling);
        o.validate(self.schedule.len())?;
        let mut batch_no = 0usize;
        Ok(Box::new(move |x: &Tensor| -> Result<Tensor> {
            let stream = per_epoch_seed(o.seed, batch_no);
            batch_no += 1;
            Ok(self.predict(x, &o, stream, monitor)?.probabilities)
        }))
    }
}

impl Model {
    /// The sampling a PG-DiffSeg model was saved with.
    pub fn diffusion_defaults(&self) -> Result<DiffusionOptions> {
        self.with_net(|n| {
            n.downcast::<PgDiffNet>().map(|d| d.cfg.sampling).ok_or_else(|| {
                Error::Unsupported(format!(
                    "diffusion options apply to pgdiff models; this is a '{}' model",
                    self.meta.kind.name()
                ))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latent that is an inverted copy of the image scores like an upright one once the
    /// sign is aligned; the alignment follows the clean latent, not the noise.
    #[test]
    fn noise_ssim_aligns_the_latent_sign() {
        let image = (Tensor::arange(256, (Kind::Float, Device::Cpu)).view([16, 16]) * 0.37).sin();
        let upright = &image * 0.1;
        let inverted = &image * -0.1;
        let (aligned_up, raw_up, _) = noise_quality(&upright, &image, &upright).unwrap();
        let (aligned_inv, raw_inv, _) = noise_quality(&inverted, &image, &inverted).unwrap();
        assert!(aligned_up > 0.99 && raw_up > 0.99, "{aligned_up} {raw_up}");
        assert!(raw_inv < 0.0, "an inverted copy has negative raw SSIM: {raw_inv}");
        assert!((aligned_inv - aligned_up).abs() < 1e-6, "{aligned_inv} vs {aligned_up}");
        // an upright latent does not flip an inverted noise
        let (aligned_mixed, raw_mixed, _) = noise_quality(&inverted, &image, &upright).unwrap();
        assert_eq!(aligned_mixed, raw_mixed);
        assert!(aligned_mixed < 0.0);
    }
}
