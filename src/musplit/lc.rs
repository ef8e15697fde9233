//! Lateral-context (LC) inputs for muSplit.
//!
//! For a primary patch of `T x T` pixels centred at `(cy, cx)`, level `k` (0 = the
//! primary patch itself) is the region of `2^k T x 2^k T` full-resolution pixels centred
//! at the same point, average-pooled by `2^k` to `T x T`: the frame downsampled by `2^k`
//! and cropped around the patch, with its pooling grid anchored on the patch so that every
//! level is exactly centred. Outside the frame the pixels are mirrored (half-sample
//! symmetric reflection, repeated for regions larger than the frame).
//!
//! For tiled prediction a whole row of tiles shares one band of rows per level
//! ([`LcBand`]), so the cost per tile is one crop and memory is bounded by
//! `2^(L-1) T` rows x the frame width, whatever the frame height.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::engine::normalize::ChannelAffine;

/// Folds `i` into `0..n` by half-sample symmetric reflection (`-1 -> 0`, `n -> n-1`).
pub fn reflect(i: i64, n: i64) -> i64 {
    let m = i.rem_euclid(2 * n);
    if m < n { m } else { 2 * n - 1 - m }
}

/// `len` indices starting at `start`, reflected into `0..n`; `None` when all are inside.
fn reflected_indices(start: i64, len: i64, n: i64) -> Option<Tensor> {
    if start >= 0 && start + len <= n {
        return None;
    }
    Some(Tensor::from_slice(&(start..start + len).map(|i| reflect(i, n)).collect::<Vec<i64>>()))
}

/// Rows `y0..y0+h`, columns `x0..x0+w` of a 2-D tensor, mirrored outside.
pub fn gather(src: &Tensor, y0: i64, h: i64, x0: i64, w: i64) -> Tensor {
    let (n_rows, n_cols) = (src.size()[0], src.size()[1]);
    let rows = match reflected_indices(y0, h, n_rows) {
        None => src.narrow(0, y0, h),
        Some(ix) => src.index_select(0, &ix.to_device(src.device())),
    };
    match reflected_indices(x0, w, n_cols) {
        None => rows.narrow(1, x0, w),
        Some(ix) => rows.index_select(1, &ix.to_device(src.device())),
    }
}

fn pool(x: &Tensor, f: i64) -> Tensor {
    if f == 1 {
        return x.shallow_clone();
    }
    x.unsqueeze(0)
        .unsqueeze(0)
        .avg_pool2d([f, f], [f, f], [0, 0], false, true, None::<i64>)
        .squeeze_dim(0)
        .squeeze_dim(0)
}

fn half(tile: i64, k: usize) -> i64 {
    (tile << k) / 2
}

/// The `levels` LC crops `(levels, T, T)` of a single patch centred at `(cy, cx)` of a
/// normalized 2-D image tensor (training).
pub fn crops(src: &Tensor, cy: i64, cx: i64, tile: i64, levels: usize) -> Tensor {
    let v: Vec<Tensor> = (0..levels)
        .map(|k| {
            let (hk, f) = (half(tile, k), 1i64 << k);
            pool(&gather(src, cy - hk, 2 * hk, cx - hk, 2 * hk), f)
        })
        .collect();
    Tensor::stack(&v, 0)
}

/// One row of tiles centred on row `cy`: per level, the normalized band of rows and
/// columns the tiles need, and per pooling phase the pooled band (computed once).
pub struct LcBand {
    tile: i64,
    /// Per level: (first column of the band in frame coordinates, band).
    bands: Vec<(i64, Tensor)>,
    /// Per level: pooling phase -> pooled band.
    pooled: Vec<HashMap<i64, Tensor>>,
}

impl LcBand {
    /// Builds the row bands of all levels from a raw `(H, W)` frame (any device),
    /// normalizes them with `aff` and moves them to `device`. `centres_x` are the column
    /// centres of the tiles that will be cropped from this band.
    pub fn new(
        frame: &Tensor,
        cy: i64,
        tile: i64,
        levels: usize,
        aff: &ChannelAffine,
        centres_x: &[i64],
        device: Device,
    ) -> Self {
        let (xmin, xmax) = (*centres_x.iter().min().unwrap_or(&0), *centres_x.iter().max().unwrap_or(&0));
        let bands = (0..levels)
            .map(|k| {
                let hk = half(tile, k);
                let c0 = xmin - hk;
                let b = gather(frame, cy - hk, 2 * hk, c0, xmax + hk - c0).to_device(device).to_kind(Kind::Float);
                (c0, (b.clamp(aff.lo as f64, aff.hi as f64) - aff.mean as f64) / aff.std as f64)
            })
            .collect();
        LcBand { tile, bands, pooled: (0..levels).map(|_| HashMap::new()).collect() }
    }

    /// The `(L, T, T)` input of the tile centred at column `cx`.
    pub fn crop(&mut self, cx: i64) -> Tensor {
        let t = self.tile;
        let v: Vec<Tensor> = (0..self.bands.len())
            .map(|k| {
                let (hk, f) = (half(t, k), 1i64 << k);
                let (c0, band) = &self.bands[k];
                let start = cx - hk - c0;
                let phase = start.rem_euclid(f);
                let pooled = self.pooled[k].entry(phase).or_insert_with(|| {
                    let width = (band.size()[1] - phase) / f * f;
                    pool(&band.narrow(1, phase, width), f)
                });
                pooled.narrow(1, (start - phase) / f, t)
            })
            .collect();
        Tensor::stack(&v, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_folds_any_index() {
        let n = 5;
        let got: Vec<i64> = (-7..12).map(|i| reflect(i, n)).collect();
        assert_eq!(got, vec![3, 4, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1]);
    }

    /// Level k of a crop equals the frame pooled by 2^k around the centre, computed
    /// the slow way; and the band path gives the same crops as the single-patch path.
    #[test]
    fn crops_match_direct_pooling_and_band_path() {
        let (h, w) = (40i64, 52i64);
        let frame = Tensor::arange(h * w, (Kind::Float, Device::Cpu)).view([h, w]).sin() * 10.0;
        let aff = ChannelAffine { lo: f32::MIN, hi: f32::MAX, mean: 0.0, std: 1.0 };
        let tile = 8;
        let levels = 4; // level 3 covers 64 px, more than the frame
        for cy in [0i64, 4, 19, 39] {
            let centres: Vec<i64> = vec![0, 3, 4, 12, 21, 51];
            let mut band = LcBand::new(&frame, cy, tile, levels, &aff, &centres, Device::Cpu);
            for &cx in &centres {
                let a = crops(&frame, cy, cx, tile, levels);
                let b = band.crop(cx);
                assert_eq!(a.size(), vec![levels as i64, tile, tile]);
                let d = (&a - &b).abs().max().double_value(&[]);
                assert!(d < 1e-5, "cy {cy} cx {cx}: band differs by {d}");
                // slow reference for level 2, pixel (3, 5)
                let k = 2;
                let f = 1 << k;
                let (y0, x0) = (cy - (tile << k) / 2 + 3 * f, cx - (tile << k) / 2 + 5 * f);
                let mut s = 0.0;
                for yy in y0..y0 + f {
                    for xx in x0..x0 + f {
                        s += frame.double_value(&[reflect(yy, h), reflect(xx, w)]);
                    }
                }
                let r = s / (f * f) as f64;
                assert!((a.double_value(&[k as i64, 3, 5]) - r).abs() < 1e-4);
            }
        }
    }
}
