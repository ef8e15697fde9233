//! nnU-Net's 2D data augmentation, applied to a training batch on the device.
//!
//! Every random draw, the noise pixels included, comes from the caller's seeded RNG (never
//! from libtorch's process-wide generator, which other threads may be using), so a run is
//! reproducible and a resumed run sees the same batches as an uninterrupted one.

use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Probabilities and ranges (defaults from nnU-Net's 2D pipeline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    pub enabled: bool,
    pub p_rotation: f64,
    pub p_scale: f64,
    pub scale_range: [f64; 2],
    pub p_noise: f64,
    pub noise_variance: [f64; 2],
    pub p_blur: f64,
    pub blur_sigma: [f64; 2],
    pub p_brightness: f64,
    pub brightness_range: [f64; 2],
    pub p_contrast: f64,
    pub contrast_range: [f64; 2],
    pub p_low_resolution: f64,
    pub low_resolution_zoom: [f64; 2],
    pub p_gamma: f64,
    pub p_gamma_inverted: f64,
    pub gamma_range: [f64; 2],
    pub mirror: bool,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            enabled: true,
            p_rotation: 0.2,
            p_scale: 0.2,
            scale_range: [0.7, 1.4],
            p_noise: 0.1,
            noise_variance: [0.0, 0.1],
            p_blur: 0.2,
            blur_sigma: [0.5, 1.0],
            p_brightness: 0.15,
            brightness_range: [0.75, 1.25],
            p_contrast: 0.15,
            contrast_range: [0.75, 1.25],
            p_low_resolution: 0.25,
            low_resolution_zoom: [0.5, 1.0],
            p_gamma: 0.3,
            p_gamma_inverted: 0.1,
            gamma_range: [0.7, 1.5],
            mirror: true,
        }
    }
}

fn uniform(rng: &mut impl Rng, r: [f64; 2]) -> f64 {
    if r[1] > r[0] { rng.random_range(r[0]..r[1]) } else { r[0] }
}

/// A factor from `r` that is below 1 half the time when `r` spans 1, as nnU-Net draws
/// contrast and gamma: uniform in `[r0, 1)` or in `[1, r1)`, so that a range like 0.7-1.5
/// weakens as often as it strengthens.
fn below_or_above_one(rng: &mut impl Rng, r: [f64; 2]) -> f64 {
    if !(r[0] < 1.0 && r[1] > 1.0) {
        return uniform(rng, r);
    }
    if rng.random_bool(0.5) { uniform(rng, [r[0], 1.0]) } else { uniform(rng, [1.0, r[1]]) }
}

/// Separable Gaussian blur of a `(1, C, H, W)` tensor, per channel.
fn gaussian_blur(x: &Tensor, sigma: f64) -> Tensor {
    let radius = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-radius..=radius).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
    let s: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / s).collect();
    let c = x.size()[1];
    let kt = Tensor::from_slice(&k).to_device(x.device());
    let kh = kt.view([1, 1, -1, 1]).repeat([c, 1, 1, 1]);
    let kw = kt.view([1, 1, 1, -1]).repeat([c, 1, 1, 1]);
    let y = x.reflection_pad2d([0, 0, radius, radius]).conv2d(&kh, None::<Tensor>, [1, 1], [0, 0], [1, 1], c);
    y.reflection_pad2d([radius, radius, 0, 0]).conv2d(&kw, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
}

/// Augments a batch in place of a copy: `images (N, C, H, W)` float, `masks (N, H, W)` int64.
pub fn augment_batch(images: &Tensor, masks: &Tensor, cfg: &AugmentConfig, rng: &mut impl Rng) -> (Tensor, Tensor) {
    if !cfg.enabled {
        return (images.shallow_clone(), masks.shallow_clone());
    }
    let n = images.size()[0];
    let (h, w) = (images.size()[2], images.size()[3]);
    let dev = images.device();
    let mut out_i = Vec::with_capacity(n as usize);
    let mut out_m = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut x = images.get(i).unsqueeze(0);
        let mut m = masks.get(i).unsqueeze(0).unsqueeze(0).to_kind(Kind::Float);

        // spatial: rotation (any angle) and scaling, one affine resampling
        let rot = rng.random_bool(cfg.p_rotation);
        let scl = rng.random_bool(cfg.p_scale);
        if rot || scl {
            let a = if rot { rng.random_range(0.0..std::f64::consts::TAU) } else { 0.0 };
            // zoom factor z > 1 enlarges the content: sample coordinates scaled by 1/z
            let z = if scl { uniform(rng, cfg.scale_range) } else { 1.0 };
            let (c, s) = (a.cos() / z, a.sin() / z);
            let theta =
                Tensor::from_slice(&[c as f32, -s as f32, 0.0, s as f32, c as f32, 0.0]).view([1, 2, 3]).to_device(dev);
            let grid = Tensor::affine_grid_generator(&theta, [1, 1, h, w], false);
            // interpolation 0 = bilinear, 1 = nearest; padding 0 = zeros, 2 = reflection.
            // Image and mask are padded alike, as nnU-Net does (image 0, the normalized
            // mean; mask 0, background): a mirrored image beside a background mask taught
            // the network to call mirrored cells background.
            x = x.grid_sampler(&grid, 0, 0, false);
            m = m.grid_sampler(&grid, 1, 0, false);
        }
        if rng.random_bool(cfg.p_noise) {
            // the drawn "variance" is the noise's standard deviation, as in nnU-Net
            // (batchgenerators hands it to np.random.normal as the scale)
            let sigma = uniform(rng, cfg.noise_variance);
            let noise: Vec<f32> = (0..x.numel()).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect();
            x = &x + Tensor::from_slice(&noise).view(x.size().as_slice()).to_device(x.device()) * sigma;
        }
        if rng.random_bool(cfg.p_blur) {
            x = gaussian_blur(&x, uniform(rng, cfg.blur_sigma));
        }
        if rng.random_bool(cfg.p_brightness) {
            x = &x * uniform(rng, cfg.brightness_range);
        }
        if rng.random_bool(cfg.p_contrast) {
            let f = below_or_above_one(rng, cfg.contrast_range);
            let dims: &[i64] = &[2, 3];
            let mean = x.mean_dim(dims, true, Kind::Float);
            let (lo, hi) = (x.amin(dims, true), x.amax(dims, true));
            x = ((&x - &mean) * f + &mean).maximum(&lo).minimum(&hi);
        }
        if rng.random_bool(cfg.p_low_resolution) {
            let z = uniform(rng, cfg.low_resolution_zoom);
            let (lh, lw) = (((h as f64) * z).round().max(1.0) as i64, ((w as f64) * z).round().max(1.0) as i64);
            x = x.upsample_nearest2d([lh, lw], None, None).upsample_bicubic2d([h, w], false, None, None);
        }
        let gamma_inverted = rng.random_bool(cfg.p_gamma_inverted);
        let gamma = rng.random_bool(cfg.p_gamma);
        for (apply, invert) in [(gamma_inverted, true), (gamma, false)] {
            if !apply {
                continue;
            }
            let g = below_or_above_one(rng, cfg.gamma_range);
            let y = if invert { -&x } else { x.shallow_clone() };
            let dims: &[i64] = &[2, 3];
            let (mn, mx) = (y.amin(dims, true), y.amax(dims, true));
            let range = (&mx - &mn).clamp_min(1e-7);
            // keep mean and std as nnU-Net does
            let (mean, std) = (y.mean_dim(dims, true, Kind::Float), y.std_dim(dims, true, true));
            let z = ((&y - &mn) / &range).clamp(0.0, 1.0).pow_tensor_scalar(g) * &range + &mn;
            let (zm, zs) = (z.mean_dim(dims, true, Kind::Float), z.std_dim(dims, true, true).clamp_min(1e-7));
            let z = (z - zm) / zs * std + mean;
            x = if invert { -z } else { z };
        }
        if cfg.mirror {
            if rng.random_bool(0.5) {
                x = x.flip([3]);
                m = m.flip([3]);
            }
            if rng.random_bool(0.5) {
                x = x.flip([2]);
                m = m.flip([2]);
            }
        }
        out_i.push(x);
        out_m.push(m.squeeze_dim(1).round().to_kind(Kind::Int64));
    }
    (Tensor::cat(&out_i, 0), Tensor::cat(&out_m, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shapes_labels_and_determinism() {
        let x = Tensor::randn([3, 2, 32, 32], (Kind::Float, tch::Device::Cpu));
        let m = Tensor::randint(3, [3, 32, 32], (Kind::Int64, tch::Device::Cpu));
        let cfg = AugmentConfig {
            p_rotation: 1.0,
            p_scale: 1.0,
            p_noise: 1.0,
            p_blur: 1.0,
            p_brightness: 1.0,
            p_contrast: 1.0,
            p_low_resolution: 1.0,
            p_gamma: 1.0,
            p_gamma_inverted: 1.0,
            ..Default::default()
        };
        let run = || {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            augment_batch(&x, &m, &cfg, &mut rng)
        };
        let (a, am) = run();
        let (b, bm) = run();
        assert_eq!(a.size(), vec![3, 2, 32, 32]);
        assert_eq!(am.size(), vec![3, 32, 32]);
        assert!(a.equal(&b) && am.equal(&bm), "same seeds give the same batch");
        assert!(!a.equal(&x), "augmentation changed the images");
        // masks stay labels in the original set
        assert!(am.min().int64_value(&[]) >= 0 && am.max().int64_value(&[]) <= 2);
        assert_eq!(i64::try_from(a.isfinite().logical_not().sum(Kind::Int64)).unwrap(), 0);
    }

    fn only(cfg: AugmentConfig) -> AugmentConfig {
        AugmentConfig {
            p_rotation: 0.0,
            p_scale: 0.0,
            p_noise: 0.0,
            p_blur: 0.0,
            p_brightness: 0.0,
            p_contrast: 0.0,
            p_low_resolution: 0.0,
            p_gamma: 0.0,
            p_gamma_inverted: 0.0,
            mirror: false,
            ..cfg
        }
    }

    /// Where a rotation or zoom-out samples outside the patch, the image is padded with 0
    /// and the mask with background, as nnU-Net pads them; the image used to be mirrored
    /// there while the mask said background.
    #[test]
    fn rotation_pads_image_and_mask_alike() {
        let opts = (Kind::Float, tch::Device::Cpu);
        let x = Tensor::ones([1, 1, 32, 32], opts) * 5.0;
        let m = Tensor::ones([1, 32, 32], (Kind::Int64, tch::Device::Cpu));
        let cfg = AugmentConfig { p_scale: 1.0, scale_range: [0.7, 0.7], ..only(AugmentConfig::default()) };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (a, am) = augment_batch(&x, &m, &cfg, &mut rng);
        // a corner lies outside the zoomed-out content: image 0 and mask background there
        assert_eq!(am.int64_value(&[0, 0, 0]), 0);
        assert!(a.double_value(&[0, 0, 0, 0]).abs() < 1e-6, "image corner {}", a.double_value(&[0, 0, 0, 0]));
        // and wherever the mask is background, the image holds no copy of the cell value
        let bg = am.eq(0).unsqueeze(1);
        let leaked = a.masked_select(&bg).gt(4.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(leaked, 0, "mirrored content under a background mask");
    }

    /// Gaussian noise: the drawn value is the standard deviation (nnU-Net's reading).
    #[test]
    fn noise_std_is_the_drawn_value() {
        let x = Tensor::zeros([1, 1, 256, 256], (Kind::Float, tch::Device::Cpu));
        let m = Tensor::zeros([1, 256, 256], (Kind::Int64, tch::Device::Cpu));
        let cfg = AugmentConfig { p_noise: 1.0, noise_variance: [0.1, 0.1], ..only(AugmentConfig::default()) };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let (a, _) = augment_batch(&x, &m, &cfg, &mut rng);
        let sd = a.std(true).double_value(&[]);
        assert!((sd - 0.1).abs() < 0.005, "noise std {sd}");
    }

    /// Contrast and gamma factors fall below 1 about half the time for ranges around 1.
    #[test]
    fn contrast_and_gamma_factors_weaken_as_often_as_they_strengthen() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<f64> = (0..4000).map(|_| below_or_above_one(&mut rng, [0.7, 1.5])).collect();
        let below = draws.iter().filter(|&&g| g < 1.0).count() as f64 / draws.len() as f64;
        assert!((below - 0.5).abs() < 0.03, "share below 1: {below}");
        assert!(draws.iter().all(|&g| (0.7..1.5).contains(&g)));
        // ranges that do not span 1 are drawn plainly
        assert!((0..100).all(|_| (0.5..0.9).contains(&below_or_above_one(&mut rng, [0.5, 0.9]))));
        assert!((0..100).all(|_| (1.1..1.3).contains(&below_or_above_one(&mut rng, [1.1, 1.3]))));
    }
}
