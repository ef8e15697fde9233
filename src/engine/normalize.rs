//! The one normalization module: per-channel z-score (per image, or with training-set
//! statistics) and robust quantile clipping (for phase). The fitted statistics are
//! stored in the model file, so inference normalizes exactly as training did.
//!
//! Every method resolves, for a given frame, to a per-channel affine map with clipping,
//! `y = (clamp(x, lo, hi) - mean) / std`, which is pointwise and so can be applied tile by
//! tile without a normalized copy of the frame.

use ndarray::{ArrayView3, Axis};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::image::Image;

/// What the user asks for, per channel (in a training config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum NormMethod {
    /// z-score with this image's own mean and std (nnU-Net's default).
    PerImageZscore,
    /// z-score with the training set's mean and std of this channel.
    DatasetZscore,
    /// Clip to the training set's [q_low, q_high] quantiles, then z-score with the
    /// clipped training statistics (robust to phase-unwrapping outliers).
    RobustQuantile {
        #[serde(default = "default_q_low")]
        q_low: f64,
        #[serde(default = "default_q_high")]
        q_high: f64,
    },
}

fn default_q_low() -> f64 {
    0.005
}
fn default_q_high() -> f64 {
    0.995
}

/// Fitted statistics of one channel (stored in the model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum ChannelNorm {
    PerImageZscore,
    DatasetZscore { mean: f32, std: f32 },
    RobustQuantile { q_low: f64, q_high: f64, lo: f32, hi: f32, mean: f32, std: f32 },
}

/// `y = (clamp(x, lo, hi) - mean) / std` for one channel of one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelAffine {
    pub lo: f32,
    pub hi: f32,
    pub mean: f32,
    pub std: f32,
}

/// The per-channel normalization of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub channels: Vec<ChannelNorm>,
}

/// Largest number of pixels per channel sampled for quantiles (memory bound).
const MAX_QUANTILE_SAMPLES: usize = 4_000_000;

/// The std to divide by, or 1 for a constant channel: one whose std is not finite, is
/// not a normal f32, or is below 1e-6 of its mean's magnitude (rounding, since f32 data
/// hold about 7 significant digits). The test is relative, so data in small physical
/// units (optical path lengths of 1e-7 m, say) keep their contrast: an absolute 1e-8
/// threshold made such channels constant.
fn safe_std(mean: f64, s: f64) -> f32 {
    if s.is_finite() && s >= f32::MIN_POSITIVE as f64 && s <= f32::MAX as f64 && s > 1e-6 * mean.abs() {
        s as f32
    } else {
        1.0
    }
}

impl Normalizer {
    /// Fits the statistics of each channel on training images (all `(C, H, W)` with the
    /// same C). `methods` has one entry per channel, or one entry for all channels.
    pub fn fit(methods: &[NormMethod], images: &[&Image]) -> Result<Self> {
        let c = images
            .first()
            .ok_or_else(|| Error::InvalidArgument("no training images to fit normalization on".into()))?
            .channels();
        let methods: Vec<NormMethod> = match methods.len() {
            1 => vec![methods[0]; c],
            n if n == c => methods.to_vec(),
            n => {
                return Err(Error::Config(format!(
                    "normalization lists {n} channel methods; the images have {c} channels"
                )));
            }
        };
        let mut out = Vec::with_capacity(c);
        for (ch, m) in methods.iter().enumerate() {
            let values = || images.iter().flat_map(move |im| im.data.index_axis(Axis(0), ch).into_iter().copied());
            out.push(match *m {
                NormMethod::PerImageZscore => ChannelNorm::PerImageZscore,
                NormMethod::DatasetZscore => {
                    let (mean, std) = mean_std(values());
                    ChannelNorm::DatasetZscore { mean: mean as f32, std: safe_std(mean, std) }
                }
                NormMethod::RobustQuantile { q_low, q_high } => {
                    if !(0.0..=1.0).contains(&q_low) || !(0.0..=1.0).contains(&q_high) || q_low >= q_high {
                        return Err(Error::Config(format!(
                            "robust_quantile q_low = {q_low}, q_high = {q_high}; expected 0 <= q_low < q_high <= 1"
                        )));
                    }
                    let total: usize = images.iter().map(|im| im.height() * im.width()).sum();
                    let stride = total.div_ceil(MAX_QUANTILE_SAMPLES).max(1);
                    let mut v: Vec<f32> = values().step_by(stride).collect();
                    v.sort_by(|a, b| a.total_cmp(b));
                    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
                    let (lo, hi) = (q(q_low), q(q_high));
                    let (mean, std) = mean_std(values().map(|x| x.clamp(lo, hi)));
                    ChannelNorm::RobustQuantile { q_low, q_high, lo, hi, mean: mean as f32, std: safe_std(mean, std) }
                }
            });
        }
        Ok(Normalizer { channels: out })
    }

    pub fn n_channels(&self) -> usize {
        self.channels.len()
    }

    /// Resolves to one affine map per channel for the frame `(C, H, W)`; per-image
    /// statistics are computed here, once per frame.
    pub fn resolve(&self, frame: ArrayView3<f32>) -> Result<Vec<ChannelAffine>> {
        self.resolve_with(frame, None)
    }

    /// As [`resolve`](Self::resolve), but per-image channels take `frame_stats[ch]` =
    /// `(mean, std)` when given: the statistics of a whole frame of which `frame` is a
    /// region (chunked processing of images too large for one call). Channels with
    /// fitted statistics ignore them.
    pub fn resolve_with(
        &self,
        frame: ArrayView3<f32>,
        frame_stats: Option<&[(f32, f32)]>,
    ) -> Result<Vec<ChannelAffine>> {
        if let Some(st) = frame_stats {
            if st.len() != self.channels.len() {
                return Err(Error::Shape(format!(
                    "{} frame statistics (mean, std) given; this model has {} input channels",
                    st.len(),
                    self.channels.len()
                )));
            }
            if let Some((ch, (m, s))) =
                st.iter().enumerate().find(|(_, (m, s))| !m.is_finite() || !s.is_finite() || *s < 0.0)
            {
                return Err(Error::InvalidArgument(format!(
                    "frame statistics of channel {ch}: mean {m}, std {s}; expected a finite mean and a finite std >= 0"
                )));
            }
        }
        if frame.shape()[0] != self.channels.len() {
            return Err(Error::Shape(format!(
                "the input has {} channels; this model expects {}",
                frame.shape()[0],
                self.channels.len()
            )));
        }
        Ok(self
            .channels
            .iter()
            .enumerate()
            .map(|(ch, n)| match *n {
                ChannelNorm::PerImageZscore => {
                    let (m, s) = match frame_stats {
                        Some(st) => (st[ch].0 as f64, st[ch].1 as f64),
                        None => mean_std(frame.index_axis(Axis(0), ch).iter().copied()),
                    };
                    ChannelAffine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, mean: m as f32, std: safe_std(m, s) }
                }
                ChannelNorm::DatasetZscore { mean, std } => {
                    ChannelAffine { lo: f32::NEG_INFINITY, hi: f32::INFINITY, mean, std }
                }
                ChannelNorm::RobustQuantile { lo, hi, mean, std, .. } => ChannelAffine { lo, hi, mean, std },
            })
            .collect())
    }

    /// Normalizes a whole image (training data) into a new image.
    pub fn apply_image(&self, img: &Image) -> Result<Image> {
        let aff = self.resolve(img.data.view())?;
        let mut out = img.clone();
        for (ch, a) in aff.iter().enumerate() {
            out.data.index_axis_mut(Axis(0), ch).mapv_inplace(|x| (x.clamp(a.lo, a.hi) - a.mean) / a.std);
        }
        Ok(out)
    }
}

/// Applies per-channel affine maps (clamp to `[lo, hi]`, then `(x - mean) / std`) to a
/// `(N, C, H, W)` or `(C, H, W)` tensor the caller gives up: computed in place in it, no new
/// memory (a non-float tensor is converted first).
pub fn apply_affine_owned(x: Tensor, aff: &[ChannelAffine], device: Device) -> Tensor {
    DeviceAffine::new(aff, x.dim(), device).apply_owned(x)
}

/// Per-channel affine maps with their parameters already on the device, for applying to
/// many tensors: a parameter's copy to a CUDA device waits for the device's queued work
/// (libtorch synchronizes a copy from pageable memory), so a frame's normalization made
/// after its asynchronous copy would stall the host until that copy had finished.
pub struct DeviceAffine {
    lo: Tensor,
    hi: Tensor,
    mean: Tensor,
    std: Tensor,
}

impl DeviceAffine {
    /// The maps of `aff` shaped to broadcast over `dim`-D tensors (4: `(N, C, H, W)`, else
    /// `(C, H, W)`) on `device`.
    pub fn new(aff: &[ChannelAffine], dim: usize, device: Device) -> Self {
        DeviceAffine {
            lo: affine_column(aff, dim, device, |a| a.lo),
            hi: affine_column(aff, dim, device, |a| a.hi),
            mean: affine_column(aff, dim, device, |a| a.mean),
            std: affine_column(aff, dim, device, |a| a.std),
        }
    }

    /// As [`apply_affine_owned`].
    pub fn apply_owned(&self, x: Tensor) -> Tensor {
        let mut y = if x.kind() == Kind::Float { x } else { x.to_kind(Kind::Float) };
        let _ = y.clamp_tensor_(Some(&self.lo), Some(&self.hi));
        y -= &self.mean;
        y /= &self.std;
        y
    }
}

/// One field of the channels' affine maps, shaped to broadcast over a `dim`-D tensor.
fn affine_column(aff: &[ChannelAffine], dim: usize, device: Device, f: impl Fn(&ChannelAffine) -> f32) -> Tensor {
    let c = aff.len() as i64;
    let shape: Vec<i64> = if dim == 4 { vec![1, c, 1, 1] } else { vec![c, 1, 1] };
    Tensor::from_slice(&aff.iter().map(f).collect::<Vec<f32>>()).view(shape.as_slice()).to_device(device)
}

/// Mean and population std in f64, one pass (Welford).
fn mean_std(it: impl Iterator<Item = f32>) -> (f64, f64) {
    let (mut n, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for x in it {
        n += 1.0;
        let d = x as f64 - mean;
        mean += d / n;
        m2 += d * (x as f64 - mean);
    }
    if n == 0.0 { (0.0, 1.0) } else { (mean, (m2 / n).sqrt()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn img(f: impl Fn(usize, usize, usize) -> f32) -> Image {
        Image::new(Array3::from_shape_fn((2, 20, 20), |(c, y, x)| f(c, y, x)))
    }

    #[test]
    fn small_physical_units_keep_their_contrast_and_constant_channels_stay_constant() {
        // optical path lengths in metres: values ~3e-7, variations ~1e-9 (std below the
        // old absolute 1e-8 threshold)
        let a = img(|c, y, x| if c == 0 { 3e-7 + 1e-9 * ((y * 20 + x) % 7) as f32 } else { 5.0 });
        for m in [NormMethod::DatasetZscore, NormMethod::PerImageZscore] {
            let n = Normalizer::fit(&[m], &[&a]).unwrap();
            let na = n.apply_image(&a).unwrap();
            let ch0 = na.data.index_axis(Axis(0), 0);
            let (mn, sd) = mean_std(ch0.iter().copied());
            assert!(mn.abs() < 1e-3 && (sd - 1.0).abs() < 1e-3, "{m:?}: normalized mean {mn}, std {sd}");
            // the constant channel maps to 0, not to noise blown up by a tiny std
            assert!(na.data.index_axis(Axis(0), 1).iter().all(|v| v.abs() < 1e-6), "{m:?}");
        }
        assert_eq!(safe_std(5.0, 0.0), 1.0);
        assert_eq!(safe_std(5.0, 1e-7), 1.0); // below rounding of a value of 5 in f32
        assert_eq!(safe_std(0.0, 1e-40), 1.0); // not a normal f32
        assert_eq!(safe_std(1.0, f64::NAN), 1.0);
        assert_eq!(safe_std(3e-7, 1e-9), 1e-9);
    }

    #[test]
    fn dataset_zscore_and_quantile() {
        let a = img(|c, y, x| if c == 0 { (y * 20 + x) as f32 } else { 5.0 });
        let mut b = img(|c, y, x| if c == 0 { (y * 20 + x) as f32 + 400.0 } else { 5.0 });
        b.data[[1, 0, 0]] = 1000.0; // outlier
        let n = Normalizer::fit(
            &[NormMethod::DatasetZscore, NormMethod::RobustQuantile { q_low: 0.01, q_high: 0.99 }],
            &[&a, &b],
        )
        .unwrap();
        let na = n.apply_image(&a).unwrap();
        let nb = n.apply_image(&b).unwrap();
        let all: Vec<f32> =
            na.data.index_axis(Axis(0), 0).iter().chain(nb.data.index_axis(Axis(0), 0).iter()).copied().collect();
        let m = all.iter().sum::<f32>() / all.len() as f32;
        let v = all.iter().map(|x| (x - m).powi(2)).sum::<f32>() / all.len() as f32;
        assert!(m.abs() < 1e-4 && (v - 1.0).abs() < 1e-3, "mean {m} var {v}");
        // the outlier is clipped to the 99% quantile (5.0), so the channel is constant
        assert!(nb.data[[1, 0, 0]].abs() < 1e-6);
        // tensor path equals the array path
        let aff = n.resolve(b.data.view()).unwrap();
        let t = apply_affine_owned(b.to_tensor(Device::Cpu), &aff, Device::Cpu);
        let back = crate::image::tensor_to_array3(&t).unwrap();
        assert!(back.iter().zip(nb.data.iter()).all(|(x, y)| (x - y).abs() < 1e-5));
        // wrong channel count is a clear error
        let bad = Image::new(Array3::zeros((3, 4, 4)));
        assert!(n.resolve(bad.data.view()).unwrap_err().to_string().contains("3 channels"));
        // statistics survive serialization
        let js = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<Normalizer>(&js).unwrap(), n);
    }
}
