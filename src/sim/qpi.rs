//! Simulator of quantitative phase images (QPI) of adherent cells for live / dead
//! segmentation (the PG-DiffSeg setting: unlabelled HeLa / CHO cells, a phase map in
//! radians, three classes background / live / dead).
//!
//! # Model
//!
//! The phase is `phi = 2 pi / lambda * OPD`, with the optical path difference
//! `OPD = sum over cells of (n - n_medium) * h` (um), imaged with a Gaussian PSF
//! (`sigma = 0.21 lambda / NA`) and recorded with a background left by phase retrieval
//! (a smooth tilt and curvature plus a smooth random field) and white noise.
//!
//! **Live cells** are flat and spread: an irregular outline (an ellipse, aspect 1-1.8,
//! perturbed by radial Fourier modes k = 2..5 and 0-3 lamellipodial protrusions), a thin
//! lamella (0.3-0.6 um) tapering to the edge, a central dome (1.5-3.5 um), and an
//! elliptical nucleus (extra thickness and refractive index) with 1-3 nucleoli. The
//! cytoplasm carries organelle texture: a smooth random field (correlation 1.5 px)
//! modulating the refractive index by +-12 %. Refractive index increment 0.025-0.04.
//!
//! **Dead cells** are rounded: near-circular outlines (aspect 1-1.2, radius 0.4-0.6 of a
//! live cell's), a spherical-cap profile 4-7 um high, a higher refractive index
//! increment (0.04-0.06, condensed cytoplasm), a granular texture (correlation 0.7 px,
//! +-30 %), and 2-6 blebs (small spheres 1-2.5 um across) on the rim. Blebs are part of
//! the dead cell's mask.
//!
//! **Debris**: small dense particles (radius 0.5-1.5 um, 0.3-1.5 rad) scattered in the
//! background, labelled background, so that "small and bright" alone does not mean
//! dead.
//!
//! **Density** varies per frame: the number of cells is drawn so that they cover a
//! fraction of the field drawn from `coverage`, and the fraction of dead cells from
//! `dead_fraction`. Cells do not overlap (a candidate overlapping placed cells by more
//! than 5 % of its area is rejected; the overlap goes to the cell placed first).
//!
//! Masks: 0 = background, 1 = live, 2 = dead. Every draw comes from seeded ChaCha8
//! streams and portable arithmetic, so a seed gives the same frame on every platform.

use std::path::Path;

use ndarray::{Array2, Array3};
use serde::{Deserialize, Serialize};

use super::ssqpm::{Rng, gaussian_blur, pmath, sample_seed, smooth_field};
use crate::error::{Error, Result};
use crate::image::{Image, Labels, Mask};

/// Class names of the masks.
pub const CLASS_NAMES: [&str; 3] = ["background", "live", "dead"];

/// Simulator settings (JSON; unknown fields rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QpiConfig {
    /// Image edge in pixels.
    pub size: usize,
    /// Pixel size in the sample plane (um).
    pub pixel_size_um: f64,
    /// Illumination wavelength (um).
    pub wavelength_um: f64,
    pub numerical_aperture: f64,
    /// Range of the field fraction covered by cells.
    pub coverage: [f64; 2],
    /// Range of the fraction of dead cells.
    pub dead_fraction: [f64; 2],
    /// Live cell equivalent radius range (um).
    pub live_radius_um: [f64; 2],
    /// Debris particles per 100 x 100 um.
    pub debris_density: f64,
    /// White phase noise (rad, rms).
    pub noise_rad: f64,
    /// Amplitude of the smooth background left by phase retrieval (rad, rms).
    pub background_rad: f64,
}

impl Default for QpiConfig {
    fn default() -> Self {
        QpiConfig {
            size: 256,
            pixel_size_um: 0.6,
            wavelength_um: 0.55,
            numerical_aperture: 0.45,
            coverage: [0.15, 0.45],
            dead_fraction: [0.2, 0.7],
            live_radius_um: [12.0, 22.0],
            debris_density: 4.0,
            noise_rad: 0.03,
            background_rad: 0.06,
        }
    }
}

impl QpiConfig {
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
        pos(self.pixel_size_um, "pixel_size_um")?;
        pos(self.wavelength_um, "wavelength_um")?;
        pos(self.numerical_aperture, "numerical_aperture")?;
        for (r, n, hi) in [
            (self.coverage, "coverage", 0.9),
            (self.dead_fraction, "dead_fraction", 1.0),
            (self.live_radius_um, "live_radius_um", 1e4),
        ] {
            if !(r[0].is_finite() && r[1].is_finite() && r[0] >= 0.0 && r[0] <= r[1] && r[1] <= hi) {
                return Err(Error::Config(format!("{n} = {r:?}; expected [lo, hi] with 0 <= lo <= hi <= {hi}")));
            }
        }
        if self.live_radius_um[0] <= 0.0 {
            return Err(Error::Config("live_radius_um must be positive".into()));
        }
        for (v, n) in [
            (self.debris_density, "debris_density"),
            (self.noise_rad, "noise_rad"),
            (self.background_rad, "background_rad"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::Config(format!("{n} = {v}; expected >= 0")));
            }
        }
        Ok(())
    }
    /// PSF Gaussian sigma in pixels.
    pub fn psf_sigma_px(&self) -> f64 {
        0.21 * self.wavelength_um / self.numerical_aperture / self.pixel_size_um
    }
}

/// One simulated frame.
#[derive(Debug, Clone)]
pub struct QpiSample {
    /// `(1, H, W)` phase in radians, channel "phase".
    pub image: Image,
    /// 0 background, 1 live, 2 dead.
    pub mask: Mask,
    /// One label per cell, 1..=n in placement order, 0 elsewhere (debris included).
    pub instances: Labels,
    /// `dry_mass_pg[i]` is the dry mass of cell `i + 1`: the optical path difference the
    /// cell adds, integrated over its pixels, over α = 0.19 µm³/pg.
    pub dry_mass_pg: Vec<f64>,
    /// The noise-free, background-free phase (radians).
    pub clean_phase: Array2<f32>,
    pub n_live: usize,
    pub n_dead: usize,
}

const STREAM_GEOMETRY: u64 = 10;
const STREAM_TEXTURE: u64 = 11;
const STREAM_NOISE: u64 = 12;

/// Outline of a cell: `R(t) = r0 * ell(t) * (1 + sum_k a_k cos(k t) + b_k sin(k t))`.
struct Outline {
    cx: f64,
    cy: f64,
    r0: f64,
    aspect: f64,
    cos_o: f64,
    sin_o: f64,
    modes: Vec<(f64, f64)>, // k = 2, 3, ...
    /// Protrusions: (cos, sin of the direction in the cell frame, cos of the angular
    /// half-width, radial gain).
    bumps: Vec<(f64, f64, f64, f64)>,
}

impl Outline {
    fn random(rng: &mut Rng, cx: f64, cy: f64, r0: f64, aspect: [f64; 2], mode_amp: f64, bumps: usize) -> Self {
        let aspect = rng.range(aspect);
        let o = rng.between(0.0, std::f64::consts::PI);
        let (sin_o, cos_o) = pmath::sin_cos(o);
        let modes = (2..=5)
            .map(|k| {
                (mode_amp / k as f64 * (2.0 * rng.uniform() - 1.0), mode_amp / k as f64 * (2.0 * rng.uniform() - 1.0))
            })
            .collect();
        let bumps = (0..bumps)
            .map(|_| {
                let (s, c) = pmath::sin_cos(rng.between(-std::f64::consts::PI, std::f64::consts::PI));
                (c, s, pmath::sin_cos(rng.between(0.15, 0.35)).1, rng.between(0.2, 0.5))
            })
            .collect();
        Outline { cx, cy, r0, aspect, cos_o, sin_o, modes, bumps }
    }
    /// The largest radius the outline can reach (for bounding boxes).
    fn reach(&self) -> f64 {
        let m: f64 = self.modes.iter().map(|(a, b)| a.abs() + b.abs()).sum();
        let g = self.bumps.iter().map(|b| b.3).fold(0.0, f64::max);
        self.r0 * self.aspect.sqrt() * (1.0 + m) * (1.0 + g) + 2.0
    }
    /// Normalized radius `rho = d / R(t)` of a point (inside when < 1).
    fn rho(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let d = (dx * dx + dy * dy).sqrt();
        if d < 1e-9 {
            return 0.0;
        }
        // angle in the cell frame
        let (u, v) = (dx * self.cos_o + dy * self.sin_o, -dx * self.sin_o + dy * self.cos_o);
        let (c1, s1) = (u / d, v / d);
        // ellipse radius along (c1, s1) with semi-axes r0 sqrt(aspect), r0 / sqrt(aspect)
        let (a, b) = (self.r0 * self.aspect.sqrt(), self.r0 / self.aspect.sqrt());
        let r_ell = 1.0 / ((c1 / a).powi(2) + (s1 / b).powi(2)).sqrt();
        // cos(k t), sin(k t) by the angle-addition recurrence
        let (mut ck, mut sk) = (c1, s1);
        let mut pert = 1.0;
        for &(ak, bk) in &self.modes {
            let (c2, s2) = (ck * c1 - sk * s1, sk * c1 + ck * s1);
            (ck, sk) = (c2, s2);
            pert += ak * ck + bk * sk;
        }
        for &(bc, bs, cos_hw, gain) in &self.bumps {
            // cosine of the angle between this direction and the protrusion's
            let cd = c1 * bc + s1 * bs;
            if cd > cos_hw {
                let q = (cd - cos_hw) / (1.0 - cos_hw);
                pert += gain * q * q;
            }
        }
        d / (r_ell * pert.max(0.2))
    }
}

fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The frame being painted: optical path difference (µm), class labels and which cell
/// owns each pixel (`u32::MAX`: none), all `n x n`, row-major.
struct Canvas {
    n: usize,
    opd: Vec<f64>,
    label: Vec<u8>,
    owner: Vec<u32>,
}

/// One cell's footprint: the bounding box `[x0, x1) x [y0, y1)` and the outline's `rho`
/// (< 1 inside) at each pixel of it.
struct Footprint {
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
    rho: Vec<f64>,
    /// Pixels inside the outline.
    inside: usize,
    /// Of those, pixels some other cell owns already.
    overlap: usize,
    /// The cell's centre (pixels).
    centre: (f64, f64),
}

impl Footprint {
    fn rasterize(c: &Canvas, outline: &Outline, cx: f64, cy: f64) -> Self {
        let n = c.n;
        let reach = outline.reach();
        let (x0, x1) = ((cx - reach).floor().max(0.0) as usize, ((cx + reach).ceil() as usize).min(n));
        let (y0, y1) = ((cy - reach).floor().max(0.0) as usize, ((cy + reach).ceil() as usize).min(n));
        let bw = x1.saturating_sub(x0);
        let mut rho = vec![f64::INFINITY; bw * y1.saturating_sub(y0)];
        let (mut inside, mut overlap) = (0usize, 0usize);
        for y in y0..y1 {
            for x in x0..x1 {
                let r = outline.rho(x as f64 + 0.5, y as f64 + 0.5);
                rho[(y - y0) * bw + x - x0] = r;
                if r < 1.0 {
                    inside += 1;
                    if c.owner[y * n + x] != u32::MAX {
                        overlap += 1;
                    }
                }
            }
        }
        Footprint { x0, x1, y0, y1, rho, inside, overlap, centre: (cx, cy) }
    }

    /// `(frame index, rho)` of the footprint's free pixels inside the outline.
    fn free_pixels<'a>(&'a self, c: &'a Canvas) -> impl Iterator<Item = (usize, usize, usize, f64)> + 'a {
        let bw = self.x1 - self.x0;
        (self.y0..self.y1).flat_map(move |y| {
            (self.x0..self.x1).filter_map(move |x| {
                let i = y * c.n + x;
                let r = self.rho[(y - self.y0) * bw + x - self.x0];
                (r < 1.0 && c.owner[i] == u32::MAX).then_some((x, y, i, r))
            })
        })
    }
}

/// A dead cell: a shrunken, granular dome with blebs on its rim.
fn paint_dead(c: &mut Canvas, geo: &mut Rng, fp: &Footprint, outline: &Outline, px: f64, grain: &[f64], id: u32) {
    let (cx, cy) = fp.centre;
    let n = c.n;
    let height = geo.between(4.0, 7.0);
    let dn = geo.between(0.04, 0.06);
    let tex_amp = geo.between(0.2, 0.3);
    let body: Vec<(usize, f64)> = fp.free_pixels(c).map(|(_, _, i, r)| (i, r)).collect();
    for (i, r) in body {
        let h = height * (1.0 - r * r).max(0.0).sqrt();
        c.opd[i] += dn * (1.0 + tex_amp * grain[i]) * h;
        c.owner[i] = id;
        c.label[i] = 2;
    }
    let nb = 2 + geo.below(5);
    for _ in 0..nb {
        let a = geo.between(-std::f64::consts::PI, std::f64::consts::PI);
        let (s, co) = pmath::sin_cos(a);
        let rr = outline.r0 * geo.between(0.9, 1.1);
        let (bx, by) = (cx + rr * co, cy + rr * s);
        let br = geo.between(0.5, 1.25) / px; // radius in px
        let bh = 2.0 * br * px; // sphere: height = diameter (um)
        let bdn = dn * geo.between(0.8, 1.1);
        let (bx0, bx1) = ((bx - br - 1.0).floor().max(0.0) as usize, ((bx + br + 1.0).ceil().max(0.0) as usize).min(n));
        let (by0, by1) = ((by - br - 1.0).floor().max(0.0) as usize, ((by + br + 1.0).ceil().max(0.0) as usize).min(n));
        for y in by0..by1 {
            for x in bx0..bx1 {
                let i = y * n + x;
                let q = ((x as f64 + 0.5 - bx).powi(2) + (y as f64 + 0.5 - by).powi(2)).sqrt() / br;
                if q >= 1.0 || (c.owner[i] != u32::MAX && c.owner[i] != id) {
                    continue;
                }
                // the bleb's chord length, on top of whatever the body has there
                let chord = bh * (1.0 - q * q).sqrt();
                let on_body = if c.owner[i] == id { 0.5 } else { 1.0 };
                c.opd[i] += bdn * chord * on_body;
                c.owner[i] = id;
                c.label[i] = 2;
            }
        }
    }
}

/// A live cell: a thin lamella around a dome, with fine texture and an offset nucleus
/// holding one to three nucleoli.
fn paint_live(c: &mut Canvas, geo: &mut Rng, fp: &Footprint, outline: &Outline, px: f64, fine: &[f64], id: u32) {
    let (cx, cy) = fp.centre;
    let lamella = geo.between(0.3, 0.6);
    let dome = geo.between(1.5, 3.5);
    let rho_b = geo.between(0.45, 0.65);
    let dn = geo.between(0.025, 0.04);
    let tex_amp = geo.between(0.08, 0.12);
    let taper = (1.0 / px / outline.r0).clamp(0.03, 0.3); // ~1 um of the radius
    // nucleus: an ellipse offset from the centre, inside the dome
    let (nr, nasp) = (outline.r0 * geo.between(0.25, 0.35), geo.between(1.0, 1.4));
    let na = geo.between(-std::f64::consts::PI, std::f64::consts::PI);
    let (ns, nc) = pmath::sin_cos(na);
    let off = outline.r0 * geo.between(0.0, 0.15);
    let (ncx, ncy) = (cx + off * nc, cy + off * ns);
    let n_dn = geo.between(0.005, 0.015);
    let n_h = geo.between(1.0, 2.0);
    let nucleoli: Vec<(f64, f64, f64)> = (0..1 + geo.below(3))
        .map(|_| {
            let a = geo.between(-std::f64::consts::PI, std::f64::consts::PI);
            let (s, co) = pmath::sin_cos(a);
            let rr = nr * geo.between(0.0, 0.5);
            (ncx + rr * co, ncy + rr * s, geo.between(0.6, 1.2) / px)
        })
        .collect();
    let body: Vec<(usize, usize, usize, f64)> = fp.free_pixels(c).collect();
    for (x, y, i, r) in body {
        let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
        let mut h = lamella * smoothstep((1.0 - r) / taper);
        if r < rho_b {
            h += dome * pmath::powf(1.0 - (r / rho_b).powi(2), 1.5);
        }
        let mut path = dn * (1.0 + tex_amp * fine[i]) * h;
        let (dx, dy) = (fx - ncx, fy - ncy);
        let (u, v) = (dx * nc + dy * ns, -dx * ns + dy * nc);
        let rn2 = (u / (nr * nasp.sqrt())).powi(2) + (v / (nr / nasp.sqrt())).powi(2);
        if rn2 < 1.0 {
            let t = (1.0 - rn2).sqrt();
            path += (dn + n_dn) * n_h * t + n_dn * h * t;
            for &(ox, oy, orad) in &nucleoli {
                let q2 = ((fx - ox).powi(2) + (fy - oy).powi(2)) / (orad * orad);
                if q2 < 1.0 {
                    path += 0.02 * 2.0 * orad * px * (1.0 - q2).sqrt();
                }
            }
        }
        c.opd[i] += path;
        c.owner[i] = id;
        c.label[i] = 1;
    }
}

/// Debris in the background: small spheres on free pixels, labelled background.
fn paint_debris(c: &mut Canvas, geo: &mut Rng, cfg: &QpiConfig, k0: f64) {
    let n = c.n;
    let px = cfg.pixel_size_um;
    let fov = n as f64 * px;
    let n_debris = (cfg.debris_density * fov * fov / 1e4).round() as usize;
    for _ in 0..n_debris {
        let (dx, dy) = (geo.between(0.0, n as f64), geo.between(0.0, n as f64));
        let r = geo.between(0.5, 1.5) / px;
        let peak = geo.between(0.3, 1.5) / k0; // OPD (um) of the particle's centre
        let (x0, x1) = ((dx - r - 1.0).floor().max(0.0) as usize, ((dx + r + 1.0).ceil() as usize).min(n));
        let (y0, y1) = ((dy - r - 1.0).floor().max(0.0) as usize, ((dy + r + 1.0).ceil() as usize).min(n));
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * n + x;
                let q2 = ((x as f64 + 0.5 - dx).powi(2) + (y as f64 + 0.5 - dy).powi(2)) / (r * r);
                if q2 < 1.0 && c.owner[i] == u32::MAX {
                    c.opd[i] += peak * (1.0 - q2).sqrt();
                }
            }
        }
    }
}

/// The measured phase: `clean` plus the background that phase retrieval leaves (tilt,
/// curvature and a smooth field, zero mean) and white noise.
fn add_background(clean: &[f64], n: usize, cfg: &QpiConfig, noise: &mut Rng) -> Vec<f64> {
    let (tx, ty, cxx, cyy) = (noise.normal(), noise.normal(), noise.normal(), noise.normal());
    let bgf = smooth_field(noise, n, n, n as f64 / 6.0);
    let mut out = vec![0.0f64; n * n];
    let s = cfg.background_rad;
    for y in 0..n {
        for x in 0..n {
            let (u, v) = (2.0 * x as f64 / n as f64 - 1.0, 2.0 * y as f64 / n as f64 - 1.0);
            let bg = s
                * (0.5 * (tx * u + ty * v)
                    + 0.3 * (cxx * (u * u - 1.0 / 3.0) + cyy * (v * v - 1.0 / 3.0))
                    + 0.5 * bgf[y * n + x]);
            out[y * n + x] = clean[y * n + x] + bg + cfg.noise_rad * noise.normal();
        }
    }
    out
}

/// Simulates one frame: cells are placed until the drawn coverage is reached (a cell
/// that would overlap others by more than 5 % is redrawn), then debris, blur, the
/// retrieval background and noise.
pub fn simulate(cfg: &QpiConfig, seed: u64) -> Result<QpiSample> {
    cfg.validate()?;
    let n = cfg.size;
    let px = cfg.pixel_size_um;
    let k0 = 2.0 * std::f64::consts::PI / cfg.wavelength_um;
    let mut geo = Rng::new(seed, STREAM_GEOMETRY);
    let mut tex = Rng::new(seed, STREAM_TEXTURE);
    let mut noise = Rng::new(seed, STREAM_NOISE);

    let mut c = Canvas { n, opd: vec![0.0; n * n], label: vec![0; n * n], owner: vec![u32::MAX; n * n] };
    let fine = smooth_field(&mut tex, n, n, 1.5); // organelles of live cells
    let grain = smooth_field(&mut tex, n, n, 0.7); // granularity of dead cells

    let coverage = geo.range(cfg.coverage);
    let dead_frac = geo.range(cfg.dead_fraction);
    let area = (n * n) as f64;
    let mut covered = 0.0;
    let (mut n_live, mut n_dead) = (0usize, 0usize);
    let mut attempts = 0;
    while covered < coverage * area && attempts < 400 {
        attempts += 1;
        let dead = geo.uniform() < dead_frac;
        let r_live = geo.range(cfg.live_radius_um) / px;
        let (cx, cy) = (geo.between(0.0, n as f64), geo.between(0.0, n as f64));
        let outline = if dead {
            let r = r_live * geo.between(0.4, 0.6);
            Outline::random(&mut geo, cx, cy, r, [1.0, 1.2], 0.04, 0)
        } else {
            let nb = geo.below(4);
            Outline::random(&mut geo, cx, cy, r_live, [1.0, 1.8], 0.25, nb)
        };
        let fp = Footprint::rasterize(&c, &outline, cx, cy);
        if fp.inside < 12 || fp.overlap as f64 > 0.05 * fp.inside as f64 {
            continue;
        }
        let id = (n_live + n_dead) as u32;
        if dead {
            paint_dead(&mut c, &mut geo, &fp, &outline, px, &grain, id);
            n_dead += 1;
        } else {
            paint_live(&mut c, &mut geo, &fp, &outline, px, &fine, id);
            n_live += 1;
        }
        covered += fp.inside as f64;
    }
    paint_debris(&mut c, &mut geo, cfg, k0);

    let phase: Vec<f64> = c.opd.iter().map(|o| k0 * o).collect();
    let clean = gaussian_blur(&phase, n, n, cfg.psf_sigma_px());
    let out = add_background(&clean, n, cfg, &mut noise);
    let image = Image::with_names(
        Array3::from_shape_vec((1, n, n), out.iter().map(|&v| v as f32).collect()).expect("shape"),
        vec!["phase".into()],
    )?;
    let mask = Mask::from_shape_vec((n, n), c.label).expect("shape");
    let clean_phase = Array2::from_shape_vec((n, n), clean.iter().map(|&v| v as f32).collect()).expect("shape");
    let n_cells = n_live + n_dead;
    let mut dry_mass_pg = vec![0.0; n_cells];
    for (&o, &opd) in c.owner.iter().zip(&c.opd) {
        if o != u32::MAX {
            dry_mass_pg[o as usize] += opd * px * px / crate::engine::measure::DEFAULT_ALPHA_UM3_PER_PG;
        }
    }
    let instances =
        Labels::from_shape_vec((n, n), c.owner.iter().map(|&o| if o == u32::MAX { 0 } else { o + 1 }).collect())
            .expect("shape");
    Ok(QpiSample { image, mask, instances, dry_mass_pg, clean_phase, n_live, n_dead })
}

#[derive(Serialize)]
struct SampleRecord {
    name: String,
    seed: u64,
    n_live: usize,
    n_dead: usize,
}

/// Writes `DIR/{train,test}/{images,masks,instances}/qpi_NNNN.tif` (phase, classes,
/// one label per cell), `DIR/{train,test}/truth/qpi_NNNN.csv` (each cell's class and dry
/// mass) and `DIR/simulation.json`.
pub fn write_dataset(
    dir: &Path,
    n_train: usize,
    n_test: usize,
    cfg: &QpiConfig,
    seed: u64,
) -> Result<[Vec<String>; 2]> {
    cfg.validate()?;
    let mut names = [Vec::new(), Vec::new()];
    let mut records = [Vec::new(), Vec::new()];
    for (si, (split, count)) in [("train", n_train), ("test", n_test)].into_iter().enumerate() {
        let img_dir = dir.join(split).join("images");
        let mask_dir = dir.join(split).join("masks");
        let inst_dir = dir.join(split).join("instances");
        let truth_dir = dir.join(split).join("truth");
        for d in [&img_dir, &mask_dir, &inst_dir, &truth_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        for i in 0..count {
            let s = sample_seed(seed, si == 1, i);
            let smp = simulate(cfg, s)?;
            let name = format!("qpi_{i:04}");
            crate::io::tiff::write_image_f32(&img_dir.join(format!("{name}.tif")), &smp.image)?;
            crate::io::tiff::write_mask_u8(&mask_dir.join(format!("{name}.tif")), &smp.mask)?;
            crate::io::tiff::write_labels(&inst_dir.join(format!("{name}.tif")), &smp.instances)?;
            super::write_truth(
                &truth_dir.join(format!("{name}.csv")),
                &smp.instances,
                Some(&smp.mask),
                &smp.dry_mass_pg,
                &CLASS_NAMES,
            )?;
            records[si].push(SampleRecord { name: name.clone(), seed: s, n_live: smp.n_live, n_dead: smp.n_dead });
            names[si].push(name);
        }
    }
    let record = serde_json::json!({
        "generator": "lumos::sim::qpi",
        "format_version": 1,
        "seed": seed,
        "config": cfg,
        "psf_sigma_px": cfg.psf_sigma_px(),
        "classes": CLASS_NAMES,
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

    fn small() -> QpiConfig {
        QpiConfig { size: 128, ..QpiConfig::default() }
    }

    fn class_mean(s: &QpiSample, c: u8) -> Option<f64> {
        let v: Vec<f64> =
            s.mask.iter().zip(s.clean_phase.iter()).filter(|(m, _)| **m == c).map(|(_, p)| *p as f64).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    #[test]
    fn deterministic_and_three_classes() {
        let a = simulate(&small(), 3).unwrap();
        let b = simulate(&small(), 3).unwrap();
        assert_eq!(a.image, b.image);
        assert_eq!(a.mask, b.mask);
        assert_ne!(simulate(&small(), 4).unwrap().mask, a.mask);
        assert!(a.mask.iter().all(|&m| m <= 2));
        assert_eq!(a.image.channel_names, vec!["phase".to_string()]);
    }

    #[test]
    fn dead_cells_are_rounder_smaller_and_denser_than_live() {
        // over several frames: dead pixels have a higher mean phase than live pixels,
        // and dead cells are fewer pixels each
        let (mut live_phase, mut dead_phase) = (Vec::new(), Vec::new());
        let (mut live_px, mut dead_px, mut nl, mut nd) = (0usize, 0usize, 0usize, 0usize);
        for seed in 0..6 {
            let s = simulate(&QpiConfig { size: 192, ..QpiConfig::default() }, seed).unwrap();
            live_phase.extend(class_mean(&s, 1));
            dead_phase.extend(class_mean(&s, 2));
            live_px += s.mask.iter().filter(|&&m| m == 1).count();
            dead_px += s.mask.iter().filter(|&&m| m == 2).count();
            nl += s.n_live;
            nd += s.n_dead;
        }
        assert!(nl > 0 && nd > 0);
        let m = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(m(&dead_phase) > 1.5 * m(&live_phase), "dead {} vs live {}", m(&dead_phase), m(&live_phase));
        assert!((dead_px as f64 / nd as f64) < 0.6 * (live_px as f64 / nl as f64));
    }

    #[test]
    fn background_is_near_zero_phase_and_noise_matches() {
        let cfg = QpiConfig { debris_density: 0.0, background_rad: 0.0, ..small() };
        let s = simulate(&cfg, 5).unwrap();
        let bg: Vec<f64> = s
            .mask
            .iter()
            .zip(s.image.data.iter().zip(s.clean_phase.iter()))
            .filter(|(m, _)| **m == 0)
            .map(|(_, (p, c))| (*p - *c) as f64)
            .collect();
        let mean = bg.iter().sum::<f64>() / bg.len() as f64;
        let sd = (bg.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / bg.len() as f64).sqrt();
        assert!(mean.abs() < 0.01);
        assert!((sd - cfg.noise_rad).abs() < 0.1 * cfg.noise_rad, "noise sd {sd}");
    }

    #[test]
    fn bad_config_is_named() {
        let e = QpiConfig { coverage: [0.5, 0.2], ..QpiConfig::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("coverage"));
    }
}
