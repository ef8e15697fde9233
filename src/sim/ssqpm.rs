//! Simulator of single-shot quantitative phase microscopy (ssQPM) with a polarization
//! camera, for training cell-segmentation networks (the DM-QPMNet setting: HeLa cells,
//! four analyser intensities at 0/45/90/135 degrees, a retrieved phase map and a binary
//! cell mask).
//!
//! # Model
//!
//! **Cells.** Adherent HeLa-like cells are placed one by one until the covered area
//! reaches a target drawn from the confluence band (`coverage_low/medium/high`). Each
//! outline is an ellipse with random orientation `psi` (the long axis) and aspect ratio,
//! perturbed by radial Fourier modes `k = 2..6`:
//! `R(t) = R_ell(t) * (1 + sum_k a_k cos(k t) + b_k sin(k t))`, so a pixel at distance `d`
//! and polar angle `t` from the centre has normalised radius `rho = d / R(t)` (inside if
//! `rho < 1`). Where several cells cover a pixel it goes to the one with the smallest
//! `rho` (a multiplicatively weighted Voronoi split), so touching cells share a gap-free
//! boundary and never overlap; a candidate cell is rejected if it would keep less than
//! half of its own outline or leave a neighbour less than half of its own. Pieces of a
//! cell cut off by a neighbour go to the runner-up cell, so instances come out as
//! single 4-connected regions. The instance map and the binary mask come from this
//! label map.
//!
//! **Optical thickness.** Height (um) over the cell: a thin lamellipodium
//! `h_l * smoothstep((1 - rho) / w)` (1 um taper `w`) plus a dome
//! `H * (1 - (rho / rho_b)^2)^p` for `rho < rho_b`, plus a nuclear bump
//! `H_n * sqrt(1 - r_n^2)` over an elliptical nucleus; cells thin by `junction_depth`
//! towards a contact with a neighbour. The optical path difference is
//! `OPD = (n_cell + g(x) - n_medium) * h + dn_nucleus * t_n + sum dn_nucleolus * t_nl`
//! with `g` a smooth cytoplasmic granularity field, `t_n = 0.85 h sqrt(1 - r_n^2)` the
//! nuclear column and `t_nl` spherical nucleoli chords, and the phase is
//! `phi = 2 pi / lambda * OPD` (radians).
//!
//! **Polarization.** The illumination is circularly polarized, Stokes `(1, 0, 0, 1)`.
//! Each cell is a linear retarder with retardance
//! `delta = 2 pi / lambda * dn_biref * h * (1 - c + c * f)` (`f` fibre-like stripes
//! along the long axis, weaker over the nucleus) and fast axis
//! `theta = psi + sigma_theta * A(x)` (`A` a smooth random field). The linear-retarder
//! Mueller matrix maps `(1, 0, 0, 1)` to `(1, -sin 2theta sin delta, cos 2theta sin delta,
//! cos delta)`. The transmitted `S0` carries edge scattering, light leaving the
//! objective where the phase gradient is large, `T = exp(-k |grad phi|^2)`, and a
//! small-defocus phase-contrast term from the transport-of-intensity equation,
//! `I = T * (1 - dz * lambda / (2 pi) * laplacian(phi))`. An analyser at `alpha`
//! with extinction ratio `ER` (`e = (ER - 1) / (ER + 1)`) passes
//! `I_alpha = 0.5 * (S0 + e * (S1 cos 2alpha + S2 sin 2alpha))`, so
//! `I0 + I90 = I45 + I135 = S0`.
//!
//! **Imaging and camera.** Every intensity is blurred with a Gaussian PSF of
//! `sigma = 0.21 lambda / NA`, multiplied by a smooth illumination (vignetting about a
//! slightly off-centre point times a linear gradient, with a small per-analyser gain
//! and tilt), converted to photo-electrons (`exposure_fill * full_well_e` for the free
//! background), given Poisson shot noise (exact for means below 40 e-, Gaussian
//! approximation above) and Gaussian read noise, divided by the gain, offset by the
//! black level, rounded and clipped to the bit depth. The phase channel is the
//! PSF-blurred phase plus a zero-mean low-order background (tilt and curvature left by
//! phase retrieval) and white noise, in radians.
//!
//! Every random draw comes from `ChaCha8Rng::seed_from_u64(seed)` (separate streams for
//! geometry, texture, illumination and noise, so turning noise off keeps the same
//! cells), and the transcendental functions used are implemented here from `+ - * /`
//! and `sqrt` only, so a `(config, seed)` pair gives bit-identical output on every
//! platform.

use std::f64::consts::PI;
use std::path::Path;

use ndarray::{Array2, Array3};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{Image, Mask};

/// Channel order of the simulated image: four analyser intensities (camera ADU) and
/// the retrieved phase (radians).
pub const CHANNEL_NAMES: [&str; 5] = ["I0", "I45", "I90", "I135", "phase"];

/// Analyser angles of the four intensity channels, in degrees.
pub const ANALYSER_ANGLES_DEG: [f64; 4] = [0.0, 45.0, 90.0, 135.0];

/// How densely the field is covered with cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confluence {
    /// About 10-20 % of the field covered, mostly isolated cells.
    Low,
    /// About 30-45 % covered, small clusters.
    Medium,
    /// About 55-75 % covered, many touching cells.
    High,
    /// One of the three, drawn from the seed (cycled by `write_dataset`).
    Mixed,
}

impl Confluence {
    pub fn as_str(self) -> &'static str {
        match self {
            Confluence::Low => "low",
            Confluence::Medium => "medium",
            Confluence::High => "high",
            Confluence::Mixed => "mixed",
        }
    }
}

/// Physical and camera parameters of the simulation. Ranges `[lo, hi]` are sampled
/// uniformly per cell (or per image). Lengths are in micrometres.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SsqpmConfig {
    /// Image side in pixels (square images).
    pub size: usize,
    /// Pixel size in the sample plane, um (0.5 um -> a 128 um field at 256 px).
    pub pixel_size_um: f64,
    /// Illumination wavelength, um.
    pub wavelength_um: f64,
    /// Refractive index of the culture medium.
    pub n_medium: f64,
    /// Objective numerical aperture (sets the PSF width).
    pub numerical_aperture: f64,
    pub confluence: Confluence,
    /// Area fraction bands of the three confluence levels.
    pub coverage_low: [f64; 2],
    pub coverage_medium: [f64; 2],
    pub coverage_high: [f64; 2],

    /// Equivalent-circle diameter of a spread cell, um.
    pub cell_diameter_um: [f64; 2],
    /// Long/short axis ratio of the outline ellipse.
    pub cell_aspect: [f64; 2],
    /// Relative amplitude of the radial Fourier perturbation of the outline (mode k has
    /// standard deviation `outline_irregularity / (k - 1)`, k = 2..6).
    pub outline_irregularity: f64,
    /// Peak height of the cell body dome, um.
    pub cell_height_um: [f64; 2],
    /// Thickness of the flat lamellipodium at the cell margin, um.
    pub lamella_height_um: [f64; 2],
    /// Fraction of the cell radius taken by the lamellipodium.
    pub lamella_width: [f64; 2],
    /// Exponent `p` of the dome `(1 - (rho / rho_b)^2)^p`.
    pub dome_exponent: [f64; 2],
    /// Refractive index of the cytoplasm.
    pub n_cell: [f64; 2],
    /// Standard deviation of the cytoplasmic refractive-index granularity.
    pub granularity_dn: f64,
    /// Nucleus equivalent diameter as a fraction of the cell diameter.
    pub nucleus_diameter_frac: [f64; 2],
    /// Extra height of the cell over the nucleus, um.
    pub nucleus_height_um: [f64; 2],
    /// Refractive index of the nucleus minus that of the cytoplasm.
    pub nucleus_dn: [f64; 2],
    /// Number of nucleoli per nucleus.
    pub nucleoli_count: [usize; 2],
    /// Refractive index of a nucleolus minus that of the cytoplasm (mean; +-30 %).
    pub nucleolus_dn: f64,
    /// Fractional thinning of the cells at cell-cell contacts (0 = none, 1 = to zero).
    pub junction_depth: f64,

    /// Birefringence `dn_biref` of the cytoplasm (retardance `2 pi / lambda * dn_biref * h`).
    pub birefringence: [f64; 2],
    /// Standard deviation of the local fast-axis deviation from the cell's long axis, rad.
    pub fast_axis_variation_rad: f64,
    /// Spacing of the fibre-like retardance stripes, um.
    pub fibre_period_um: [f64; 2],
    /// Modulation depth of the retardance by the fibre stripes (0..1).
    pub fibre_contrast: f64,
    /// `k` in the edge-scattering transmission `exp(-k |grad phi|^2)`, um^2/rad^2.
    pub edge_scattering_um2: f64,
    /// Defocus `dz` of the intensity images (transport-of-intensity contrast), um.
    pub defocus_um: f64,
    /// Illumination fall-off at the field corners (fraction).
    pub vignetting: f64,
    /// Peak relative amplitude of the linear illumination gradient.
    pub illumination_gradient: f64,
    /// Relative spread of gain and tilt between the four analyser channels.
    pub analyser_gain_spread: f64,
    /// Extinction ratio of the micro-polarizers.
    pub extinction_ratio: f64,

    /// Pixel full-well capacity, electrons.
    pub full_well_e: f64,
    /// Fraction of the full well reached by the free background in one analyser channel.
    pub exposure_fill: f64,
    /// Apply Poisson shot noise.
    pub shot_noise: bool,
    /// Gaussian read noise, electrons RMS.
    pub read_noise_e: f64,
    /// Conversion gain, electrons per ADU.
    pub gain_e_per_adu: f64,
    /// Dark offset added to every pixel, ADU.
    pub black_level_adu: f64,
    /// ADC bit depth; values are clipped to `[0, 2^bit_depth - 1]`.
    pub bit_depth: u32,
    /// White noise of the retrieved phase, rad RMS.
    pub phase_noise_rad: f64,
    /// Amplitude of the low-order phase background (tilt and curvature), rad.
    pub phase_background_rad: f64,
}

impl Default for SsqpmConfig {
    fn default() -> Self {
        SsqpmConfig {
            size: 256,
            pixel_size_um: 0.5,
            wavelength_um: 0.532,
            n_medium: 1.337,
            numerical_aperture: 0.3,
            confluence: Confluence::Mixed,
            coverage_low: [0.10, 0.20],
            coverage_medium: [0.30, 0.45],
            coverage_high: [0.55, 0.75],
            cell_diameter_um: [18.0, 36.0],
            cell_aspect: [1.0, 1.8],
            outline_irregularity: 0.1,
            cell_height_um: [2.5, 5.0],
            lamella_height_um: [0.15, 0.4],
            lamella_width: [0.1, 0.25],
            dome_exponent: [0.7, 1.3],
            n_cell: [1.36, 1.39],
            granularity_dn: 0.002,
            nucleus_diameter_frac: [0.35, 0.5],
            nucleus_height_um: [0.3, 1.0],
            nucleus_dn: [-0.008, 0.004],
            nucleoli_count: [1, 4],
            nucleolus_dn: 0.02,
            junction_depth: 0.4,
            birefringence: [1e-3, 4e-3],
            fast_axis_variation_rad: 0.35,
            fibre_period_um: [1.5, 3.0],
            fibre_contrast: 0.5,
            edge_scattering_um2: 1.0,
            defocus_um: 1.0,
            vignetting: 0.15,
            illumination_gradient: 0.05,
            analyser_gain_spread: 0.02,
            extinction_ratio: 200.0,
            full_well_e: 10500.0,
            exposure_fill: 0.5,
            shot_noise: true,
            read_noise_e: 2.3,
            gain_e_per_adu: 2.6,
            black_level_adu: 32.0,
            bit_depth: 12,
            phase_noise_rad: 0.03,
            phase_background_rad: 0.1,
        }
    }
}

fn cfg_err(msg: String) -> Error {
    Error::Config(format!("ssqpm config: {msg}"))
}

fn check_scalar(name: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Result<()> {
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if ok {
        return Ok(());
    }
    let lo_s = if lo_open { format!("> {lo}") } else { format!(">= {lo}") };
    let hi_s = if hi.is_finite() { format!(" and <= {hi}") } else { String::new() };
    Err(cfg_err(format!("{name} must be a finite number {lo_s}{hi_s}, got {v}")))
}

fn check_range(name: &str, r: [f64; 2], lo: f64, hi: f64, lo_open: bool) -> Result<()> {
    check_scalar(&format!("{name}[0]"), r[0], lo, hi, lo_open)?;
    check_scalar(&format!("{name}[1]"), r[1], lo, hi, lo_open)?;
    if r[0] > r[1] {
        return Err(cfg_err(format!("{name} must be [min, max] with min <= max, got [{}, {}]", r[0], r[1])));
    }
    Ok(())
}

impl SsqpmConfig {
    /// Checks every field; the error names the first bad field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        const INF: f64 = f64::INFINITY;
        if !(16..=8192).contains(&self.size) {
            return Err(cfg_err(format!("size must be between 16 and 8192 pixels, got {}", self.size)));
        }
        check_scalar("pixel_size_um", self.pixel_size_um, 0.0, INF, true)?;
        check_scalar("wavelength_um", self.wavelength_um, 0.0, INF, true)?;
        check_scalar("n_medium", self.n_medium, 1.0, INF, false)?;
        check_scalar("numerical_aperture", self.numerical_aperture, 0.0, self.n_medium, true)?;
        check_range("coverage_low", self.coverage_low, 0.0, 0.95, true)?;
        check_range("coverage_medium", self.coverage_medium, 0.0, 0.95, true)?;
        check_range("coverage_high", self.coverage_high, 0.0, 0.95, true)?;
        check_range("cell_diameter_um", self.cell_diameter_um, 0.0, INF, true)?;
        check_range("cell_aspect", self.cell_aspect, 1.0, 10.0, false)?;
        check_scalar("outline_irregularity", self.outline_irregularity, 0.0, 0.5, false)?;
        check_range("cell_height_um", self.cell_height_um, 0.0, INF, true)?;
        check_range("lamella_height_um", self.lamella_height_um, 0.0, INF, false)?;
        check_range("lamella_width", self.lamella_width, 0.0, 0.8, false)?;
        check_range("dome_exponent", self.dome_exponent, 0.0, 10.0, true)?;
        check_range("n_cell", self.n_cell, 1.0, INF, false)?;
        check_scalar("granularity_dn", self.granularity_dn, 0.0, 0.1, false)?;
        check_range("nucleus_diameter_frac", self.nucleus_diameter_frac, 0.0, 0.9, false)?;
        check_range("nucleus_height_um", self.nucleus_height_um, 0.0, INF, false)?;
        check_range("nucleus_dn", self.nucleus_dn, -0.2, 0.2, false)?;
        if self.nucleoli_count[0] > self.nucleoli_count[1] || self.nucleoli_count[1] > 16 {
            return Err(cfg_err(format!(
                "nucleoli_count must be [min, max] with min <= max <= 16, got {:?}",
                self.nucleoli_count
            )));
        }
        check_scalar("nucleolus_dn", self.nucleolus_dn, -0.2, 0.2, false)?;
        check_scalar("junction_depth", self.junction_depth, 0.0, 1.0, false)?;
        check_range("birefringence", self.birefringence, 0.0, 0.1, false)?;
        check_scalar("fast_axis_variation_rad", self.fast_axis_variation_rad, 0.0, INF, false)?;
        check_range("fibre_period_um", self.fibre_period_um, 0.0, INF, true)?;
        check_scalar("fibre_contrast", self.fibre_contrast, 0.0, 1.0, false)?;
        check_scalar("edge_scattering_um2", self.edge_scattering_um2, 0.0, INF, false)?;
        check_scalar("defocus_um", self.defocus_um, -INF, INF, false)?;
        check_scalar("vignetting", self.vignetting, 0.0, 0.9, false)?;
        check_scalar("illumination_gradient", self.illumination_gradient, 0.0, 0.9, false)?;
        check_scalar("analyser_gain_spread", self.analyser_gain_spread, 0.0, 0.2, false)?;
        check_scalar("extinction_ratio", self.extinction_ratio, 1.0, INF, false)?;
        check_scalar("full_well_e", self.full_well_e, 0.0, INF, true)?;
        check_scalar("exposure_fill", self.exposure_fill, 0.0, 1.0, true)?;
        check_scalar("read_noise_e", self.read_noise_e, 0.0, INF, false)?;
        check_scalar("gain_e_per_adu", self.gain_e_per_adu, 0.0, INF, true)?;
        check_scalar("black_level_adu", self.black_level_adu, 0.0, INF, false)?;
        if !(1..=24).contains(&self.bit_depth) {
            return Err(cfg_err(format!("bit_depth must be between 1 and 24, got {}", self.bit_depth)));
        }
        check_scalar("phase_noise_rad", self.phase_noise_rad, 0.0, INF, false)?;
        check_scalar("phase_background_rad", self.phase_background_rad, 0.0, INF, false)?;
        Ok(())
    }

    /// The same configuration without shot, read or phase noise (geometry, texture
    /// and illumination stay identical for a given seed).
    pub fn without_noise(mut self) -> Self {
        self.shot_noise = false;
        self.read_noise_e = 0.0;
        self.phase_noise_rad = 0.0;
        self
    }

    /// Side of the field of view, um.
    pub fn field_of_view_um(&self) -> f64 {
        self.size as f64 * self.pixel_size_um
    }

    /// Standard deviation of the Gaussian PSF, `0.21 lambda / NA`, in pixels.
    pub fn psf_sigma_px(&self) -> f64 {
        0.21 * self.wavelength_um / self.numerical_aperture / self.pixel_size_um
    }

    /// Area-fraction band of a confluence level (`None` for `Mixed`).
    pub fn coverage_band(&self, c: Confluence) -> Option<[f64; 2]> {
        match c {
            Confluence::Low => Some(self.coverage_low),
            Confluence::Medium => Some(self.coverage_medium),
            Confluence::High => Some(self.coverage_high),
            Confluence::Mixed => None,
        }
    }
}

/// One simulated field of view.
#[derive(Clone, Debug)]
pub struct SsqpmSample {
    /// `(5, H, W)`: I0, I45, I90, I135 in camera ADU, then the phase in radians.
    pub image: Image,
    /// 0 background, 1 cell.
    pub mask: Mask,
    /// Instance labels `1..=n`, 0 background.
    pub instances: Array2<u16>,
    /// `dry_mass_pg[i]` is the dry mass of cell `i + 1`: its optical path difference
    /// integrated over its pixels, over α = 0.19 µm³/pg.
    pub dry_mass_pg: Vec<f64>,
    /// The confluence level actually simulated (never `Mixed`).
    pub confluence: Confluence,
}

impl SsqpmSample {
    /// Number of cell instances.
    pub fn n_cells(&self) -> usize {
        self.instances.iter().copied().max().unwrap_or(0) as usize
    }
    /// Fraction of pixels covered by cells.
    pub fn foreground_fraction(&self) -> f64 {
        let n = self.mask.len().max(1);
        self.mask.iter().filter(|&&m| m != 0).count() as f64 / n as f64
    }
}

// ---------------------------------------------------------------------------------
// Portable math: only + - * / and sqrt (correctly rounded by IEEE 754), so results do
// not depend on the platform's libm.

pub(crate) mod pmath {
    use std::f64::consts::{FRAC_PI_2, LOG2_E, SQRT_2};

    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const PIO2_HI: f64 = 1.570_796_326_734_125_6;
    const PIO2_LO: f64 = 6.077_100_506_506_192e-11;

    pub fn exp(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        if x > 709.0 {
            return f64::INFINITY;
        }
        if x < -700.0 {
            return 0.0;
        }
        let k = (x * LOG2_E).round();
        let r = (x - k * LN2_HI) - k * LN2_LO;
        // Taylor series of exp(r), |r| <= 0.35, to r^14.
        let mut p = 0.0;
        for n in (0..=14).rev() {
            p = p * r + INV_FACT[n];
        }
        let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
        p * scale
    }

    pub fn ln(x: f64) -> f64 {
        if x.is_nan() || x < 0.0 {
            return f64::NAN;
        }
        if x == 0.0 {
            return f64::NEG_INFINITY;
        }
        if x.is_infinite() {
            return x;
        }
        let (mut x, mut e) = (x, 0i64);
        if x < f64::MIN_POSITIVE {
            x *= 18_014_398_509_481_984.0; // 2^54
            e -= 54;
        }
        let bits = x.to_bits();
        e += ((bits >> 52) & 0x7ff) as i64 - 1023;
        let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
        if m > SQRT_2 {
            m *= 0.5;
            e += 1;
        }
        // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172.
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let mut p = 0.0;
        for n in (0..12).rev() {
            p = p * s2 + 1.0 / (2 * n + 1) as f64;
        }
        e as f64 * LN2_HI + (2.0 * s * p + e as f64 * LN2_LO)
    }

    /// `(sin x, cos x)`, accurate to about 1e-15 for |x| < 1e6.
    pub fn sin_cos(x: f64) -> (f64, f64) {
        let k = (x * (1.0 / FRAC_PI_2)).round();
        let r = (x - k * PIO2_HI) - k * PIO2_LO;
        let r2 = r * r;
        // Taylor series on |r| <= pi/4: sin to r^17, cos to r^18.
        let mut s = 0.0;
        let mut c = 0.0;
        for n in (0..9).rev() {
            let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
            s = s * r2 + sign * INV_FACT[2 * n + 1];
            c = c * r2 + sign * INV_FACT[2 * n];
        }
        let s = s * r;
        match (k as i64).rem_euclid(4) {
            0 => (s, c),
            1 => (c, -s),
            2 => (-s, -c),
            _ => (-c, s),
        }
    }

    /// `1 / n!` for `n = 0..20`.
    const INV_FACT: [f64; 20] = {
        let mut t = [1.0; 20];
        let mut f = 1.0;
        let mut n = 1;
        while n < 20 {
            f *= n as f64;
            t[n] = 1.0 / f;
            n += 1;
        }
        t
    };

    pub fn powf(x: f64, p: f64) -> f64 {
        if x <= 0.0 { 0.0 } else { exp(p * ln(x)) }
    }
}

use pmath::{exp as pexp, ln as pln, powf as ppow, sin_cos};

fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

// ---------------------------------------------------------------------------------
// Random numbers: ChaCha8 streams and portable uniform/normal/Poisson draws.

pub(crate) struct Rng {
    rng: ChaCha8Rng,
}

/// Ziggurat tables: layer `i` is the box `[0, x[i]] x [f[i], f[i + 1]]`, with
/// `f = exp(-x^2 / 2)`; layer 0 is the base strip of width `V / f(R)` plus the tail.
struct Ziggurat {
    x: [f64; 129],
    f: [f64; 129],
}

fn ziggurat() -> &'static Ziggurat {
    static TABLES: std::sync::OnceLock<Ziggurat> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        const R: f64 = 3.442_619_855_899;
        const V: f64 = 9.912_563_035_262_17e-3;
        let mut x = [0.0; 129];
        x[0] = V / pexp(-0.5 * R * R);
        x[1] = R;
        for i in 1..127 {
            let y = V / x[i] + pexp(-0.5 * x[i] * x[i]);
            x[i + 1] = (-2.0 * pln(y)).sqrt();
        }
        x[128] = 0.0;
        let mut f = [0.0; 129];
        for i in 0..129 {
            f[i] = pexp(-0.5 * x[i] * x[i]);
        }
        Ziggurat { x, f }
    })
}

const STREAM_GEOMETRY: u64 = 0;
const STREAM_TEXTURE: u64 = 1;
const STREAM_ILLUMINATION: u64 = 2;
const STREAM_CAMERA: u64 = 3;
const STREAM_PHASE: u64 = 4;

impl Rng {
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Rng { rng }
    }
    /// Uniform in `[0, 1)` with 53 random bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
    pub(crate) fn range(&mut self, r: [f64; 2]) -> f64 {
        r[0] + (r[1] - r[0]) * self.uniform()
    }
    pub(crate) fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Uniform integer in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.rng.next_u64() as u128 * n as u128) >> 64) as usize
    }
    /// Standard normal (128-layer ziggurat, tables built with the portable math).
    pub(crate) fn normal(&mut self) -> f64 {
        let z = ziggurat();
        loop {
            let bits = self.rng.next_u64();
            let i = (bits & 0x7f) as usize;
            let sign = if bits & 0x80 == 0 { 1.0 } else { -1.0 };
            let u = (bits >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
            let x = u * z.x[i];
            if x < z.x[i + 1] {
                return sign * x;
            }
            if i == 0 {
                // Tail beyond R (Marsaglia 1964).
                loop {
                    let a = -pln(1.0 - self.uniform()) / z.x[1];
                    let b = -pln(1.0 - self.uniform());
                    if 2.0 * b > a * a {
                        return sign * (z.x[1] + a);
                    }
                }
            }
            let y = z.f[i] + self.uniform() * (z.f[i + 1] - z.f[i]);
            if y < pexp(-0.5 * x * x) {
                return sign * x;
            }
        }
    }
    /// Poisson count with mean `lam` (exact product method; call for small means).
    pub(crate) fn poisson_small(&mut self, lam: f64) -> f64 {
        let limit = pexp(-lam);
        let mut k = 0.0;
        let mut p = self.uniform();
        while p > limit {
            k += 1.0;
            p *= self.uniform();
        }
        k
    }
}

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------------
// Image-plane helpers.

/// Folds an index into `0..n` by half-sample symmetric reflection.
fn fold(i: isize, n: usize) -> usize {
    let n = n as isize;
    let m = i.rem_euclid(2 * n);
    (if m < n { m } else { 2 * n - 1 - m }) as usize
}

/// Separable Gaussian blur of an `h x w` row-major image with symmetric borders.
pub(crate) fn gaussian_blur(src: &[f64], h: usize, w: usize, sigma: f64) -> Vec<f64> {
    if sigma < 0.05 {
        return src.to_vec();
    }
    let r = (3.5 * sigma).ceil().max(1.0) as isize;
    let mut k: Vec<f64> = (-r..=r).map(|i| pexp(-((i * i) as f64) / (2.0 * sigma * sigma))).collect();
    let sum: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    // Horizontal pass.
    let mut tmp = vec![0.0; h * w];
    let mut padded = vec![0.0; w + 2 * r as usize];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (j, p) in padded.iter_mut().enumerate() {
            *p = row[fold(j as isize - r, w)];
        }
        let out = &mut tmp[y * w..(y + 1) * w];
        for (t, &kv) in k.iter().enumerate() {
            for (o, &v) in out.iter_mut().zip(&padded[t..t + w]) {
                *o += kv * v;
            }
        }
    }
    // Vertical pass, row by row.
    let mut dst = vec![0.0; h * w];
    for y in 0..h {
        let out = &mut dst[y * w..(y + 1) * w];
        for (t, &kv) in k.iter().enumerate() {
            let sy = fold(y as isize + t as isize - r, h);
            let row = &tmp[sy * w..(sy + 1) * w];
            for (o, &v) in out.iter_mut().zip(row) {
                *o += kv * v;
            }
        }
    }
    dst
}

/// Smooth zero-mean, unit-variance random field with correlation length `sigma` px
/// (blurred uniform white noise, Gaussian by the central limit theorem). Wide fields
/// are made on a coarser grid and interpolated bilinearly.
pub(crate) fn smooth_field(rng: &mut Rng, h: usize, w: usize, sigma: f64) -> Vec<f64> {
    let step = (sigma / 2.0).floor().max(1.0) as usize;
    let (hc, wc) = (h.div_ceil(step) + 1, w.div_ceil(step) + 1);
    let white: Vec<f64> = (0..hc * wc).map(|_| rng.uniform() - 0.5).collect();
    let coarse = gaussian_blur(&white, hc, wc, sigma / step as f64);
    let mut f = vec![0.0; h * w];
    if step == 1 {
        for y in 0..h {
            f[y * w..(y + 1) * w].copy_from_slice(&coarse[y * wc..y * wc + w]);
        }
    } else {
        let inv = 1.0 / step as f64;
        for y in 0..h {
            let (yi, fy) = (y / step, (y % step) as f64 * inv);
            for x in 0..w {
                let (xi, fx) = (x / step, (x % step) as f64 * inv);
                let at = |yy: usize, xx: usize| coarse[yy * wc + xx];
                let top = at(yi, xi) * (1.0 - fx) + at(yi, xi + 1) * fx;
                let bot = at(yi + 1, xi) * (1.0 - fx) + at(yi + 1, xi + 1) * fx;
                f[y * w + x] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
    let n = f.len() as f64;
    let mean = f.iter().sum::<f64>() / n;
    let var = f.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let inv = if var > 0.0 { 1.0 / var.sqrt() } else { 0.0 };
    f.iter_mut().for_each(|v| *v = (*v - mean) * inv);
    f
}

// ---------------------------------------------------------------------------------
// Cells.

const N_MODES: usize = 5; // outline harmonics k = 2..=6
const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Nucleolus {
    u: f64,
    v: f64,
    r: f64,
    dn: f64,
}

/// One cell; positions and radii in pixels, heights in um.
#[derive(Clone, Debug)]
struct Cell {
    cx: f64,
    cy: f64,
    psi: f64,
    cos_psi: f64,
    sin_psi: f64,
    a: f64,
    b: f64,
    modes: [[f64; 2]; N_MODES],
    r_eq: f64,
    r_bound: f64,
    height: f64,
    lamella: f64,
    rho_body: f64,
    dome_p: f64,
    edge_w: f64,
    n_cell: f64,
    gran: f64,
    nuc_u: f64,
    nuc_v: f64,
    nuc_a: f64,
    nuc_b: f64,
    nuc_cos: f64,
    nuc_sin: f64,
    nuc_height: f64,
    nuc_dn: f64,
    nucleoli: Vec<Nucleolus>,
    biref: f64,
    fibre_k: f64,
    fibre_phase: f64,
}

impl Cell {
    fn random(cfg: &SsqpmConfig, rng: &mut Rng, cx: f64, cy: f64, r_eq_um: f64) -> Cell {
        let px = cfg.pixel_size_um;
        let r_eq = r_eq_um / px;
        let sq = rng.range(cfg.cell_aspect).sqrt();
        let (a, b) = (r_eq * sq, r_eq / sq);
        let psi = rng.uniform() * PI;
        let (sin_psi, cos_psi) = sin_cos(psi);
        let mut modes = [[0.0; 2]; N_MODES];
        let mut total = 0.0;
        for (i, m) in modes.iter_mut().enumerate() {
            let sd = cfg.outline_irregularity / (i + 1) as f64;
            m[0] = sd * rng.normal();
            m[1] = sd * rng.normal();
            total += m[0].abs() + m[1].abs();
        }
        if total > 0.5 {
            let s = 0.5 / total;
            modes.iter_mut().for_each(|m| {
                m[0] *= s;
                m[1] *= s;
            });
            total = 0.5;
        }
        let r_bound = a * (1.0 + total) + 2.0;

        let height = rng.range(cfg.cell_height_um);
        let lamella = rng.range(cfg.lamella_height_um);
        let rho_body = 1.0 - rng.range(cfg.lamella_width);
        let dome_p = rng.range(cfg.dome_exponent);
        let edge_w = (1.0 / r_eq_um).clamp(0.02, 0.3);
        let n_cell = rng.range(cfg.n_cell);
        let gran = cfg.granularity_dn * rng.between(0.5, 1.5);

        // Nucleus: an ellipse inside the cell body, roughly along the long axis.
        let rn = rng.range(cfg.nucleus_diameter_frac) * r_eq;
        let sqn = rng.between(1.0, 1.4).sqrt();
        let (mut nuc_a, mut nuc_b) = (rn * sqn, rn / sqn);
        let fit = 1.0_f64.min(0.6 * a * rho_body / nuc_a.max(1e-9)).min(0.65 * b * rho_body / nuc_b.max(1e-9));
        nuc_a *= fit;
        nuc_b *= fit;
        let nuc_u = rng.between(-1.0, 1.0) * 0.35 * (a * rho_body - nuc_a).max(0.0);
        let nuc_v = rng.between(-1.0, 1.0) * 0.35 * (b * rho_body - nuc_b).max(0.0);
        let (nuc_sin, nuc_cos) = sin_cos(0.3 * rng.normal());
        let nuc_height = rng.range(cfg.nucleus_height_um);
        let nuc_dn = rng.range(cfg.nucleus_dn);
        let [lo, hi] = cfg.nucleoli_count;
        let count = lo + rng.below(hi - lo + 1);
        let nucleoli = (0..count)
            .map(|_| {
                let (s, c) = sin_cos(rng.uniform() * 2.0 * PI);
                let rr = 0.55 * rng.uniform().sqrt();
                let (x, y) = (nuc_a * rr * c, nuc_b * rr * s);
                Nucleolus {
                    u: nuc_u + x * nuc_cos - y * nuc_sin,
                    v: nuc_v + x * nuc_sin + y * nuc_cos,
                    r: rng.between(0.5, 1.2) / px,
                    dn: cfg.nucleolus_dn * rng.between(0.7, 1.3),
                }
            })
            .collect();
        let biref = rng.range(cfg.birefringence);
        let fibre_k = 2.0 * PI * px / rng.range(cfg.fibre_period_um);
        let fibre_phase = rng.uniform() * 2.0 * PI;
        Cell {
            cx,
            cy,
            psi,
            cos_psi,
            sin_psi,
            a,
            b,
            modes,
            r_eq,
            r_bound,
            height,
            lamella,
            rho_body,
            dome_p,
            edge_w,
            n_cell,
            gran,
            nuc_u,
            nuc_v,
            nuc_a,
            nuc_b,
            nuc_cos,
            nuc_sin,
            nuc_height,
            nuc_dn,
            nucleoli,
            biref,
            fibre_k,
            fibre_phase,
        }
    }

    /// Normalised radius `rho = d / R(t)` (inside if < 1) and cell-frame coordinates
    /// `(u, v)` (u along the long axis) of pixel `(x, y)`.
    fn frame(&self, x: f64, y: f64) -> (f64, f64, f64) {
        let dx = x - self.cx;
        let dy = y - self.cy;
        let u = dx * self.cos_psi + dy * self.sin_psi;
        let v = -dx * self.sin_psi + dy * self.cos_psi;
        let d2 = u * u + v * v;
        if d2 == 0.0 {
            return (0.0, u, v);
        }
        let d = d2.sqrt();
        let (c1, s1) = (u / d, v / d);
        let (bc, as_) = (self.b * c1, self.a * s1);
        let r_ell = self.a * self.b / (bc * bc + as_ * as_).sqrt();
        let (mut ck, mut sk) = (c1, s1);
        let mut pert = 1.0;
        for m in &self.modes {
            let (c, s) = (ck * c1 - sk * s1, sk * c1 + ck * s1);
            ck = c;
            sk = s;
            pert += m[0] * ck + m[1] * sk;
        }
        (d / (r_ell * pert), u, v)
    }

    /// In-field pixel box that contains the whole outline.
    fn bbox(&self, w: usize, h: usize) -> Option<(usize, usize, usize, usize)> {
        let x0 = (self.cx - self.r_bound).floor().max(0.0);
        let y0 = (self.cy - self.r_bound).floor().max(0.0);
        let x1 = (self.cx + self.r_bound).ceil().min(w as f64 - 1.0);
        let y1 = (self.cy + self.r_bound).ceil().min(h as f64 - 1.0);
        if x1 < x0 || y1 < y0 {
            return None;
        }
        Some((x0 as usize, y0 as usize, x1 as usize, y1 as usize))
    }
}

/// Per-pixel ownership: the cell with the smallest `rho`, and the runner-up.
struct Labels {
    best_rho: Vec<f64>,
    best: Vec<u32>,
    second_rho: Vec<f64>,
    second: Vec<u32>,
}

/// Minimum fraction of its own outline a cell keeps, and of a neighbour's it leaves.
const MIN_OWN_FRACTION: f64 = 0.5;
const MAX_PROPOSALS: usize = 4000;
const MAX_RASTERIZED: usize = 800;

fn place_cells(cfg: &SsqpmConfig, conf: Confluence, rng: &mut Rng) -> (Vec<Cell>, Labels) {
    let (w, h) = (cfg.size, cfg.size);
    let npx = w * h;
    let band = cfg.coverage_band(conf).unwrap_or(cfg.coverage_medium);
    // Minimum centre spacing in units of (r_i + r_j), and the chance to seed a new cell
    // next to an existing one (HeLa grows in clusters).
    let (sep, p_cluster) = match conf {
        Confluence::Low => (1.05, 0.3),
        Confluence::Medium => (0.9, 0.5),
        _ => (0.72, 0.2),
    };
    let target = band[0] + 0.7 * (band[1] - band[0]) * rng.uniform();
    let mut lab = Labels {
        best_rho: vec![f64::INFINITY; npx],
        best: vec![NONE; npx],
        second_rho: vec![f64::INFINITY; npx],
        second: vec![NONE; npx],
    };
    let mut cells: Vec<Cell> = Vec::new();
    let mut shape_count: Vec<usize> = Vec::new();
    let mut own_count: Vec<usize> = Vec::new();
    let mut covered = 0usize;
    let mut buf: Vec<(usize, f64)> = Vec::new();
    let mut stolen: Vec<usize> = Vec::new();
    let mut rasterized = 0usize;
    let fov_w = w as f64;
    let fov_h = h as f64;

    for _ in 0..MAX_PROPOSALS {
        if covered as f64 >= target * npx as f64 || rasterized >= MAX_RASTERIZED || cells.len() >= 60_000 {
            break;
        }
        let r_eq_um = 0.5 * rng.range(cfg.cell_diameter_um);
        let r_eq = r_eq_um / cfg.pixel_size_um;
        let (mut cx, mut cy) = (rng.uniform() * fov_w, rng.uniform() * fov_h);
        if !cells.is_empty() && rng.uniform() < p_cluster {
            let j = rng.below(cells.len());
            let (s, c) = sin_cos(rng.uniform() * 2.0 * PI);
            let d = sep * (r_eq + cells[j].r_eq) * rng.between(1.0, 1.2);
            let (x, y) = (cells[j].cx + d * c, cells[j].cy + d * s);
            if x >= 0.0 && x < fov_w && y >= 0.0 && y < fov_h {
                cx = x;
                cy = y;
            }
        }
        let crowded = cells.iter().any(|c| {
            let (dx, dy) = (c.cx - cx, c.cy - cy);
            let m = sep * (c.r_eq + r_eq);
            dx * dx + dy * dy < m * m
        });
        if crowded {
            continue;
        }
        let cell = Cell::random(cfg, rng, cx, cy, r_eq_um);
        let Some((x0, y0, x1, y1)) = cell.bbox(w, h) else {
            continue;
        };
        rasterized += 1;
        buf.clear();
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (rho, _, _) = cell.frame(x as f64, y as f64);
                if rho < 1.0 {
                    buf.push((y * w + x, rho));
                }
            }
        }
        let shape = buf.len();
        if shape < 20 {
            continue;
        }
        stolen.clear();
        stolen.resize(cells.len(), 0);
        let (mut own, mut fresh) = (0usize, 0usize);
        for &(p, rho) in &buf {
            if rho < lab.best_rho[p] {
                own += 1;
                match lab.best[p] {
                    NONE => fresh += 1,
                    j => stolen[j as usize] += 1,
                }
            }
        }
        if (own as f64) < MIN_OWN_FRACTION * shape as f64 {
            continue;
        }
        if (covered + fresh) as f64 > band[1] * npx as f64 {
            continue;
        }
        let hurts = stolen
            .iter()
            .enumerate()
            .any(|(j, &s)| s > 0 && ((own_count[j] - s) as f64) < MIN_OWN_FRACTION * shape_count[j] as f64);
        if hurts {
            continue;
        }
        // Accept.
        let id = cells.len() as u32;
        for &(p, rho) in &buf {
            if rho < lab.best_rho[p] {
                lab.second_rho[p] = lab.best_rho[p];
                lab.second[p] = lab.best[p];
                lab.best_rho[p] = rho;
                lab.best[p] = id;
            } else if rho < lab.second_rho[p] {
                lab.second_rho[p] = rho;
                lab.second[p] = id;
            }
        }
        for (j, &s) in stolen.iter().enumerate() {
            own_count[j] -= s;
        }
        covered += fresh;
        shape_count.push(shape);
        own_count.push(own);
        cells.push(cell);
    }
    remove_fragments(&mut lab, w, h);
    (cells, lab)
}

/// Keeps the largest 4-connected piece of every cell; other pieces go to the runner-up
/// cell at each pixel, or to the background.
fn remove_fragments(lab: &mut Labels, w: usize, h: usize) {
    let npx = w * h;
    let mut comp = vec![u32::MAX; npx];
    let mut pieces: Vec<(u32, Vec<usize>)> = Vec::new();
    let mut queue = Vec::new();
    for start in 0..npx {
        let l = lab.best[start];
        if l == NONE || comp[start] != u32::MAX {
            continue;
        }
        let id = pieces.len() as u32;
        comp[start] = id;
        queue.clear();
        queue.push(start);
        let mut i = 0;
        while i < queue.len() {
            let p = queue[i];
            i += 1;
            let (y, x) = (p / w, p % w);
            let mut visit = |q: usize| {
                if lab.best[q] == l && comp[q] == u32::MAX {
                    comp[q] = id;
                    queue.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < w {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - w);
            }
            if y + 1 < h {
                visit(p + w);
            }
        }
        pieces.push((l, queue.clone()));
    }
    // Largest piece per label (first in scan order on ties).
    let mut largest: Vec<(u32, usize, usize)> = Vec::new(); // (label, piece, size)
    for (k, (l, px)) in pieces.iter().enumerate() {
        match largest.iter_mut().find(|e| e.0 == *l) {
            Some(e) => {
                if px.len() > e.2 {
                    e.1 = k;
                    e.2 = px.len();
                }
            }
            None => largest.push((*l, k, px.len())),
        }
    }
    for (k, (l, px)) in pieces.iter().enumerate() {
        if largest.iter().any(|e| e.0 == *l && e.1 == k) {
            continue;
        }
        for &p in px {
            let s = lab.second[p];
            if s != NONE && lab.second_rho[p] < 1.0 {
                lab.best[p] = s;
                lab.best_rho[p] = lab.second_rho[p];
            } else {
                lab.best[p] = NONE;
                lab.best_rho[p] = f64::INFINITY;
            }
            lab.second[p] = NONE;
            lab.second_rho[p] = f64::INFINITY;
        }
    }
}

// ---------------------------------------------------------------------------------
// Simulation.

/// The sample's optical fields: the phase delay `phi` (rad) and the normalised Stokes
/// parameters S1/S0 and S2/S0 of the light behind the sample, per pixel.
struct SampleFields {
    phi: Vec<f64>,
    s1n: Vec<f64>,
    s2n: Vec<f64>,
}

/// Pass 1: each labelled pixel's height (lamellipodium, dome, nucleus, thinned towards
/// a neighbour), its optical path and its linear retardance.
fn sample_fields(cfg: &SsqpmConfig, cells: &[Cell], lab: &Labels, seed: u64) -> SampleFields {
    let (w, h) = (cfg.size, cfg.size);
    let npx = w * h;
    let px_um = cfg.pixel_size_um;
    let k0 = 2.0 * PI / cfg.wavelength_um;
    // Textures: cytoplasmic granularity (~0.6 um), fast-axis wander (~4 um) and fibre
    // waviness (~2 um), each a unit-variance smooth field.
    let mut tex = Rng::new(seed, STREAM_TEXTURE);
    let gran_field = smooth_field(&mut tex, h, w, 0.6 / px_um);
    let axis_field = smooth_field(&mut tex, h, w, 4.0 / px_um);
    let warp_field = smooth_field(&mut tex, h, w, 2.0 / px_um);

    let mut phi = vec![0.0; npx];
    let mut s1n = vec![0.0; npx];
    let mut s2n = vec![0.0; npx];
    for p in 0..npx {
        let id = lab.best[p];
        if id == NONE {
            continue;
        }
        let c = &cells[id as usize];
        let (x, y) = ((p % w) as f64, (p / w) as f64);
        let (rho, u, v) = c.frame(x, y);
        // Height: lamellipodium + dome + nuclear bump.
        let mut hgt = c.lamella * smoothstep((1.0 - rho) / c.edge_w);
        let t = rho / c.rho_body;
        if t < 1.0 {
            hgt += c.height * ppow(1.0 - t * t, c.dome_p);
        }
        let (du, dv) = (u - c.nuc_u, v - c.nuc_v);
        let nu = (du * c.nuc_cos + dv * c.nuc_sin) / c.nuc_a;
        let nv = (-du * c.nuc_sin + dv * c.nuc_cos) / c.nuc_b;
        let rn2 = nu * nu + nv * nv;
        let s_nuc = if rn2 < 1.0 { (1.0 - rn2).sqrt() } else { 0.0 };
        hgt += c.nuc_height * s_nuc;
        // Thinning towards a contact with a neighbour.
        let margin = lab.second_rho[p] - lab.best_rho[p];
        if margin.is_finite() {
            hgt *= 1.0 - cfg.junction_depth * (1.0 - smoothstep(margin / 0.12));
        }
        let t_nuc = 0.85 * s_nuc * hgt;
        let mut opd = (c.n_cell + c.gran * gran_field[p] - cfg.n_medium) * hgt + c.nuc_dn * t_nuc;
        for nl in &c.nucleoli {
            let d2 = ((u - nl.u) * (u - nl.u) + (v - nl.v) * (v - nl.v)) / (nl.r * nl.r);
            if d2 < 1.0 {
                let chord = 2.0 * nl.r * px_um * (1.0 - d2).sqrt();
                opd += nl.dn * chord.min(t_nuc);
            }
        }
        phi[p] = k0 * opd;
        // Linear retarder: retardance and fast axis.
        let (fs, _) = sin_cos(c.fibre_k * v + c.fibre_phase + 2.0 * warp_field[p]);
        let fibre = 1.0 - cfg.fibre_contrast + cfg.fibre_contrast * (0.5 + 0.5 * fs);
        let delta = k0 * c.biref * hgt * fibre * (1.0 - 0.5 * s_nuc);
        let theta = c.psi + cfg.fast_axis_variation_rad * axis_field[p];
        let (sin2t, cos2t) = sin_cos(2.0 * theta);
        let (sin_d, _) = sin_cos(delta);
        s1n[p] = -sin2t * sin_d;
        s2n[p] = cos2t * sin_d;
    }

    SampleFields { phi, s1n, s2n }
}

/// Pass 2: transmitted S0 with edge scattering and the defocus (TIE) term, then the four
/// analyser intensities (0, 45, 90, 135 degrees) before blur.
fn analyser_intensities(cfg: &SsqpmConfig, f: &SampleFields) -> Vec<Vec<f64>> {
    let (w, h) = (cfg.size, cfg.size);
    let npx = w * h;
    let px_um = cfg.pixel_size_um;
    let lambda = cfg.wavelength_um;
    let SampleFields { phi, s1n, s2n } = f;
    let ext = (cfg.extinction_ratio - 1.0) / (cfg.extinction_ratio + 1.0);
    let tie = cfg.defocus_um * lambda / (2.0 * PI);
    let mut chans: Vec<Vec<f64>> = vec![vec![0.0; npx]; 4];
    for y in 0..h {
        let (ym, yp) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (xm, xp) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let p = y * w + x;
            let c0 = phi[p];
            let (l, r, u, d) = (phi[y * w + xm], phi[y * w + xp], phi[ym * w + x], phi[yp * w + x]);
            let gx = (r - l) / (2.0 * px_um);
            let gy = (d - u) / (2.0 * px_um);
            let lap = (l + r + u + d - 4.0 * c0) / (px_um * px_um);
            let g2 = gx * gx + gy * gy;
            let trans = if g2 == 0.0 { 1.0 } else { pexp(-cfg.edge_scattering_um2 * g2) };
            let s0 = trans * (1.0 - tie * lap).clamp(0.05, 3.0);
            let (a, b) = (ext * s1n[p], ext * s2n[p]);
            chans[0][p] = 0.5 * s0 * (1.0 + a);
            chans[1][p] = 0.5 * s0 * (1.0 + b);
            chans[2][p] = 0.5 * s0 * (1.0 - a);
            chans[3][p] = 0.5 * s0 * (1.0 - b);
        }
    }

    chans
}

/// The illumination: vignetting about a slightly off-centre point times a gradient
/// (`base`), a per-analyser gain and tilt, and the phase background's coefficients.
struct Illumination {
    base: Vec<f64>,
    /// Pixel coordinates normalised to [-1, 1].
    xs: Vec<f64>,
    ys: Vec<f64>,
    /// Per analyser: gain, x tilt, y tilt.
    chan_gain: Vec<[f64; 3]>,
    /// Phase background: x, y, radial and cross terms.
    bg_coef: [f64; 4],
}

fn illumination(cfg: &SsqpmConfig, seed: u64) -> Illumination {
    let (w, h) = (cfg.size, cfg.size);
    let npx = w * h;
    let mut ill = Rng::new(seed, STREAM_ILLUMINATION);
    let (xc, yc) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let vx = xc * (1.0 + ill.between(-0.2, 0.2));
    let vy = yc * (1.0 + ill.between(-0.2, 0.2));
    let (gs, gc) = sin_cos(ill.uniform() * 2.0 * PI);
    let gamp = cfg.illumination_gradient * ill.between(0.5, 1.0);
    let chan_gain: Vec<[f64; 3]> = (0..4)
        .map(|_| {
            let s = cfg.analyser_gain_spread;
            [1.0 + s * ill.normal(), s * ill.normal(), s * ill.normal()]
        })
        .collect();
    let bg_coef =
        [ill.between(-1.0, 1.0), ill.between(-1.0, 1.0), 0.5 * ill.between(-1.0, 1.0), 0.5 * ill.between(-1.0, 1.0)];
    let r2max = xc * xc + yc * yc;
    let mut base = vec![0.0; npx];
    let mut xs = vec![0.0; npx];
    let mut ys = vec![0.0; npx];
    for y in 0..h {
        for x in 0..w {
            let p = y * w + x;
            let (fx, fy) = (x as f64 - xc, y as f64 - yc);
            let (nx, ny) = (fx / xc.max(0.5), fy / yc.max(0.5));
            let (ox, oy) = (x as f64 - vx, y as f64 - vy);
            let vig = (1.0 - cfg.vignetting * (ox * ox + oy * oy) / r2max).max(0.05);
            base[p] = vig * (1.0 + gamp * (nx * gc + ny * gs));
            xs[p] = nx;
            ys[p] = ny;
        }
    }

    Illumination { base, xs, ys, chan_gain, bg_coef }
}

/// Optics blur, illumination and camera (shot and read noise, gain, black level,
/// quantization): the four intensity channels in ADU, appended to `data`.
fn camera(cfg: &SsqpmConfig, chans: &[Vec<f64>], ill: &Illumination, seed: u64, data: &mut Vec<f32>) {
    let (w, h) = (cfg.size, cfg.size);
    let npx = w * h;
    let Illumination { base, xs, ys, chan_gain, .. } = ill;
    let sigma = cfg.psf_sigma_px();
    let e_per_unit = cfg.exposure_fill * cfg.full_well_e / 0.5;
    let max_adu = ((1u64 << cfg.bit_depth) - 1) as f64;
    let mut cam = Rng::new(seed, STREAM_CAMERA);
    for (ci, ch) in chans.iter().enumerate() {
        let blurred = gaussian_blur(ch, h, w, sigma);
        let [g, tx, ty] = chan_gain[ci];
        for p in 0..npx {
            let illum = (base[p] * g * (1.0 + tx * xs[p] + ty * ys[p])).max(0.0);
            let mean_e = (blurred[p] * illum * e_per_unit).max(0.0);
            let electrons = if cfg.shot_noise {
                if mean_e < 40.0 {
                    cam.poisson_small(mean_e) + cfg.read_noise_e * cam.normal()
                } else {
                    mean_e + (mean_e + cfg.read_noise_e * cfg.read_noise_e).sqrt() * cam.normal()
                }
            } else if cfg.read_noise_e > 0.0 {
                mean_e + cfg.read_noise_e * cam.normal()
            } else {
                mean_e
            };
            let adu = (electrons / cfg.gain_e_per_adu + cfg.black_level_adu).round().clamp(0.0, max_adu);
            data.push(adu as f32);
        }
    }
}

/// The retrieved phase: band-limited phase, zero-mean low-order background and white
/// noise, appended to `data`.
fn retrieved_phase(cfg: &SsqpmConfig, phi: &[f64], ill: &Illumination, seed: u64, data: &mut Vec<f32>) {
    let (w, h) = (cfg.size, cfg.size);
    let npx = w * h;
    let sigma = cfg.psf_sigma_px();
    let Illumination { xs, ys, bg_coef, .. } = ill;
    let phi_b = gaussian_blur(phi, h, w, sigma);
    let bg: Vec<f64> = (0..npx)
        .map(|p| {
            let (x, y) = (xs[p], ys[p]);
            bg_coef[0] * x + bg_coef[1] * y + bg_coef[2] * (x * x + y * y) + bg_coef[3] * x * y
        })
        .collect();
    let bg_mean = bg.iter().sum::<f64>() / npx as f64;
    let mut ph = Rng::new(seed, STREAM_PHASE);
    for p in 0..npx {
        let noise = if cfg.phase_noise_rad > 0.0 { cfg.phase_noise_rad * ph.normal() } else { 0.0 };
        let v = phi_b[p] + cfg.phase_background_rad * (bg[p] - bg_mean) + noise;
        data.push(v as f32);
    }
}

/// Instance labels: consecutive ids in placement order, 0 for the background.
fn instance_labels(cfg: &SsqpmConfig, n_cells: usize, lab: &Labels) -> Result<Array2<u16>> {
    let (w, h) = (cfg.size, cfg.size);
    let mut remap = vec![0u16; n_cells];
    let mut used = vec![false; n_cells];
    for &l in &lab.best {
        if l != NONE {
            used[l as usize] = true;
        }
    }
    let mut next = 0u16;
    for (i, u) in used.iter().enumerate() {
        if *u {
            next += 1;
            remap[i] = next;
        }
    }
    let inst: Vec<u16> = lab.best.iter().map(|&l| if l == NONE { 0 } else { remap[l as usize] }).collect();
    Array2::from_shape_vec((h, w), inst).map_err(|e| Error::Shape(e.to_string()))
}

/// Simulates one ssQPM field of view. Deterministic for `(cfg, seed)`.
pub fn simulate(cfg: &SsqpmConfig, seed: u64) -> Result<SsqpmSample> {
    cfg.validate()?;
    let (w, h) = (cfg.size, cfg.size);
    let mut geo = Rng::new(seed, STREAM_GEOMETRY);
    let conf = match cfg.confluence {
        Confluence::Mixed => [Confluence::Low, Confluence::Medium, Confluence::High][geo.below(3)],
        c => c,
    };
    let (cells, lab) = place_cells(cfg, conf, &mut geo);
    let fields = sample_fields(cfg, &cells, &lab, seed);
    let chans = analyser_intensities(cfg, &fields);
    let ill = illumination(cfg, seed);
    let mut data: Vec<f32> = Vec::with_capacity(5 * w * h);
    camera(cfg, &chans, &ill, seed, &mut data);
    retrieved_phase(cfg, &fields.phi, &ill, seed, &mut data);
    let instances = instance_labels(cfg, cells.len(), &lab)?;
    let mask: Mask = instances.mapv(|v| u8::from(v != 0));
    let mut dry_mass_pg = vec![0.0; cells.len()];
    let per_rad = cfg.wavelength_um / (2.0 * PI * crate::engine::measure::DEFAULT_ALPHA_UM3_PER_PG)
        * cfg.pixel_size_um
        * cfg.pixel_size_um;
    for (&l, &phi) in instances.iter().zip(&fields.phi) {
        if l != 0 {
            dry_mass_pg[l as usize - 1] += phi * per_rad;
        }
    }
    let data = Array3::from_shape_vec((5, h, w), data).map_err(|e| Error::Shape(e.to_string()))?;
    let image = Image::with_names(data, CHANNEL_NAMES.iter().map(|s| s.to_string()).collect())?;
    Ok(SsqpmSample { image, mask, instances, dry_mass_pg, confluence: conf })
}

// ---------------------------------------------------------------------------------
// Dataset writer.

/// Names of the written samples per split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub train: Vec<String>,
    pub test: Vec<String>,
}

#[derive(Serialize)]
struct SampleRecord {
    name: String,
    seed: u64,
    confluence: Confluence,
    n_cells: usize,
    foreground_fraction: f64,
}

#[derive(Serialize)]
struct SimulationRecord<'a> {
    generator: &'static str,
    format_version: u32,
    seed: u64,
    config: &'a SsqpmConfig,
    channel_names: [&'static str; 5],
    train: Vec<String>,
    test: Vec<String>,
    samples: SplitRecords,
}

#[derive(Serialize)]
struct SplitRecords {
    train: Vec<SampleRecord>,
    test: Vec<SampleRecord>,
}

const SPLIT_TRAIN: u64 = 0x0074_7261_696e; // "train"
const SPLIT_TEST: u64 = 0x7465_7374; // "test"

/// Seed of image `index` of a split, derived from the dataset seed only (so an image
/// does not depend on how many images are written).
pub fn sample_seed(seed: u64, test_split: bool, index: usize) -> u64 {
    let split = if test_split { SPLIT_TEST } else { SPLIT_TRAIN };
    splitmix64(splitmix64(splitmix64(seed) ^ split) ^ index as u64)
}

/// Writes `dir/{train,test}/{images,masks}/NAME.tif` (5-channel float32 stacks and u8
/// 0/1 masks, names `ssqpm_0000`, ...), the u16 instance labels in
/// `dir/{train,test}/instances/NAME.tif`, and `dir/simulation.json` (config, seed, names
/// and per-sample statistics). With `Confluence::Mixed`, image `i` of each split is low,
/// medium or high for `i % 3 == 0, 1, 2`. Existing files of the same names are replaced.
pub fn write_dataset(
    dir: &Path,
    n_train: usize,
    n_test: usize,
    cfg: &SsqpmConfig,
    seed: u64,
) -> Result<DatasetSummary> {
    cfg.validate()?;
    let mut names = [Vec::new(), Vec::new()];
    let mut records = [Vec::new(), Vec::new()];
    for (si, (split, n)) in [("train", n_train), ("test", n_test)].into_iter().enumerate() {
        let img_dir = dir.join(split).join("images");
        let mask_dir = dir.join(split).join("masks");
        let inst_dir = dir.join(split).join("instances");
        let truth_dir = dir.join(split).join("truth");
        for d in [&img_dir, &mask_dir, &inst_dir, &truth_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        for i in 0..n {
            let mut c = cfg.clone();
            if c.confluence == Confluence::Mixed {
                c.confluence = [Confluence::Low, Confluence::Medium, Confluence::High][i % 3];
            }
            let s = sample_seed(seed, si == 1, i);
            let sample = simulate(&c, s)?;
            let name = format!("ssqpm_{i:04}");
            crate::io::tiff::write_image_f32(&img_dir.join(format!("{name}.tif")), &sample.image)?;
            crate::io::tiff::write_mask_u8(&mask_dir.join(format!("{name}.tif")), &sample.mask)?;
            crate::io::tiff::write_mask_u16(&inst_dir.join(format!("{name}.tif")), &sample.instances)?;
            super::write_truth(
                &truth_dir.join(format!("{name}.csv")),
                &sample.instances.mapv(u32::from),
                None,
                &sample.dry_mass_pg,
                &[],
            )?;
            records[si].push(SampleRecord {
                name: name.clone(),
                seed: s,
                confluence: sample.confluence,
                n_cells: sample.n_cells(),
                foreground_fraction: sample.foreground_fraction(),
            });
            names[si].push(name);
        }
    }
    let [train, test] = names;
    let [rec_train, rec_test] = records;
    let record = SimulationRecord {
        generator: "lumos::sim::ssqpm",
        format_version: 1,
        seed,
        config: cfg,
        channel_names: CHANNEL_NAMES,
        train: train.clone(),
        test: test.clone(),
        samples: SplitRecords { train: rec_train, test: rec_test },
    };
    let json = serde_json::to_string_pretty(&record)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialize simulation.json: {e}")))?;
    let path = dir.join("simulation.json");
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    Ok(DatasetSummary { train, test })
}

#[cfg(test)]
mod tests {
    use super::{Rng, pmath};

    #[test]
    fn portable_math_matches_std() {
        let mut x = -30.0;
        while x < 30.0 {
            let e = pmath::exp(x);
            assert!(((e - x.exp()) / x.exp()).abs() < 1e-14, "exp({x})");
            let (s, c) = pmath::sin_cos(x);
            assert!((s - x.sin()).abs() < 1e-14 && (c - x.cos()).abs() < 1e-14, "sin_cos({x})");
            let a = x.abs() + 1e-3;
            assert!((pmath::ln(a) - a.ln()).abs() < 1e-14 * a.ln().abs().max(1.0), "ln({a})");
            x += 0.01731;
        }
        for &a in &[1e-300, 1e-310, 0.5, 1.0, 2.0, 1e300] {
            assert!((pmath::ln(a) - f64::ln(a)).abs() < 1e-12 * f64::ln(a).abs().max(1.0), "ln({a})");
        }
        assert_eq!(pmath::ln(1.0), 0.0);
    }

    #[test]
    fn ziggurat_normal_moments() {
        let mut rng = Rng::new(1, 0);
        let n = 400_000;
        let (mut m1, mut m2, mut m4, mut tail) = (0.0, 0.0, 0.0, 0usize);
        for _ in 0..n {
            let z = rng.normal();
            m1 += z;
            m2 += z * z;
            m4 += z * z * z * z;
            if z.abs() > 3.442_619_855_899 {
                tail += 1;
            }
        }
        let n_f = n as f64;
        let (m1, m2, m4) = (m1 / n_f, m2 / n_f, m4 / n_f);
        assert!(m1.abs() < 0.01, "mean {m1}");
        assert!((m2 - 1.0).abs() < 0.01, "variance {m2}");
        assert!((m4 - 3.0).abs() < 0.06, "fourth moment {m4}");
        // P(|z| > R) = 5.76e-4.
        let p = tail as f64 / n_f;
        assert!((p - 5.76e-4).abs() < 1.5e-4, "tail fraction {p}");
    }

    #[test]
    fn poisson_small_mean_and_variance() {
        let mut rng = Rng::new(2, 0);
        for &lam in &[0.5, 5.0, 30.0] {
            let n = 100_000;
            let v: Vec<f64> = (0..n).map(|_| rng.poisson_small(lam)).collect();
            let mean = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
            assert!((mean - lam).abs() < 0.03 * lam.max(1.0), "mean {mean} for {lam}");
            assert!((var - lam).abs() < 0.05 * lam.max(1.0), "variance {var} for {lam}");
        }
    }
}
