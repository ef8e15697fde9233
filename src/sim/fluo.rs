//! Simulator of widefield fluorescence images of two superimposed structures (the
//! muSplit setting: one fluorophore, two structures, one image).
//!
//! # Model
//!
//! Each structure is first drawn as a fluorophore density on the pixel grid, then
//! imaged: blurred by a Gaussian approximation of the widefield PSF
//! (`sigma = 0.21 lambda / NA`, in pixels), scaled to an expected photon count, summed
//! with a background, and recorded with shot noise and camera read noise.
//!
//! **Structure pairs** (two per pair, with distinct spatial statistics):
//! - `actin_tubulin`: *actin-like* stress fibres, long straight segments gathered in
//!   2-4 bundles of one dominant orientation each (orientation spread 0.15 rad); and
//!   *microtubule-like* filaments, persistent random walks (persistence length 60-150 px)
//!   radiating from 2-5 organizing centres, curved and crossing.
//! - `vesicles_nuclei`: *punctate vesicles*, small Gaussian spots (sigma 0.5-2 px before
//!   the PSF) clustered around cell centres; and *nuclei*, large smooth-edged ellipses
//!   (radius 6-10 % of the frame) with a smooth chromatin texture and darker nucleoli.
//!
//! Filaments are deposited as line densities (bilinear splats every 0.5 px along the
//! path), so their imaged width is the PSF's.
//!
//! **Photometry.** Structure 1 is scaled so that its 99.9th percentile equals a peak
//! photon count drawn from `peak_photons`; structure 2 to that peak times a relative
//! brightness drawn log-uniformly from `brightness_ratio`. The targets are these two
//! noise-free expected photon images `s1`, `s2`. The input is
//! `Poisson(s1 + s2 + b) + N(0, read_noise^2)` in photo-electrons, with a background
//! `b` that varies smoothly by +-20 % around `background_photons`.
//!
//! Everything is drawn from seeded ChaCha8 streams with portable arithmetic, so a seed
//! gives the same images on every platform.

use std::path::Path;

use ndarray::Array3;
use serde::{Deserialize, Serialize};

use super::ssqpm::{Rng, gaussian_blur, pmath, sample_seed, smooth_field};
use crate::error::{Error, Result};
use crate::image::Image;

/// Which two structures are superimposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructurePair {
    /// Straight actin-like stress fibres + curved microtubule-like networks.
    ActinTubulin,
    /// Punctate vesicles + large textured nuclei.
    VesiclesNuclei,
}

impl StructurePair {
    pub fn channel_names(self) -> [&'static str; 2] {
        match self {
            StructurePair::ActinTubulin => ["actin", "tubulin"],
            StructurePair::VesiclesNuclei => ["vesicles", "nuclei"],
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "actin_tubulin" => Ok(StructurePair::ActinTubulin),
            "vesicles_nuclei" => Ok(StructurePair::VesiclesNuclei),
            o => Err(Error::Config(format!("unknown structure pair '{o}'; expected actin_tubulin or vesicles_nuclei"))),
        }
    }
}

/// Simulator settings (JSON; unknown fields are rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FluoConfig {
    /// Image edge in pixels.
    pub size: usize,
    pub pair: StructurePair,
    /// Emission wavelength (nm).
    pub wavelength_nm: f64,
    pub numerical_aperture: f64,
    /// Pixel size in the sample plane (nm).
    pub pixel_size_nm: f64,
    /// Range of structure 1's peak (99.9th percentile) expected photons per pixel.
    pub peak_photons: [f64; 2],
    /// Range of structure 2's brightness relative to structure 1 (drawn log-uniformly).
    pub brightness_ratio: [f64; 2],
    /// Mean background photons per pixel.
    pub background_photons: f64,
    /// Camera read noise (electrons, rms).
    pub read_noise_e: f64,
    /// Structures per frame scale with the frame area; this is the density multiplier.
    pub density: f64,
    /// No shot or read noise (the input is exactly s1 + s2 + b).
    pub noiseless: bool,
}

impl Default for FluoConfig {
    fn default() -> Self {
        FluoConfig {
            size: 512,
            pair: StructurePair::ActinTubulin,
            wavelength_nm: 520.0,
            numerical_aperture: 1.3,
            pixel_size_nm: 65.0,
            peak_photons: [80.0, 400.0],
            brightness_ratio: [0.5, 2.0],
            background_photons: 10.0,
            read_noise_e: 1.5,
            density: 1.0,
            noiseless: false,
        }
    }
}

impl FluoConfig {
    pub fn validate(&self) -> Result<()> {
        if !(16..=16384).contains(&self.size) {
            return Err(Error::Config(format!("size {} px; expected 16..=16384", self.size)));
        }
        let pos = |v: f64, n: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::Config(format!("{n} = {v}; expected a positive number")))
            }
        };
        pos(self.wavelength_nm, "wavelength_nm")?;
        pos(self.numerical_aperture, "numerical_aperture")?;
        pos(self.pixel_size_nm, "pixel_size_nm")?;
        pos(self.density, "density")?;
        for (r, n) in [(self.peak_photons, "peak_photons"), (self.brightness_ratio, "brightness_ratio")] {
            if !(r[0].is_finite() && r[1].is_finite() && r[0] > 0.0 && r[0] <= r[1]) {
                return Err(Error::Config(format!("{n} = {r:?}; expected [lo, hi] with 0 < lo <= hi")));
            }
        }
        if !(self.background_photons.is_finite() && self.background_photons >= 0.0) {
            return Err(Error::Config(format!("background_photons = {}; expected >= 0", self.background_photons)));
        }
        if !(self.read_noise_e.is_finite() && self.read_noise_e >= 0.0) {
            return Err(Error::Config(format!("read_noise_e = {}; expected >= 0", self.read_noise_e)));
        }
        Ok(())
    }
    /// PSF Gaussian sigma in pixels.
    pub fn psf_sigma_px(&self) -> f64 {
        0.21 * self.wavelength_nm / self.numerical_aperture / self.pixel_size_nm
    }
}

/// One simulated frame.
#[derive(Debug, Clone)]
pub struct FluoSample {
    /// `(1, H, W)` superimposed image (photo-electrons), channel name "mixed".
    pub input: Image,
    /// `(2, H, W)` the two structures (expected photons), named after the pair.
    pub targets: Image,
    /// Relative brightness of structure 2 drawn for this frame.
    pub brightness_ratio: f64,
    pub peak_photons: f64,
}

const STREAM_S1: u64 = 10;
const STREAM_S2: u64 = 11;
const STREAM_PHOTOMETRY: u64 = 12;
const STREAM_CAMERA: u64 = 13;

/// A fluorophore density canvas.
struct Canvas {
    h: usize,
    w: usize,
    v: Vec<f64>,
}

impl Canvas {
    fn new(h: usize, w: usize) -> Self {
        Canvas { h, w, v: vec![0.0; h * w] }
    }
    /// Bilinear deposit of `amount` at sub-pixel `(y, x)` (outside the frame: dropped).
    fn splat(&mut self, y: f64, x: f64, amount: f64) {
        let (fy, fx) = (y.floor(), x.floor());
        let (dy, dx) = (y - fy, x - fx);
        for (oy, wy) in [(0, 1.0 - dy), (1, dy)] {
            for (ox, wx) in [(0, 1.0 - dx), (1, dx)] {
                let (yy, xx) = (fy as i64 + oy, fx as i64 + ox);
                if yy >= 0 && xx >= 0 && (yy as usize) < self.h && (xx as usize) < self.w {
                    self.v[yy as usize * self.w + xx as usize] += amount * wy * wx;
                }
            }
        }
    }
    /// A filament: line density `amount` per pixel of length along the polyline made by
    /// `steps` steps of 0.5 px from `(y, x)` with direction `theta`, which `turn` updates.
    fn filament(
        &mut self,
        mut y: f64,
        mut x: f64,
        mut theta: f64,
        length: f64,
        amount: f64,
        turn: &mut dyn FnMut() -> f64,
    ) {
        let step = 0.5;
        let n = (length / step) as usize;
        for _ in 0..n {
            self.splat(y, x, amount * step);
            theta += turn();
            let (s, c) = pmath::sin_cos(theta);
            y += step * s;
            x += step * c;
        }
    }
    /// A Gaussian spot of total `flux` and width `sigma` px.
    fn spot(&mut self, y: f64, x: f64, sigma: f64, flux: f64) {
        let r = (4.0 * sigma).ceil() as i64;
        let (cy, cx) = (y.round() as i64, x.round() as i64);
        let mut weights = Vec::with_capacity(((2 * r + 1) * (2 * r + 1)) as usize);
        let mut sum = 0.0;
        for yy in cy - r..=cy + r {
            for xx in cx - r..=cx + r {
                let d2 = (yy as f64 - y).powi(2) + (xx as f64 - x).powi(2);
                let g = pmath::exp(-d2 / (2.0 * sigma * sigma));
                sum += g;
                weights.push((yy, xx, g));
            }
        }
        for (yy, xx, g) in weights {
            if yy >= 0 && xx >= 0 && (yy as usize) < self.h && (xx as usize) < self.w {
                self.v[yy as usize * self.w + xx as usize] += flux * g / sum;
            }
        }
    }
}

fn count(rng: &mut Rng, lo: f64, hi: f64, scale: f64) -> usize {
    (rng.between(lo, hi) * scale).round().max(1.0) as usize
}

/// Straight stress fibres in bundles.
fn actin(rng: &mut Rng, size: usize, density: f64) -> Canvas {
    let s = size as f64;
    let area = (s / 512.0).powi(2) * density;
    let mut c = Canvas::new(size, size);
    let n_bundles = count(rng, 2.0, 4.99, area.sqrt().max(1.0)).max(2);
    for _ in 0..n_bundles {
        let (by, bx) = (rng.between(0.0, s), rng.between(0.0, s));
        let radius = rng.between(0.15, 0.35) * s;
        let theta0 = rng.between(0.0, std::f64::consts::PI);
        let n_fibres = count(rng, 15.0, 35.0, density);
        for _ in 0..n_fibres {
            let theta = theta0 + 0.15 * rng.normal();
            let length = rng.between(0.08, 0.4) * s;
            // centre within the bundle disc, start half a length back
            let (r, a) = (radius * rng.uniform().sqrt(), rng.between(0.0, 2.0 * std::f64::consts::PI));
            let (sa, ca) = pmath::sin_cos(a);
            let (st, ct) = pmath::sin_cos(theta);
            let (y0, x0) = (by + r * sa - 0.5 * length * st, bx + r * ca - 0.5 * length * ct);
            let amount = rng.between(0.5, 1.5);
            c.filament(y0, x0, theta, length, amount, &mut || 0.0);
        }
    }
    c
}

/// Curved microtubules radiating from organizing centres.
fn tubulin(rng: &mut Rng, size: usize, density: f64) -> Canvas {
    let s = size as f64;
    let area = (s / 512.0).powi(2);
    let mut c = Canvas::new(size, size);
    let n_centres = count(rng, 2.0, 5.99, area.max(1.0 / 3.0));
    for _ in 0..n_centres {
        let (cy, cx) = (rng.between(0.1 * s, 0.9 * s), rng.between(0.1 * s, 0.9 * s));
        let persistence = rng.between(60.0, 150.0);
        let n = count(rng, 15.0, 40.0, density);
        for _ in 0..n {
            let theta = rng.between(0.0, 2.0 * std::f64::consts::PI);
            let length = rng.between(0.12, 0.6) * s;
            let amount = rng.between(0.6, 1.2);
            let kappa = (0.5 / persistence).sqrt();
            // a filament's turns come from its own stream position: draw them up front
            let steps = (length / 0.5) as usize;
            let turns: Vec<f64> = (0..steps).map(|_| kappa * rng.normal()).collect();
            let mut it = turns.into_iter();
            let (y0, x0) = (cy + 3.0 * rng.normal(), cx + 3.0 * rng.normal());
            c.filament(y0, x0, theta, length, amount, &mut || it.next().unwrap_or(0.0));
        }
    }
    c
}

/// Punctate vesicles clustered around cell centres.
fn vesicles(rng: &mut Rng, size: usize, density: f64) -> Canvas {
    let s = size as f64;
    let area = (s / 512.0).powi(2) * density;
    let mut c = Canvas::new(size, size);
    let n_cells = count(rng, 3.0, 7.99, area.max(0.25));
    let cells: Vec<(f64, f64, f64)> =
        (0..n_cells).map(|_| (rng.between(0.0, s), rng.between(0.0, s), rng.between(0.06, 0.14) * s)).collect();
    let n = count(rng, 200.0, 450.0, area);
    for i in 0..n {
        let (y, x) = if i % 5 == 4 {
            (rng.between(0.0, s), rng.between(0.0, s))
        } else {
            let (cy, cx, r) = cells[rng.below(cells.len())];
            (cy + r * rng.normal(), cx + r * rng.normal())
        };
        let sigma = rng.between(0.5, 2.0);
        let flux = rng.between(0.5, 1.5) * 2.0 * std::f64::consts::PI * sigma * sigma;
        c.spot(y, x, sigma, flux);
    }
    c
}

/// Large textured nuclei with nucleoli.
fn nuclei(rng: &mut Rng, size: usize, density: f64) -> Canvas {
    let s = size as f64;
    let area = (s / 512.0).powi(2) * density;
    let mut c = Canvas::new(size, size);
    let texture = smooth_field(rng, size, size, 3.0);
    let n = count(rng, 3.0, 7.99, area.max(0.25));
    for _ in 0..n {
        let (cy, cx) = (rng.between(0.0, s), rng.between(0.0, s));
        let a = rng.between(0.06, 0.10) * s;
        let b = a * rng.between(0.7, 1.0);
        let phi = rng.between(0.0, std::f64::consts::PI);
        let (sp, cp) = pmath::sin_cos(phi);
        let level = rng.between(0.6, 1.2);
        let nucleoli: Vec<(f64, f64, f64)> = (0..1 + rng.below(3))
            .map(|_| (cy + 0.4 * b * rng.normal(), cx + 0.4 * b * rng.normal(), rng.between(0.1, 0.2) * b))
            .collect();
        let r = a.ceil() as i64 + 3;
        for y in (cy as i64 - r).max(0)..(cy as i64 + r + 1).min(size as i64) {
            for x in (cx as i64 - r).max(0)..(cx as i64 + r + 1).min(size as i64) {
                let (dy, dx) = (y as f64 - cy, x as f64 - cx);
                let (u, v) = (dx * cp + dy * sp, -dx * sp + dy * cp);
                let rho = ((u / a).powi(2) + (v / b).powi(2)).sqrt();
                // 2 px smooth edge
                let edge = ((1.0 - rho) * a / 2.0 + 0.5).clamp(0.0, 1.0);
                if edge <= 0.0 {
                    continue;
                }
                let i = y as usize * size + x as usize;
                let mut val = level * (1.0 + 0.25 * texture[i]).max(0.0) * edge;
                for &(ny, nx, nr) in &nucleoli {
                    let d = ((y as f64 - ny).powi(2) + (x as f64 - nx).powi(2)).sqrt();
                    if d < nr {
                        val *= 0.5;
                    }
                }
                c.v[i] += val;
            }
        }
    }
    c
}

/// The `q`-quantile of `v` (nearest rank; sampled for large images).
fn quantile(v: &[f64], q: f64) -> f64 {
    let stride = v.len().div_ceil(1 << 20).max(1);
    let mut s: Vec<f64> = v.iter().step_by(stride).copied().collect();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Simulates one frame.
pub fn simulate(cfg: &FluoConfig, seed: u64) -> Result<FluoSample> {
    cfg.validate()?;
    let n = cfg.size;
    let mut r1 = Rng::new(seed, STREAM_S1);
    let mut r2 = Rng::new(seed, STREAM_S2);
    let (c1, c2) = match cfg.pair {
        StructurePair::ActinTubulin => (actin(&mut r1, n, cfg.density), tubulin(&mut r2, n, cfg.density)),
        StructurePair::VesiclesNuclei => (vesicles(&mut r1, n, cfg.density), nuclei(&mut r2, n, cfg.density)),
    };
    let sigma = cfg.psf_sigma_px();
    let mut b1 = gaussian_blur(&c1.v, n, n, sigma);
    let mut b2 = gaussian_blur(&c2.v, n, n, sigma);
    let mut ph = Rng::new(seed, STREAM_PHOTOMETRY);
    let peak = ph.range(cfg.peak_photons);
    let (lr0, lr1) = (pmath::ln(cfg.brightness_ratio[0]), pmath::ln(cfg.brightness_ratio[1]));
    let ratio = pmath::exp(ph.between(lr0, lr1));
    for (b, target) in [(&mut b1, peak), (&mut b2, peak * ratio)] {
        let q = quantile(b, 0.999);
        let k = if q > 0.0 { target / q } else { 0.0 };
        b.iter_mut().for_each(|v| *v = (*v * k).max(0.0));
    }
    let bg_field = smooth_field(&mut ph, n, n, n as f64 / 6.0);
    let mut cam = Rng::new(seed, STREAM_CAMERA);
    let mut input = vec![0f32; n * n];
    for i in 0..n * n {
        let lam = b1[i] + b2[i] + cfg.background_photons * (1.0 + 0.2 * bg_field[i].clamp(-1.0, 1.0));
        input[i] = if cfg.noiseless {
            lam as f32
        } else {
            let shot =
                if lam < 30.0 { cam.poisson_small(lam) } else { (lam + lam.sqrt() * cam.normal()).round().max(0.0) };
            (shot + cfg.read_noise_e * cam.normal()) as f32
        };
    }
    let names = cfg.pair.channel_names();
    let mut t = Array3::<f32>::zeros((2, n, n));
    for (ch, b) in [b1, b2].iter().enumerate() {
        for (d, s) in t.index_axis_mut(ndarray::Axis(0), ch).iter_mut().zip(b) {
            *d = *s as f32;
        }
    }
    Ok(FluoSample {
        input: Image::with_names(Array3::from_shape_vec((1, n, n), input).expect("size"), vec!["mixed".into()])?,
        targets: Image::with_names(t, names.iter().map(|s| s.to_string()).collect())?,
        brightness_ratio: ratio,
        peak_photons: peak,
    })
}

#[derive(Serialize)]
struct SampleRecord {
    name: String,
    seed: u64,
    brightness_ratio: f64,
    peak_photons: f64,
}

/// Writes `dir/{train,test}/inputs/NAME.tif` (1-channel float32, the superimposed
/// image) and `dir/{train,test}/targets/NAME.tif` (2-channel float32, the structures),
/// names `fluo_0000`, ..., and `dir/simulation.json`. Returns the names per split.
pub fn write_dataset(
    dir: &Path,
    n_train: usize,
    n_test: usize,
    cfg: &FluoConfig,
    seed: u64,
) -> Result<[Vec<String>; 2]> {
    cfg.validate()?;
    let mut names = [Vec::new(), Vec::new()];
    let mut records = [Vec::new(), Vec::new()];
    for (si, (split, n)) in [("train", n_train), ("test", n_test)].into_iter().enumerate() {
        let in_dir = dir.join(split).join("inputs");
        let tg_dir = dir.join(split).join("targets");
        for d in [&in_dir, &tg_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        for i in 0..n {
            let s = sample_seed(seed, si == 1, i);
            let smp = simulate(cfg, s)?;
            let name = format!("fluo_{i:04}");
            crate::io::tiff::write_image_f32(&in_dir.join(format!("{name}.tif")), &smp.input)?;
            crate::io::tiff::write_image_f32(&tg_dir.join(format!("{name}.tif")), &smp.targets)?;
            records[si].push(SampleRecord {
                name: name.clone(),
                seed: s,
                brightness_ratio: smp.brightness_ratio,
                peak_photons: smp.peak_photons,
            });
            names[si].push(name);
        }
    }
    let record = serde_json::json!({
        "generator": "lumos::sim::fluo",
        "format_version": 1,
        "seed": seed,
        "config": cfg,
        "psf_sigma_px": cfg.psf_sigma_px(),
        "channel_names": cfg.pair.channel_names(),
        "train": records[0],
        "test": records[1],
    });
    let path = dir.join("simulation.json");
    crate::engine::weights::write_atomic(&path, serde_json::to_string_pretty(&record).expect("json").as_bytes())?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(pair: StructurePair) -> FluoConfig {
        FluoConfig { size: 96, pair, ..FluoConfig::default() }
    }

    #[test]
    fn same_seed_same_frame_and_input_is_the_noisy_sum() {
        for pair in [StructurePair::ActinTubulin, StructurePair::VesiclesNuclei] {
            let a = simulate(&small(pair), 7).unwrap();
            let b = simulate(&small(pair), 7).unwrap();
            assert_eq!(a.input, b.input);
            assert_eq!(a.targets, b.targets);
            let c = simulate(&small(pair), 8).unwrap();
            assert_ne!(a.targets, c.targets);
            // noiseless: input = s1 + s2 + background exactly
            let q = simulate(&FluoConfig { noiseless: true, background_photons: 0.0, ..small(pair) }, 7).unwrap();
            let sum = &q.targets.data.index_axis(ndarray::Axis(0), 0) + &q.targets.data.index_axis(ndarray::Axis(0), 1);
            let err = sum.iter().zip(q.input.data.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-3, "{pair:?}: {err}");
            // both structures are present and non-negative
            for ch in 0..2 {
                let t = a.targets.data.index_axis(ndarray::Axis(0), ch);
                assert!(t.iter().all(|v| *v >= 0.0));
                assert!(t.iter().cloned().fold(0f32, f32::max) > 10.0, "{pair:?} channel {ch} is empty");
            }
        }
    }

    #[test]
    fn shot_noise_has_poisson_variance() {
        let cfg = FluoConfig { read_noise_e: 0.0, ..small(StructurePair::VesiclesNuclei) };
        let a = simulate(&cfg, 3).unwrap();
        let clean = simulate(&FluoConfig { noiseless: true, ..cfg.clone() }, 3).unwrap();
        // residual variance over mean for pixels with lambda in [50, 400]
        let (mut num, mut den) = (0.0, 0.0);
        for (x, l) in a.input.data.iter().zip(clean.input.data.iter()) {
            if *l > 50.0 && *l < 400.0 {
                num += ((x - l) as f64).powi(2);
                den += *l as f64;
            }
        }
        assert!(den > 0.0);
        let fano = num / den;
        assert!((fano - 1.0).abs() < 0.15, "Fano factor {fano}");
    }

    /// Actin fibres are locally aligned (one orientation per bundle), microtubules are
    /// not: the structure tensor's coherence is higher for the actin channel.
    #[test]
    fn actin_is_more_oriented_than_tubulin() {
        let cfg = FluoConfig { size: 256, noiseless: true, ..FluoConfig::default() };
        let mut coh = [0.0; 2];
        for seed in 0..3 {
            let s = simulate(&cfg, seed).unwrap();
            for (ch, c) in coh.iter_mut().enumerate() {
                let t = s.targets.data.index_axis(ndarray::Axis(0), ch).to_owned();
                let (h, w) = t.dim();
                let (mut jxx, mut jyy, mut jxy) = (vec![0.0; h * w], vec![0.0; h * w], vec![0.0; h * w]);
                for y in 1..h - 1 {
                    for x in 1..w - 1 {
                        let gx = (t[[y, x + 1]] - t[[y, x - 1]]) as f64;
                        let gy = (t[[y + 1, x]] - t[[y - 1, x]]) as f64;
                        jxx[y * w + x] = gx * gx;
                        jyy[y * w + x] = gy * gy;
                        jxy[y * w + x] = gx * gy;
                    }
                }
                let (a, b, d) =
                    (gaussian_blur(&jxx, h, w, 8.0), gaussian_blur(&jyy, h, w, 8.0), gaussian_blur(&jxy, h, w, 8.0));
                let (mut num, mut den) = (0.0, 0.0);
                for i in 0..h * w {
                    num += ((a[i] - b[i]).powi(2) + 4.0 * d[i] * d[i]).sqrt();
                    den += a[i] + b[i];
                }
                *c += num / den;
            }
        }
        assert!(coh[0] > coh[1] + 0.05, "coherence actin {} vs tubulin {}", coh[0] / 3.0, coh[1] / 3.0);
    }
}
