//! Training data on disk: the engine's folder convention.
//!
//! ```text
//! DIR/images/NAME.tif   (C, H, W) image (any TIFF the reader accepts)
//! DIR/masks/NAME.tif    (H, W) label mask, 0 = background, 1..K-1 = classes
//! ```
//! A folder with `train/images` (as the simulators write) is accepted as well.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::{Image, Mask};
use crate::io::tiff;

/// One labelled image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub image: Image,
    pub mask: Mask,
}

pub(crate) fn is_tiff(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(), Some("tif" | "tiff"))
}

/// Resolves `dir` to the folder that holds `images/` and `masks/`.
pub fn resolve_folder(dir: &Path) -> Result<PathBuf> {
    for cand in [dir.to_path_buf(), dir.join("train")] {
        if cand.join("images").is_dir() {
            return Ok(cand);
        }
    }
    Err(Error::InvalidArgument(format!(
        "'{}' has no images/ folder; expected DIR/images/*.tif with DIR/masks/*.tif of the same names (or DIR/train/images)",
        dir.display()
    )))
}

/// Lists `images/*.tif` with their masks, sorted by name.
pub fn list_pairs(dir: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let root = resolve_folder(dir)?;
    let img_dir = root.join("images");
    let mask_dir = root.join("masks");
    let mut out = Vec::new();
    let rd = std::fs::read_dir(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
    for entry in rd {
        let p = entry.map_err(|e| Error::io(&img_dir, e))?.path();
        if !is_tiff(&p) {
            continue;
        }
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let mask = ["tif", "tiff"].iter().map(|e| mask_dir.join(format!("{stem}.{e}"))).find(|m| m.is_file()).ok_or_else(|| {
            Error::InvalidArgument(format!("image '{}' has no mask '{}/{stem}.tif'", p.display(), mask_dir.display()))
        })?;
        out.push((stem, p, mask));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!("'{}' holds no .tif images", img_dir.display())));
    }
    Ok(out)
}

/// Loads every image and mask of a folder and checks that they agree.
pub fn load_folder(dir: &Path) -> Result<Vec<Sample>> {
    let mut out: Vec<Sample> = Vec::new();
    for (name, ip, mp) in list_pairs(dir)? {
        let image = tiff::read_image(&ip)?;
        let mask = tiff::read_mask(&mp)?;
        if (image.height(), image.width()) != mask.dim() {
            return Err(Error::Shape(format!(
                "image '{}' is {} x {} but its mask is {} x {}",
                ip.display(),
                image.height(),
                image.width(),
                mask.dim().0,
                mask.dim().1
            )));
        }
        if let Some(first) = out.first() {
            if first.image.channels() != image.channels() {
                return Err(Error::Shape(format!(
                    "image '{}' has {} channels but '{}' has {}; all images must have the same channels",
                    ip.display(),
                    image.channels(),
                    first.name,
                    first.image.channels()
                )));
            }
        }
        image.check_finite().map_err(|e| Error::InvalidInput(format!("'{}': {e}", ip.display())))?;
        out.push(Sample { name, image, mask });
    }
    Ok(out)
}

/// Splits `0..n` into (train, validation) indices, reproducibly from `seed`: a shuffled
/// `val_fraction` of the items (at least one when > 0 and n >= 2) is held out; both lists
/// are sorted.
pub fn split_indices(n: usize, val_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_val = if val_fraction > 0.0 && n >= 2 { ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1) } else { 0 };
    let (val, train) = order.split_at(n_val);
    let (mut train, mut val) = (train.to_vec(), val.to_vec());
    train.sort();
    val.sort();
    (train, val)
}
