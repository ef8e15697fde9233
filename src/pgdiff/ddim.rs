//! Diffusion noise schedule, DDIM sampling and DDIM inversion.
//!
//! Conventions follow latent-diffusion (CompVis) and diffusers' `DDIMScheduler` /
//! `DDIMInverseScheduler` with `timestep_spacing = "leading"`, `steps_offset = 1` and
//! `set_alpha_to_one = false`:
//!
//! - betas "linear" (LDM's name): `linspace(sqrt(b0), sqrt(b1), T)^2`, `alpha_bar_t =
//!   prod_{s <= t} (1 - beta_s)`.
//! - With `n` DDIM steps, `c = T / n` (integer division) and the timesteps are
//!   `0, c, 2c, ... + 1`. Sampling visits them from the largest down; the step after the
//!   smallest lands on `alpha_bar_0` ("final alpha" when `set_alpha_to_one` is false).
//! - DDIM step (Song et al. 2021, eq. 12): `x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)`,
//!   `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`, with
//!   `sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))`.
//! - DDIM inversion step (the same ODE run forward): from `x` at the previous timestep
//!   (`a_t`, or `alpha_bar_0` before the first step) to the next one (`a_next`), with the
//!   noise predicted at the next timestep: `x_next = sqrt(a_next) x0 + sqrt(1 - a_next)
//!   eps`, i.e. `sqrt(a_next / a_t) x + sqrt(a_next) (sqrt(1 / a_next - 1) - sqrt(1 / a_t
//!   - 1)) eps`.
//!
//! The arithmetic runs in the tensors' dtype; the schedule itself is computed in f64.

use tch::Tensor;

use crate::engine::progress::Monitor;
use crate::error::{Error, Result};

/// A discrete diffusion schedule of `T` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl Schedule {
    /// LDM's "linear" schedule: `linspace(sqrt(beta_start), sqrt(beta_end), steps)^2`.
    pub fn linear(steps: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        if steps < 2 || !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) {
            return Err(Error::Config(format!(
                "diffusion schedule: {steps} steps, betas {beta_start}..{beta_end}; expected >= 2 steps and 0 < beta_start <= beta_end < 1"
            )));
        }
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let betas: Vec<f64> = (0..steps).map(|i| (a + (b - a) * i as f64 / (steps - 1) as f64).powi(2)).collect();
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|bt| {
                acc *= 1.0 - bt;
                acc
            })
            .collect();
        Ok(Schedule { betas, alphas_cumprod })
    }

    /// The latent-diffusion default: 1000 steps, betas 0.0015 .. 0.0195.
    pub fn ldm() -> Self {
        Self::linear(1000, 0.0015, 0.0195).expect("valid constants")
    }

    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `alpha_bar_t`.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    /// The ascending DDIM timesteps for `n` steps: `(0..n) * (T / n) + 1`.
    pub fn ddim_timesteps(&self, n: usize) -> Result<Vec<usize>> {
        let t = self.len();
        if n == 0 || n > t - 1 {
            return Err(Error::InvalidArgument(format!(
                "{n} DDIM steps; expected 1..={} for a {t}-step schedule",
                t - 1
            )));
        }
        let c = t / n;
        Ok((0..n).map(|i| i * c + 1).collect())
    }

    /// Forward diffusion: `sqrt(a_t) x0 + sqrt(1 - a_t) noise`, with `t` an int64 tensor
    /// of one timestep per batch element.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        let ab = Tensor::from_slice(&self.alphas_cumprod).to_kind(x0.kind()).to_device(x0.device()).index_select(0, t);
        let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1i64, x0.dim() - 1)).collect();
        let ab = ab.view(shape.as_slice());
        let sd = (-&ab + 1.0).sqrt();
        x0 * ab.sqrt() + noise * sd
    }

    /// Forward diffusion to timestep `t` with one scalar `alpha_bar`.
    pub fn q_sample_at(&self, x0: &Tensor, t: usize, noise: &Tensor) -> Tensor {
        let ab = self.alphas_cumprod[t];
        x0 * ab.sqrt() + noise * (1.0 - ab).sqrt()
    }
}

/// One DDIM update from `alpha_bar = a_t` to `a_prev`; `noise` is required when
/// `eta > 0`.
pub fn ddim_step(x: &Tensor, eps: &Tensor, a_t: f64, a_prev: f64, eta: f64, noise: Option<&Tensor>) -> Result<Tensor> {
    let x0 = (x - eps * (1.0 - a_t).sqrt()) / a_t.sqrt();
    let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).max(0.0).sqrt();
    let dir = eps * (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
    let mut out = x0 * a_prev.sqrt() + dir;
    if sigma > 0.0 {
        let z = noise.ok_or_else(|| Error::InvalidArgument("a DDIM step with eta > 0 needs a noise tensor".into()))?;
        out += z * sigma;
    }
    Ok(out)
}

/// One DDIM inversion update from `alpha_bar = a_t` to `a_next` (larger noise level).
pub fn ddim_inverse_step(x: &Tensor, eps: &Tensor, a_t: f64, a_next: f64) -> Tensor {
    let x0 = (x - eps * (1.0 - a_t).sqrt()) / a_t.sqrt();
    x0 * a_next.sqrt() + eps * (1.0 - a_next).sqrt()
}

/// DDIM sampling from `x_t` (the starting noise) in `steps` steps.
///
/// `eps_fn(x, t)` predicts the noise at timestep `t`; `noise_fn()` draws the fresh noise
/// of stochastic steps (called only when `eta > 0`). Cancellation is checked each step.
pub fn sample(
    schedule: &Schedule,
    steps: usize,
    eta: f64,
    x_t: &Tensor,
    eps_fn: &mut dyn FnMut(&Tensor, usize) -> Result<Tensor>,
    noise_fn: &mut dyn FnMut() -> Tensor,
    monitor: &Monitor,
) -> Result<Tensor> {
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(Error::InvalidArgument(format!("eta = {eta}; expected a number >= 0")));
    }
    let ts = schedule.ddim_timesteps(steps)?;
    let mut x = x_t.shallow_clone();
    for i in (0..ts.len()).rev() {
        monitor.check()?;
        let t = ts[i];
        let a_t = schedule.alpha_bar(t);
        let a_prev = if i > 0 { schedule.alpha_bar(ts[i - 1]) } else { schedule.alpha_bar(0) };
        let eps = eps_fn(&x, t)?;
        let z = (eta > 0.0).then(&mut *noise_fn);
        x = ddim_step(&x, &eps, a_t, a_prev, eta, z.as_ref())?;
    }
    Ok(x)
}

/// DDIM inversion of `x0` (a clean latent) to noise in `steps` steps.
pub fn invert(
    schedule: &Schedule,
    steps: usize,
    x0: &Tensor,
    eps_fn: &mut dyn FnMut(&Tensor, usize) -> Result<Tensor>,
    monitor: &Monitor,
) -> Result<Tensor> {
    let ts = schedule.ddim_timesteps(steps)?;
    let mut x = x0.shallow_clone();
    for i in 0..ts.len() {
        monitor.check()?;
        let a_cur = if i > 0 { schedule.alpha_bar(ts[i - 1]) } else { schedule.alpha_bar(0) };
        let a_next = schedule.alpha_bar(ts[i]);
        let eps = eps_fn(&x, ts[i])?;
        x = ddim_inverse_step(&x, &eps, a_cur, a_next);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn linear_schedule_matches_ldm() {
        let s = Schedule::ldm();
        assert_eq!(s.len(), 1000);
        assert!((s.betas[0] - 0.0015).abs() < 1e-12);
        assert!((s.betas[999] - 0.0195).abs() < 1e-12);
        // the middle beta lies on the sqrt-linear ramp, not the linear one
        let mid = ((0.0015f64.sqrt() + 0.0195f64.sqrt()) / 2.0).powi(2);
        assert!((0.5 * (s.betas[499] + s.betas[500]) - mid).abs() < 1e-6);
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
        // the final noise level is essentially pure noise
        assert!(s.alphas_cumprod[999] < 0.01 && s.alphas_cumprod[999] > 0.0);
        assert!((s.alphas_cumprod[0] - (1.0 - 0.0015)).abs() < 1e-12);
    }

    #[test]
    fn ddim_timesteps_leading_plus_one() {
        let s = Schedule::ldm();
        assert_eq!(s.ddim_timesteps(4).unwrap(), vec![1, 251, 501, 751]);
        assert_eq!(s.ddim_timesteps(200).unwrap()[..3], [1, 6, 11]);
        assert!(s.ddim_timesteps(0).is_err());
        assert!(s.ddim_timesteps(1000).is_err());
    }

    #[test]
    fn q_sample_per_element_timesteps() {
        let s = Schedule::ldm();
        let x0 = Tensor::ones([2, 1, 2, 2], (Kind::Double, Device::Cpu));
        let n = Tensor::zeros([2, 1, 2, 2], (Kind::Double, Device::Cpu));
        let t = Tensor::from_slice(&[0i64, 999]);
        let y = s.q_sample(&x0, &t, &n);
        assert!((y.double_value(&[0, 0, 0, 0]) - s.alphas_cumprod[0].sqrt()).abs() < 1e-12);
        assert!((y.double_value(&[1, 0, 1, 1]) - s.alphas_cumprod[999].sqrt()).abs() < 1e-12);
    }

    #[test]
    fn inversion_then_sampling_converges_with_steps() {
        // A noise predictor that is exact for a point mass at x0: inversion followed by
        // deterministic sampling returns to x0, up to a discretization error that shrinks
        // with the number of steps (the noise is evaluated at the next timestep).
        let s = Schedule::ldm();
        let x0 = Tensor::from_slice(&[0.3f64, -1.2, 0.7, 2.0]).view([1, 1, 2, 2]);
        let target = x0.shallow_clone();
        let round_trip = |n: usize| {
            let mut eps = |x: &Tensor, t: usize| {
                let a = s.alpha_bar(t);
                Ok((x - &target * a.sqrt()) / (1.0 - a).sqrt())
            };
            let noise = invert(&s, n, &x0, &mut eps, &Monitor::none()).unwrap();
            let back = sample(&s, n, 0.0, &noise, &mut eps, &mut || unreachable!(), &Monitor::none()).unwrap();
            (back - &x0).abs().max().double_value(&[])
        };
        let (e20, e200) = (round_trip(20), round_trip(200));
        assert!(e200 < 0.01, "200-step round trip error {e200}");
        assert!(e200 < e20 / 4.0, "error does not shrink with steps: {e20} -> {e200}");
    }

    #[test]
    fn stochastic_step_needs_noise() {
        let x = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        assert!(ddim_step(&x, &x, 0.5, 0.9, 1.0, None).is_err());
        assert!(ddim_step(&x, &x, 0.5, 0.9, 0.0, None).is_ok());
    }
}
