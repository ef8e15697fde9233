//! The one tiling engine: every model predicts frames of any size through it.
//!
//! Sliding window with Gaussian blending (nnU-Net): tiles of the training patch size
//! at a step of `step_fraction` x tile, spread evenly; each tile's prediction is weighted
//! by a Gaussian importance map (sigma = tile / 8) and the sums are divided by the summed
//! weights. Tiles are visited row band by row band, and an accumulator of one tile height
//! x frame width rolls down the frame: rows that no later tile touches are finalized and
//! handed to the sink at once. Memory beyond the caller's input and output buffers is
//! therefore bounded by the tile height x frame width x classes, not the frame area.

use ndarray::ArrayView3;
use tch::{Device, Kind, Tensor};

use crate::engine::progress::{Monitor, Progress, Stage};
use crate::error::{Error, Result};
use crate::image::check_finite;

/// The largest tile side the tiling engines accept, in pixels (16384: a float32 tile of
/// one channel is then at most 1 GiB). Sizes come from callers (C API, CLI, plugins); an
/// absurd one must be refused with a message, not reach an allocation that aborts.
pub const MAX_TILE_SIDE: usize = 16384;

/// The largest tile area the sliding window accepts, in pixels (8192 x 8192).
pub const MAX_TILE_PIXELS: usize = 1 << 26;

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
            return Err(Error::InvalidArgument(format!(
                "step_fraction = {}; the step between tiles must be a fraction in (0, 1] of the tile",
                self.step_fraction
            )));
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
            if t > MAX_TILE_SIDE {
                return Err(Error::InvalidArgument(format!(
                    "tile size (tile_height, tile_width) = {:?}; each side must be at most {MAX_TILE_SIDE} pixels",
                    self.tile
                )));
            }
        }
        if self.tile[0] * self.tile[1] > MAX_TILE_PIXELS {
            return Err(Error::InvalidArgument(format!(
                "tile size (tile_height, tile_width) = {:?} is {} pixels; a tile may have at most {MAX_TILE_PIXELS} (8192 x 8192)",
                self.tile,
                self.tile[0] * self.tile[1]
            )));
        }
        // the step must be at least one pixel, or the tile count grows without bound
        let min_side = self.tile[0].min(self.tile[1]);
        if self.step_fraction * (min_side as f64) < 1.0 {
            return Err(Error::InvalidArgument(format!(
                "step_fraction = {}; with a {min_side}-pixel tile side the step between tiles would be under one pixel: \
                 expected at least {:.3e} (1 / tile side)",
                self.step_fraction,
                1.0 / min_side as f64
            )));
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
        Tensor::from_slice(
            &(0..n).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp() as f32).collect::<Vec<_>>(),
        )
    };
    let g = g1(th).unsqueeze(1) * g1(tw).unsqueeze(0);
    let g = &g / g.max();
    let min_nz = g.masked_select(&g.gt(0.0)).min();
    g.maximum(&min_nz).to_device(device)
}

/// On a CUDA device, a frame whose whole-frame working set fits in this many bytes is
/// predicted by [`sliding_window`] in one piece (one copy in, tiles batched across rows, one
/// result transfer: fewer transfers and synchronizations). The working set counts the raw
/// and the prepared frame (2 C), the accumulator and the blended result (2 K), the weight
/// sum and the int64 argmax (3 planes of float32 size). Larger frames, and every frame on
/// the CPU, go band by band, with memory bounded by a band of tile rows whatever the
/// frame's size. The two paths group tiles into batches differently, so a stochastic
/// predictor (PG-DiffSeg, which draws per batch) draws differently on each.
pub const WHOLE_FRAME_BYTES: usize = 1 << 30;

/// Bytes of the whole-frame path's working set (see [`WHOLE_FRAME_BYTES`]).
fn whole_frame_bytes(c: usize, k: usize, h: usize, w: usize) -> usize {
    (2 * c + 2 * k + 3).saturating_mul(h).saturating_mul(w).saturating_mul(4)
}

/// Predicts a `(C, H, W)` frame tile by tile.
///
/// Fails with `InvalidInput` naming the first NaN or infinite pixel before `sink` sees any
/// row: band by band, checked on the host before any prediction; a frame predicted in one
/// piece on the device, checked there and the result read after the first batch of tiles
/// (so that the host queues that batch while the frame is still being copied: a bad frame
/// costs one batch of predictions, and an error or cancellation of that batch comes first).
/// - `prepare` maps raw pixels `(1, C, h, w)` (a copy of a band of the frame's rows, or of
///   the whole frame, on `device`, which `prepare` owns and may overwrite) to network
///   input, pixel by pixel: it is where normalization happens.
/// - `predict` maps a batch `(N, C, th, tw)` to `(N, K, th, tw)` values to blend
///   (probabilities, or any per-pixel output).
/// - `sink(row0, rows)` receives finished rows `(K, n, W)` on `device`, top to bottom: all
///   rows at once for a frame of up to [`WHOLE_FRAME_BYTES`] on a CUDA device, else band by
///   band (a sink that wants labels can take the argmax on the device and copy only those).
///
/// Tiles past the frame border (frames smaller than a tile) are zero-padded after `prepare`.
#[allow(clippy::too_many_arguments)]
pub fn sliding_window(
    frame: ArrayView3<f32>,
    sw: &SlidingWindow,
    out_channels: usize,
    device: Device,
    prepare: &dyn Fn(Tensor) -> Tensor,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    monitor: &mut Monitor,
) -> Result<()> {
    let (c, h, w) = frame.dim();
    let whole = device.is_cuda() && whole_frame_bytes(c, out_channels, h, w) <= WHOLE_FRAME_BYTES;
    sliding_window_with(frame, sw, out_channels, device, prepare, predict, sink, monitor, whole)
}

#[allow(clippy::too_many_arguments)]
fn sliding_window_with(
    frame: ArrayView3<f32>,
    sw: &SlidingWindow,
    out_channels: usize,
    device: Device,
    prepare: &dyn Fn(Tensor) -> Tensor,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    monitor: &mut Monitor,
    whole: bool,
) -> Result<()> {
    let (_, h, w) = frame.dim();
    if h == 0 || w == 0 {
        return Err(Error::Shape(format!("the frame is {h} x {w}; expected at least 1 x 1 pixels")));
    }
    if whole {
        return whole_frame(frame, sw, out_channels, device, prepare, predict, sink, monitor);
    }
    check_finite(frame)?;
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

    for (bi, &y) in ys.iter().enumerate() {
        // shift the accumulator so that it starts at row y
        let shift = (y - acc_row0) as i64;
        if shift > 0 {
            let keep = th as i64 - shift;
            acc = Tensor::cat(&[acc.narrow(1, shift, keep), Tensor::zeros([k, shift, wp as i64], opts)], 1);
            wsum = Tensor::cat(&[wsum.narrow(1, shift, keep), Tensor::zeros([1, shift, wp as i64], opts)], 1);
            acc_row0 = y;
        }
        // the band of rows [y, y + th) across the frame on the device, prepared, zero-padded
        // to th x wp (one host-to-device copy per band)
        let y1 = (y + th).min(h);
        let band = prepare(crate::backend::staging::rows_to_device(frame, y, y1, device));
        let (ph, pw) = ((th - (y1 - y)) as i64, (wp - w) as i64);
        let band = if ph > 0 || pw > 0 { band.constant_pad_nd([0, pw, 0, ph]) } else { band };
        for chunk in xs.chunks(sw.batch_size) {
            let at: Vec<(i64, i64)> = chunk.iter().map(|&x| (0, x as i64)).collect();
            let pred = predict_tiles(&band, &at, sw.tile, k, predict, (&mut done, total), monitor)?;
            blend(&pred, &at, sw.tile, &gauss, (&acc, &wsum));
        }
        // rows before the next band's start are final
        let next = if bi + 1 < ys.len() { ys[bi + 1] } else { h.max(th) };
        let end = next.min(h);
        if end > y {
            let n = (end - y) as i64;
            let rows = acc.narrow(1, 0, n).narrow(2, 0, w as i64) / wsum.narrow(1, 0, n).narrow(2, 0, w as i64);
            sink(y, &rows)?;
        }
    }
    Ok(())
}

/// Adds the Gaussian-weighted predictions `pred` `(N, K, th, tw)` of the tiles at `at`
/// (rows and columns within the accumulator) into `acc` and their weights into `wsum`.
fn blend(pred: &Tensor, at: &[(i64, i64)], [th, tw]: [usize; 2], gauss: &Tensor, (acc, wsum): (&Tensor, &Tensor)) {
    let weighted = pred.to_kind(Kind::Float) * gauss;
    let (th_, tw_) = (th as i64, tw as i64);
    for (i, &(y, x)) in at.iter().enumerate() {
        let mut a = acc.narrow(1, y, th_).narrow(2, x, tw_);
        a += weighted.get(i as i64);
        let mut ws = wsum.narrow(1, y, th_).narrow(2, x, tw_);
        ws += gauss;
    }
}

/// Predicts one batch of tiles cut from `input` at `at` (`(N, K, th, tw)`, checked) and
/// reports progress (`done` of `total` tiles).
fn predict_tiles(
    input: &Tensor,
    at: &[(i64, i64)],
    [th, tw]: [usize; 2],
    k: i64,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    (done, total): (&mut usize, usize),
    monitor: &mut Monitor,
) -> Result<Tensor> {
    monitor.check()?;
    let (th_, tw_) = (th as i64, tw as i64);
    let batch = Tensor::cat(&at.iter().map(|&(y, x)| input.narrow(2, y, th_).narrow(3, x, tw_)).collect::<Vec<_>>(), 0);
    let pred = predict(&batch)?;
    check_prediction(&pred, at.len(), k, th, tw)?;
    *done += at.len();
    let mut pr = Progress::new(Stage::Inference);
    pr.iteration = *done;
    pr.iterations = total;
    monitor.emit(pr);
    Ok(pred)
}

/// Whether tiles of `tile` pixels at `starts` cover `0..size` edge to edge without
/// overlapping (sliding-window step 1.0 on a multiple of the tile).
fn edge_to_edge(starts: &[usize], tile: usize, size: usize) -> bool {
    starts.len() * tile == size && starts.iter().enumerate().all(|(i, &s)| s == i * tile)
}

fn check_prediction(pred: &Tensor, n: usize, k: i64, th: usize, tw: usize) -> Result<()> {
    let ps = pred.size();
    if ps.len() != 4 || ps[0] != n as i64 || ps[1] != k || ps[2] != th as i64 || ps[3] != tw as i64 {
        return Err(Error::Shape(format!("a tile prediction has shape {ps:?}; expected [{n}, {k}, {th}, {tw}]")));
    }
    Ok(())
}

/// [`sliding_window`] for a frame that fits on the device: one host-to-device copy and one
/// `prepare` of the whole frame, batches of `batch_size` tiles taken in reading order across
/// rows of tiles (full batches however the tiles fall into rows), one accumulator for the
/// frame, and one `sink` call with every row at the end (one device-to-host transfer).
/// Tiles that cover the frame edge to edge (step 1.0 on a multiple of the tile) are put in
/// place without blending: every pixel has one prediction, which the blend would give back.
#[allow(clippy::too_many_arguments)]
fn whole_frame(
    frame: ArrayView3<f32>,
    sw: &SlidingWindow,
    out_channels: usize,
    device: Device,
    prepare: &dyn Fn(Tensor) -> Tensor,
    predict: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    monitor: &mut Monitor,
) -> Result<()> {
    let (_, h, w) = frame.dim();
    let [th, tw] = sw.tile;
    let (hp, wp) = (h.max(th), w.max(tw));
    let k = out_channels as i64;
    let ys = tile_starts(h, th, sw.step_fraction);
    let xs = tile_starts(w, tw, sw.step_fraction);
    let tiles: Vec<(i64, i64)> = ys.iter().flat_map(|&y| xs.iter().map(move |&x| (y as i64, x as i64))).collect();
    let grid = edge_to_edge(&ys, th, hp) && edge_to_edge(&xs, tw, wp);
    // edge to edge the predictions are put in place; else blended into accumulators, with
    // weights made before the frame's copy (their copy from host memory waits for the stream)
    let opts = (Kind::Float, device);
    let blending = (!grid).then(|| {
        (
            gaussian_importance(th, tw, device),
            Tensor::zeros([k, hp as i64, wp as i64], opts),
            Tensor::zeros([1, hp as i64, wp as i64], opts),
        )
    });
    let raw = crate::backend::staging::rows_to_device(frame, 0, h, device);
    // the finiteness check: one reduction on the device, read after the first batch of
    // predictions (read now, it would hold the host until the frame's copy had finished;
    // after the first batch, the copy has finished); the host search runs only to name the
    // offending pixel
    let finite = raw.isfinite().all();
    let check = move || -> Result<()> {
        if !bool::try_from(&finite)? {
            check_finite(frame)?;
            return Err(Error::InvalidInput(
                "the frame has a NaN or infinite pixel; all pixels must be finite numbers".into(),
            ));
        }
        Ok(())
    };
    let input = prepare(raw);
    let (ph, pw) = ((hp - h) as i64, (wp - w) as i64);
    let input = if ph > 0 || pw > 0 { input.constant_pad_nd([0, pw, 0, ph]) } else { input };
    let mut preds = Vec::new();
    let mut done = 0usize;
    for (i, chunk) in tiles.chunks(sw.batch_size).enumerate() {
        let pred = predict_tiles(&input, chunk, sw.tile, k, predict, (&mut done, tiles.len()), monitor)?;
        match &blending {
            Some((gauss, acc, wsum)) => blend(&pred, chunk, sw.tile, gauss, (acc, wsum)),
            None => preds.push(pred.to_kind(Kind::Float)),
        }
        if i == 0 {
            check()?;
        }
    }
    let rows = match blending {
        Some((_, acc, wsum)) => acc / wsum,
        None => {
            // (ny * nx, K, th, tw) in reading order -> (K, ny * th, nx * tw)
            let (ny, nx, th_, tw_) = (ys.len() as i64, xs.len() as i64, th as i64, tw as i64);
            let all = Tensor::cat(&preds, 0);
            drop(preds);
            all.view([ny, nx, k, th_, tw_]).permute([2, 0, 3, 1, 4]).reshape([k, ny * th_, nx * tw_])
        }
    };
    sink(0, &rows.narrow(1, 0, h as i64).narrow(2, 0, w as i64))
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
        if self.tile == 0 || !self.tile.is_multiple_of(divisor) || self.tile > MAX_TILE_SIDE {
            return Err(Error::InvalidArgument(format!(
                "tile {} must be a positive multiple of {divisor} (the network's downsampling factor), at most {MAX_TILE_SIDE}",
                self.tile
            )));
        }
        if self.keep < 2
            || self.keep > self.tile
            || !self.keep.is_multiple_of(2)
            || !(self.tile - self.keep).is_multiple_of(2)
        {
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
#[allow(clippy::type_complexity)] // reason: the three callbacks are the function's interface, each named by its parameter
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
            if ps.len() != 4 || ps[0] != chunk.len() as i64 || ps[1] != out_channels as i64 || ps[2] != t || ps[3] != t
            {
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
            sink(
                i * ct.keep,
                col0,
                &block.narrow(1, 0, n_rows).narrow(2, 0, n_cols).to_device(Device::Cpu).to_kind(Kind::Float),
            )?;
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
    use ndarray::{Array3, s};

    #[test]
    fn steps_cover_the_axis() {
        assert_eq!(tile_starts(256, 256, 0.5), vec![0]);
        assert_eq!(tile_starts(100, 256, 0.5), vec![0]);
        assert_eq!(tile_starts(512, 256, 0.5), vec![0, 128, 256]);
        let s = tile_starts(1000, 256, 0.5);
        assert_eq!(*s.last().unwrap(), 1000 - 256);
        assert!(s.windows(2).all(|w| w[1] - w[0] <= 128));
    }

    /// Sizes from callers are bounded: an absurd tile or a sub-pixel step is an error that
    /// names the setting, never an allocation that aborts the process.
    #[test]
    fn absurd_tiles_and_steps_are_refused() {
        let ok = SlidingWindow { tile: [256, 256], step_fraction: 0.5, batch_size: 4 };
        assert!(ok.validate(32).is_ok());
        let msg = |sw: SlidingWindow| sw.validate(32).unwrap_err().to_string();
        assert!(msg(SlidingWindow { tile: [1 << 40, 1 << 40], ..ok }).contains("at most 16384"));
        assert!(msg(SlidingWindow { tile: [16384, 16384], ..ok }).contains("at most 67108864"));
        assert!(SlidingWindow { tile: [16384, 4096], ..ok }.validate(32).is_ok());
        assert!(msg(SlidingWindow { step_fraction: 1e-12, ..ok }).contains("under one pixel"));
        assert!(SlidingWindow { step_fraction: 1.0 / 256.0, ..ok }.validate(32).is_ok());
        let ct = CentreTiles { tile: 64, keep: 32, batch_size: 4 };
        assert!(ct.validate(32).is_ok());
        assert!(CentreTiles { tile: 1 << 40, ..ct }.validate(32).unwrap_err().to_string().contains("at most 16384"));
    }

    /// An identity "network" must give back the input exactly, whatever the tiling, with
    /// the frame predicted in one piece (the CUDA path, run here on the CPU; tiles edge to
    /// edge are put in place without blending) or band by band; a non-identity `prepare`
    /// (an affine map) is applied exactly once to every pixel.
    #[test]
    fn identity_is_reconstructed() {
        for (h, w, t, step, whole) in [
            (37usize, 53usize, 16usize, 0.5, true),
            (64, 64, 64, 0.5, true),
            (10, 70, 32, 0.5, true),
            (100, 33, 32, 0.5, true),
            (64, 96, 32, 1.0, true),
            (20, 96, 32, 1.0, true),
            (37, 53, 16, 0.5, false),
            (10, 70, 32, 0.5, false),
            (100, 33, 32, 0.5, false),
            (64, 96, 32, 1.0, false),
        ] {
            let frame = Array3::from_shape_fn((2, h, w), |(c, y, x)| (c * 1000 + y * 7 + x) as f32);
            let sw = SlidingWindow { tile: [t, t], step_fraction: step, batch_size: 3 };
            let mut out = Array3::<f32>::zeros((2, h, w));
            let mut next_row = 0;
            sliding_window_with(
                frame.view(),
                &sw,
                2,
                Device::Cpu,
                &|t| t * 2.0 - 1.0,
                &mut |b| Ok((b + 1.0) / 2.0),
                &mut |r0, rows| {
                    assert_eq!(r0, next_row, "rows arrive in order");
                    let a = crate::image::tensor_to_array3(rows)?;
                    next_row += a.shape()[1];
                    out.slice_mut(s![.., r0..r0 + a.shape()[1], ..]).assign(&a);
                    Ok(())
                },
                &mut Monitor::none(),
                whole,
            )
            .unwrap();
            assert_eq!(next_row, h);
            let err = out.iter().zip(frame.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-2, "{h}x{w} tile {t} step {step}, whole frame {whole}: max error {err}");
        }
    }

    /// A NaN or infinite pixel fails the frame, naming the pixel, before the sink sees a
    /// row, in one piece (checked on the device, read after the predictions) or band by band.
    #[test]
    fn non_finite_pixels_fail_before_any_row() {
        for (bad, whole, step) in
            [(f32::NAN, true, 0.5), (f32::INFINITY, true, 0.5), (f32::NAN, true, 1.0), (f32::NAN, false, 0.5)]
        {
            let mut frame = Array3::<f32>::zeros((2, 48, 48));
            frame[[1, 33, 7]] = bad;
            let sw = SlidingWindow { tile: [16, 16], step_fraction: step, batch_size: 4 };
            let mut rows_seen = 0;
            let r = sliding_window_with(
                frame.view(),
                &sw,
                1,
                Device::Cpu,
                &|t| t,
                &mut |b| Ok(b.narrow(1, 0, 1)),
                &mut |_, _| {
                    rows_seen += 1;
                    Ok(())
                },
                &mut Monitor::none(),
                whole,
            );
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("channel 1, row 33, column 7"), "{bad}, whole frame {whole}, step {step}: {msg}");
            assert_eq!(rows_seen, 0, "{bad}, whole frame {whole}, step {step}: rows reached the sink");
        }
    }

    /// Tiles are put in place without blending only where they cover the axis edge to edge.
    #[test]
    fn edge_to_edge_tiles_are_recognized() {
        assert!(edge_to_edge(&tile_starts(1024, 256, 1.0), 256, 1024));
        assert!(edge_to_edge(&tile_starts(100, 256, 1.0), 256, 256), "one padded tile");
        assert!(!edge_to_edge(&tile_starts(1024, 256, 0.5), 256, 1024));
        assert!(!edge_to_edge(&tile_starts(1000, 256, 1.0), 256, 1000), "the last tile overlaps");
        assert!(!edge_to_edge(&[0, 250, 512, 768], 256, 1024));
        assert!(!edge_to_edge(&[0, 256], 256, 1024), "short of the end");
    }

    #[test]
    fn cancel_stops_work() {
        let frame = Array3::<f32>::zeros((1, 64, 64));
        let sw = SlidingWindow { tile: [16, 16], step_fraction: 0.5, batch_size: 1 };
        let token = crate::engine::progress::CancelToken::new();
        token.cancel();
        let mut m = Monitor { progress: None, cancel: Some(token) };
        let r = sliding_window(
            frame.view(),
            &sw,
            1,
            Device::Cpu,
            &|t| t,
            &mut |b| Ok(b.shallow_clone()),
            &mut |_, _| Ok(()),
            &mut m,
        );
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
                    let v: Vec<Tensor> = chunk
                        .iter()
                        .map(|&cx| crate::musplit::lc::crops(&frame, cy, cx, t as i64, 1).unsqueeze(0))
                        .collect();
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
