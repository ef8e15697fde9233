//! Overlay pictures of a prediction against the ground truth, as in the DM-QPMNet paper's
//! figure: yellow = agreement, green = ground truth only, red = prediction only, over the
//! grayscale image.

use std::path::Path;

use ndarray::ArrayView2;

use crate::error::{Error, Result};
use crate::image::Mask;

/// An RGB picture, row-major.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Maps `gray` to 0..255 between its 1st and 99th percentiles.
fn to_u8(gray: ArrayView2<f32>) -> Vec<u8> {
    let mut v: Vec<f32> = gray.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return vec![0; gray.len()];
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let lo = v[v.len() / 100];
    // a flat image maps to black; otherwise the 1-99 % range, however small its units
    // (an absolute floor here turned images in metres into black)
    let hi = v[(v.len() * 99) / 100];
    let hi = if hi > lo { hi } else { lo + 1.0 };
    gray.iter().map(|&x| (((x - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0) as u8).collect()
}

/// The overlay of `pred` (and `truth`, if given) on `gray`, all `(H, W)`.
pub fn overlay(gray: ArrayView2<f32>, pred: &Mask, truth: Option<&Mask>) -> Rgb {
    let (h, w) = gray.dim();
    let g = to_u8(gray);
    let mut data = Vec::with_capacity(h * w * 3);
    for (i, &gv) in g.iter().enumerate() {
        let (y, x) = (i / w, i % w);
        let p = pred[[y, x]] > 0;
        let t = truth.map(|t| t[[y, x]] > 0);
        let base = gv as f32 * 0.6;
        let tint: Option<[f32; 3]> = match (p, t) {
            (true, Some(true)) => Some([255.0, 220.0, 0.0]),
            (false, Some(true)) => Some([0.0, 200.0, 0.0]),
            (true, Some(false)) | (true, None) => Some([230.0, 30.0, 30.0]),
            _ => None,
        };
        match tint {
            Some(c) => data.extend(c.iter().map(|&cv| (base * 0.5 + cv * 0.5) as u8)),
            None => data.extend([gv, gv, gv]),
        }
    }
    Rgb { width: w, height: h, data }
}

/// Tiles pictures of equal size into a grid `cols` wide.
pub fn montage(pics: &[Rgb], cols: usize) -> Result<Rgb> {
    let first = pics.first().ok_or_else(|| Error::InvalidArgument("no pictures for the montage".into()))?;
    let (pw, ph) = (first.width, first.height);
    if pics.iter().any(|p| p.width != pw || p.height != ph) {
        return Err(Error::Shape("montage pictures must have the same size".into()));
    }
    let cols = cols.max(1).min(pics.len());
    let rows = pics.len().div_ceil(cols);
    let (gap, w, h) = (4, cols * pw + (cols - 1) * 4, rows * ph + (rows - 1) * 4);
    let mut data = vec![255u8; w * h * 3];
    for (k, p) in pics.iter().enumerate() {
        let (oy, ox) = ((k / cols) * (ph + gap), (k % cols) * (pw + gap));
        for y in 0..ph {
            let src = &p.data[y * pw * 3..(y + 1) * pw * 3];
            let d0 = ((oy + y) * w + ox) * 3;
            data[d0..d0 + pw * 3].copy_from_slice(src);
        }
    }
    Ok(Rgb { width: w, height: h, data })
}

/// Writes an RGB PNG atomically.
pub fn write_png(path: &Path, pic: &Rgb) -> Result<()> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, pic.width as u32, pic.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| Error::InvalidArgument(format!("PNG: {e}")))?;
        wr.write_image_data(&pic.data).map_err(|e| Error::InvalidArgument(format!("PNG: {e}")))?;
    }
    crate::engine::weights::write_atomic(path, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn contrast_does_not_depend_on_the_units() {
        let ramp = Array2::from_shape_fn((10, 10), |(y, x)| (y * 10 + x) as f32);
        let metres = ramp.mapv(|v| 3e-7 + 1e-10 * v);
        let a = to_u8(ramp.view());
        let b = to_u8(metres.view());
        assert_eq!(*a.iter().max().unwrap(), 255);
        assert!(a.iter().zip(&b).all(|(x, y)| x.abs_diff(*y) <= 1), "an image in metres keeps its contrast");
        assert!(to_u8(Array2::from_elem((4, 4), 5.0f32).view()).iter().all(|&v| v == 0), "a flat image is black");
    }
}
