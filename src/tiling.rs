//! The one tiling engine: every model predicts frames of any size through it.
//!
//! Sliding window with Gaussian blending (nnU-Net): tiles of the training patch size
//! at a step of `step_fraction` x tile, spread evenly; each tile's prediction is weighted
//! by a Gaussian importance map (sigma = tile / 8) and the sums are divided by the summed
//! weights. Tiles are visited row band by row band, and an accumulator of one tile height
//! x frame width rolls down the frame: rows that no later tile touches are finalized and
//! handed to the sink at once. Memory beyond the caller's input and output buffers is
//! therefore bounded by the tile height x frame width x classes, not the frame area.

use ndarray::{s, ArrayView3};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::image::array3_to_tensor;
use crate::progress::{Monitor, Progress, Stage};

/// Sliding-window settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlidingWindow {
    /// Tile `[height, width]` in pixels (the model's patch size by default).
    pub tile: [usize; 2],
    /// Step between tiles as a fraction of the tile (0.5 in nnU-Net); in (0, 1].
    pub step_fraction: f64,
    /// Tiles per forward pass.
    pub batch_size: usize,
}

impl SlidingWindow {
    pub fn validate(&self, divisor: usize) -> Result<()> {
        if !(self.step_fraction > 0.0 && self.step_fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!("step_fraction = {}; the step between tiles must be a fraction in (0, 1] of the tile", self.step_fraction)));
        }
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument("batch_size = 0; tiles per forward pass must be >= 1".into()));
        }
        for &t in &self.tile {
            if t == 0 || t % divisor != 0 {
                return Err(Error::InvalidArgument(format!(
                    "tile size (tile_height, tile_width) = {:?}; both must be positive multiples of {divisor} (the network's downsampling factor)",
                    self.tile
                )));
            }
        }
        Ok(())
    }
}

/// Tile start positions along one axis of length `size` (nnU-Net's `compute_steps`).
pub fn tile_starts(size: usize, tile: usize, step_fraction: f64) -> Vec<usize> {
    if size <= tile {
        return vec![0];
    }
    let target = tile as f64 * step_fraction;
    let n = ((size - tile) as f64 / target).ceil() as usize + 1;
    let actual = (size - tile) as f64 / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round() as usize).collect()
}

/// Gaussian importance map `(th, tw)`, sigma = tile/8, max 1, zeros replaced by the smallest
/// non-zero value (so every pixel gets weight).
pub fn gaussian_importance(th: usize, tw: usize, device: Device) -> Tensor {
    let g1 = |n: usize| {
        let sigma = n as f64 / 8.0;
        let c = (n as f64 - 1.0) / 2.0;
        Tensor::from_slice(&(0..n).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp() as f32).collect::<Vec<_>>())
    };
    let g = g1(th).unsqueeze(1) * g1(tw).unsqueeze(0);
    let g = &g / g.max();
    let min_nz = g.masked_select(&g.gt(0.0)).min();
    g.maximum(&min_nz).to_device(device)
}

/// Predicts a `(C, H, W)` frame tile by tile.
///
/// - `prepare` maps a raw tile `(1, C, h, w)` (already on `device`) to network input;
///   it is where normalization happens.
/// - `predict` maps a batch `(N, C, th, tw)` to `(N, K, th, tw)` values to blend
///   (probabilities, or any per-pixel output).
/// - `sink(row0, rows)` receives finished rows `(K, n, W)` on the CPU, top to bottom.
///
/// Tiles past the frame border (frames smaller than a tile) are zero-padded after `prepare`.
pub fn sliding_window(
    frame: ArrayView3<f32>,
    sw: &SlidingWindow,
    out_channels: usize,
    device: Device,
    prepare: &dyn Fn(&Tensor) -> Tensor,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    monitor: &mut Monitor,
) -> Result<()> {
    let (_, h, w) = frame.dim();
    if h == 0 || w == 0 {
        return Err(Error::Shape(format!("the frame is {h} x {w}; expected at least 1 x 1 pixels")));
    }
    let [th, tw] = sw.tile;
    let ys = tile_starts(h, th, sw.step_fraction);
    let xs = tile_starts(w, tw, sw.step_fraction);
    let wp = w.max(tw);
    let k = out_channels as i64;
    let gauss = gaussian_importance(th, tw, device);
    let opts = (Kind::Float, device);
    // accumulator rows cover [acc_row0, acc_row0 + th)
    let mut acc = Tensor::zeros([k, th as i64, wp as i64], opts);
    let mut wsum = Tensor::zeros([1, th as i64, wp as i64], opts);
    let mut acc_row0 = 0usize;
    let total = ys.len() * xs.len();
    let mut done = 0usize;

    let extract = |y: usize, x: usize| -> Tensor {
        let (y1, x1) = ((y + th).min(h), (x + tw).min(w));
        let t = array3_to_tensor(frame.slice(s![.., y..y1, x..x1]), device).unsqueeze(0);
        let t = prepare(&t);
        let (ph, pw) = ((th - (y1 - y)) as i64, (tw - (x1 - x)) as i64);
        if ph > 0 || pw > 0 { t.constant_pad_nd([0, pw, 0, ph]) } else { t }
    };

    for (bi, &y) in ys.iter().enumerate() {
        // shift the accumulator so that it starts at row y
        let shift = (y - acc_row0) as i64;
        if shift > 0 {
            let keep = th as i64 - shift;
            acc = Tensor::cat(&[acc.narrow(1, shift, keep), Tensor::zeros([k, shift, wp as i64], opts)], 1);
            wsum = Tensor::cat(&[wsum.narrow(1, shift, keep), Tensor::zeros([1, shift, wp as i64], opts)], 1);
            acc_row0 = y;
        }
        for chunk in xs.chunks(sw.batch_size) {
            monitor.check()?;
            let batch = Tensor::cat(&chunk.iter().map(|&x| extract(y, x)).collect::<Vec<_>>(), 0);
            let pred = predict(&batch)?;
            let ps = pred.size();
            if ps.len() != 4 || ps[0] != chunk.len() as i64 || ps[1] != k || ps[2] != th as i64 || ps[3] != tw as i64 {
                return Err(Error::Shape(format!(
                    "a tile prediction has shape {ps:?}; expected [{}, {k}, {th}, {tw}]",
                    chunk.len()
                )));
            }
            for (i, &x) in chunk.iter().enumerate() {
                let p = pred.get(i as i64).to_kind(Kind::Float) * &gauss;
                let mut a = acc.narrow(2, x as i64, tw as i64);
                a += p;
                let mut ws = wsum.narrow(2, x as i64, tw as i64);
                ws += &gauss;
            }
            done += chunk.len();
            let mut pr = Progress::new(Stage::Inference);
            pr.iteration = done;
            pr.iterations = total;
            monitor.emit(pr);
        }
        // rows before the next band's start are final
        let next = if bi + 1 < ys.len() { ys[bi + 1] } else { h.max(th) };
        let end = next.min(h);
        if end > y {
            let n = (end - y) as i64;
            let rows = acc.narrow(1, 0, n).narrow(2, 0, w as i64) / wsum.narrow(1, 0, n).narrow(2, 0, w as i64);
            sink(y, &rows.to_device(Device::Cpu))?;
        }
    }
    Ok(())
}

/// Inner-padding tiling (muSplit): the frame is cut into a grid of `keep x keep` cells;
/// each cell is predicted from a `tile x tile` input centred on it, and only the central
/// `keep x keep` of the prediction is kept, without blending. Context comes from the real
/// neighbouring pixels (mirrored only past the frame border). `tile` equal to the training
/// patch is the paper's "inner padding"; a `tile` much larger than the training patch is
/// the prevalent "outer padding" scheme.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CentreTiles {
    pub tile: usize,
    pub keep: usize,
    /// Tiles per forward pass.
    pub batch_size: usize,
}

impl CentreTiles {
    pub fn validate(&self, divisor: usize) -> Result<()> {
        if self.tile == 0 || self.tile % divisor != 0 {
            return Err(Error::InvalidArgument(format!(
                "tile {} must be a positive multiple of {divisor} (the network's downsampling factor)",
                self.tile
            )));
        }
        if self.keep < 2 || self.keep > self.tile || self.keep % 2 != 0 || (self.tile - self.keep) % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "keep = {}: the kept centre must be even, >= 2 and <= the tile ({}), with tile - keep even",
                self.keep, self.tile
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument("batch_size = 0; tiles per forward pass must be >= 1".into()));
        }
        Ok(())
    }
}

/// Predicts an `(H, W)` frame with [`CentreTiles`], one row of cells at a time.
///
/// - `inputs(cy, row_centres, chunk)` returns the network input `(n, C, tile, tile)` for
///   the tiles centred at `(cy, cx)` for `cx` in `chunk` (a part of `row_centres`, all
///   tile centres of this row, given so that a row's context can be built once).
/// - `predict` maps it to `(n, K, tile, tile)`.
/// - `sink(row0, col0, block)` receives each finished block `(K, n, m)` on the CPU (one
///   batch of cells), row by row, left to right.
///
/// Memory: one batch of tile predictions, plus what `inputs` holds; independent of the
/// frame size.
#[allow(clippy::too_many_arguments)]
pub fn centre_tiles(
    h: usize,
    w: usize,
    ct: &CentreTiles,
    out_channels: usize,
    inputs: &mut dyn FnMut(i64, &[i64], &[i64]) -> Result<Tensor>,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>,
    monitor: &mut Monitor,
) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(Error::Shape(format!("the frame is {h} x {w}; expected at least 1 x 1 pixels")));
    }
    let (t, k) = (ct.tile as i64, ct.keep as i64);
    let (rows, cols) = (h.div_ceil(ct.keep), w.div_ceil(ct.keep));
    let centres: Vec<i64> = (0..cols as i64).map(|j| j * k + k / 2).collect();
    let margin = (t - k) / 2;
    let total = rows * cols;
    let mut done = 0;
    for i in 0..rows {
        let cy = i as i64 * k + k / 2;
        let n_rows = (h - i * ct.keep).min(ct.keep) as i64;
        for chunk in centres.chunks(ct.batch_size) {
            monitor.check()?;
            let x = inputs(cy, &centres, chunk)?;
            let pred = predict(&x)?;
            let ps = pred.size();
            if ps.len() != 4 || ps[0] != chunk.len() as i64 || ps[1] != out_channels as i64 || ps[2] != t || ps[3] != t {
                return Err(Error::Shape(format!(
                    "a tile prediction has shape {ps:?}; expected [{}, {out_channels}, {t}, {t}]",
                    chunk.len()
                )));
            }
            let centre = pred.narrow(2, margin, k).narrow(3, margin, k);
            // (n, K, k, k) -> (K, k, n*k): tiles side by side, cut at the frame border
            let col0 = (chunk[0] - k / 2) as usize;
            let block = centre.permute([1, 2, 0, 3]).reshape([out_channels as i64, k, -1]);
            let n_cols = (w - col0).min(chunk.len() * ct.keep) as i64;
            sink(i * ct.keep, col0, &block.narrow(1, 0, n_rows).narrow(2, 0, n_cols).to_device(Device::Cpu).to_kind(Kind::Float))?;
            done += chunk.len();
            let mut pr = Progress::new(Stage::Inference);
            pr.iteration = done;
            pr.iterations = total;
            monitor.emit(pr);
        }
    }
    Ok(())
}

/// Test-time mirroring: averages `f` over the 4 flips of a `(N, C, H, W)` batch.
pub fn mirrored(x: &Tensor, f: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let mut sum = f(x)?;
    for dims in [&[3i64][..], &[2], &[2, 3]] {
        sum += f(&x.flip(dims))?.flip(dims);
    }
    Ok(sum / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn steps_cover_the_axis() {
        assert_eq!(tile_starts(256, 256, 0.5), vec![0]);
        assert_eq!(tile_starts(100, 256, 0.5), vec![0]);
        assert_eq!(tile_starts(512, 256, 0.5), vec![0, 128, 256]);
        let s = tile_starts(1000, 256, 0.5);
        assert_eq!(*s.last().unwrap(), 1000 - 256);
        assert!(s.windows(2).all(|w| w[1] - w[0] <= 128));
    }

    /// An identity "network" must give back the input exactly, whatever the tiling.
    #[test]
    fn identity_is_reconstructed() {
        for (h, w, t) in [(37usize, 53usize, 16usize), (64, 64, 64), (10, 70, 32), (100, 33, 32)] {
            let frame = Array3::from_shape_fn((2, h, w), |(c, y, x)| (c * 1000 + y * 7 + x) as f32);
            let sw = SlidingWindow { tile: [t, t], step_fraction: 0.5, batch_size: 3 };
            let mut out = Array3::<f32>::zeros((2, h, w));
            let mut next_row = 0;
            sliding_window(
                frame.view(),
                &sw,
                2,
                Device::Cpu,
                &|t| t.shallow_clone(),
                &mut |b| Ok(b.shallow_clone()),
                &mut |r0, rows| {
                    assert_eq!(r0, next_row, "rows arrive in order");
                    let a = crate::image::tensor_to_array3(rows)?;
                    next_row += a.shape()[1];
                    out.slice_mut(s![.., r0..r0 + a.shape()[1], ..]).assign(&a);
                    Ok(())
                },
                &mut Monitor::none(),
            )
            .unwrap();
            assert_eq!(next_row, h);
            let err = out.iter().zip(frame.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-2, "{h}x{w} tile {t}: max error {err}");
        }
    }

    #[test]
    fn cancel_stops_work() {
        let frame = Array3::<f32>::zeros((1, 64, 64));
        let sw = SlidingWindow { tile: [16, 16], step_fraction: 0.5, batch_size: 1 };
        let token = crate::progress::CancelToken::new();
        token.cancel();
        let mut m = Monitor { progress: None, cancel: Some(token) };
        let r = sliding_window(frame.view(), &sw, 1, Device::Cpu, &|t| t.shallow_clone(), &mut |b| Ok(b.shallow_clone()), &mut |_, _| Ok(()), &mut m);
        assert!(matches!(r, Err(Error::Cancelled)));
    }

    /// An identity network with an input that is the frame around each centre must
    /// give back the frame exactly, for any frame, tile and kept centre.
    #[test]
    fn centre_tiles_reconstruct_identity() {
        for (h, w, t, k) in [(37usize, 53usize, 16usize, 8usize), (64, 64, 16, 16), (5, 70, 32, 16), (100, 33, 32, 4)] {
            let frame = Tensor::arange((h * w) as i64, (Kind::Float, Device::Cpu)).view([h as i64, w as i64]);
            let ct = CentreTiles { tile: t, keep: k, batch_size: 3 };
            ct.validate(8.min(t)).unwrap();
            let mut out = Array3::<f32>::zeros((1, h, w));
            let mut next_row = 0usize;
            centre_tiles(
                h,
                w,
                &ct,
                1,
                &mut |cy, _, chunk| {
                    let v: Vec<Tensor> =
                        chunk.iter().map(|&cx| crate::lc::crops(&frame, cy, cx, t as i64, 1).unsqueeze(0)).collect();
                    Ok(Tensor::cat(&v, 0))
                },
                &mut |b| Ok(b.shallow_clone()),
                &mut |r0, c0, block| {
                    let a = crate::image::tensor_to_array3(block)?;
                    assert!(r0 >= next_row.saturating_sub(k), "blocks arrive row by row");
                    next_row = next_row.max(r0 + a.shape()[1]);
                    out.slice_mut(s![.., r0..r0 + a.shape()[1], c0..c0 + a.shape()[2]]).assign(&a);
                    Ok(())
                },
                &mut Monitor::none(),
            )
            .unwrap();
            assert_eq!(next_row, h);
            let want = crate::image::tensor_to_array3(&frame.unsqueeze(0)).unwrap();
            assert_eq!(out, want, "{h}x{w} tile {t} keep {k}");
        }
        assert!(CentreTiles { tile: 16, keep: 7, batch_size: 1 }.validate(8).is_err());
        assert!(CentreTiles { tile: 16, keep: 32, batch_size: 1 }.validate(8).is_err());
        assert!(CentreTiles { tile: 12, keep: 4, batch_size: 1 }.validate(8).is_err());
    }
}
