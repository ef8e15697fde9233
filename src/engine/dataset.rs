//! Training data on disk: the engine's folder convention.
//!
//! ```text
//! DIR/images/NAME.tif   (C, H, W) image (any TIFF the reader accepts)
//! DIR/masks/NAME.tif    (H, W) label mask, 0 = background, 1..K-1 = classes,
//!                       or instance labels (one id per cell, any number of cells)
//! DIR/instances/NAME.tif  optional: instance labels, whose classes DIR/masks gives
//! ```
//! A folder with `train/images` (as the simulators write) is accepted as well.
//!
//! [`MaskMode`] says how masks are read. By default (`auto`) 8-bit masks are classes and
//! wider masks (16- or 32-bit integers, as Cellpose, StarDist and lumos write instance
//! labels) are instances. With instances the targets a network learns are derived from
//! them ([`crate::engine::instances`]); when `DIR/instances` holds the labels, each cell
//! takes the class that most of its pixels have in `DIR/masks` (PG-DiffSeg's live and
//! dead cells, for example).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::instances::{InstanceSpec, InstanceTargets, targets_from_instances};
use crate::error::{Error, Result};
use crate::image::{Image, Labels, Mask};
use crate::io::tiff;

/// How the masks of a training folder are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MaskMode {
    /// 8-bit masks are classes; 16-bit or wider masks are instance labels.
    #[default]
    Auto,
    /// Class labels 0..=255, whatever the file's bit width.
    Classes,
    /// Instance labels: `DIR/instances` when present (classes from `DIR/masks`), else
    /// `DIR/masks` (every cell one class, "cell").
    Instances,
}

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
        // the mask of the same name, with any TIFF extension in any case (a.TIF, a.tiff)
        let mask = ["tif", "tiff", "TIF", "TIFF", "Tif", "Tiff"]
            .iter()
            .map(|e| mask_dir.join(format!("{stem}.{e}")))
            .find(|m| m.is_file())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "image '{}' has no mask '{}/{stem}.tif'",
                    p.display(),
                    mask_dir.display()
                ))
            })?;
        out.push((stem, p, mask));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    // a.tif and a.tiff would be two samples sharing one mask
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::InvalidArgument(format!(
            "'{}' and '{}' have the same name; keep one image per name",
            w[0].1.display(),
            w[1].1.display()
        )));
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!("'{}' holds no .tif images", img_dir.display())));
    }
    Ok(out)
}

/// Loads every image and class mask of a folder and checks that they agree.
pub fn load_folder(dir: &Path) -> Result<Vec<Sample>> {
    Ok(load_segmentation(dir, MaskMode::Classes, InstanceTargets::Boundary)?.samples)
}

/// A segmentation folder, loaded: samples whose masks are the targets to learn, and how
/// those relate to instances when the masks were instance labels.
pub struct Loaded {
    pub samples: Vec<Sample>,
    pub instances: Option<InstanceSpec>,
}

/// The `instances/NAME.tif` beside a folder's `masks/`, if there is one.
fn instance_file(mask: &Path, name: &str) -> Option<PathBuf> {
    let dir = mask.parent()?.parent()?.join("instances");
    ["tif", "tiff", "TIF", "TIFF"].iter().map(|e| dir.join(format!("{name}.{e}"))).find(|p| p.is_file())
}

/// Class labels from a label image read at any width: every value must fit in 0..=255.
fn to_classes(path: &Path, l: Labels) -> Result<Mask> {
    if let Some(((y, x), v)) = l.indexed_iter().find(|(_, v)| **v > 255) {
        return Err(Error::InvalidInput(format!(
            "mask '{}' has label {v} at (row {y}, column {x}); class masks hold labels 0..=255. If the masks are \
             instance labels (one id per cell), train with masks = \"instances\" (--masks instances)",
            path.display()
        )));
    }
    Ok(l.mapv(|v| v as u8))
}

/// Loads every image and mask of a folder, reading the masks as `mode` says; instance
/// masks become `targets`.
pub fn load_segmentation(dir: &Path, mode: MaskMode, targets: InstanceTargets) -> Result<Loaded> {
    let mut out: Vec<Sample> = Vec::new();
    // (instance labels, class mask) per sample, when training from instances
    let mut inst: Vec<(Labels, Option<Mask>)> = Vec::new();
    let mut any_wide = false;
    let mut raw: Vec<(PathBuf, Labels, Option<PathBuf>)> = Vec::new();
    for (name, ip, mp) in list_pairs(dir)? {
        let image = tiff::read_image(&ip)?;
        let read = tiff::read_labels(&mp)?;
        any_wide |= read.wide;
        check_same_size(&ip, &image, &mp, read.labels.dim())?;
        if let Some(first) = out.first() {
            check_same_channels(&ip, first, &image)?;
        }
        image.check_finite().map_err(|e| Error::InvalidInput(format!("'{}': {e}", ip.display())))?;
        let ipath = if mode == MaskMode::Instances { instance_file(&mp, &name) } else { None };
        raw.push((mp, read.labels, ipath));
        out.push(Sample { name, image, mask: Mask::zeros((0, 0)) });
    }
    let instances = match mode {
        MaskMode::Classes => false,
        MaskMode::Instances => true,
        MaskMode::Auto => any_wide,
    };
    if !instances {
        for (s, (mp, l, _)) in out.iter_mut().zip(raw) {
            s.mask = to_classes(&mp, l)?;
        }
        binary_255_to_1(&mut out);
        return Ok(Loaded { samples: out, instances: None });
    }
    if mode == MaskMode::Auto {
        log::info!("the masks are 16-bit or wider: reading them as instance labels (one id per cell)");
    }
    for (s, (mp, l, ipath)) in out.iter().zip(raw) {
        match ipath {
            Some(ip) => {
                let labels = tiff::read_labels(&ip)?.labels;
                check_same_size(&ip, &s.image, &ip, labels.dim())?;
                inst.push((labels, Some(to_classes(&mp, l)?)));
            }
            None => inst.push((l, None)),
        }
    }
    // class masks of 0 / 255 (ImageJ binary) mean one class
    binary_masks_255_to_1(inst.iter_mut().filter_map(|(_, c)| c.as_mut()).collect());
    let max_class =
        inst.iter().filter_map(|(_, c)| c.as_ref()).flat_map(|c| c.iter().copied()).max().unwrap_or(1).max(1);
    if max_class == u8::MAX {
        return Err(Error::InvalidInput("class masks use label 255; with instances at most 254 classes fit".into()));
    }
    let boundary = max_class + 1;
    for (s, (l, c)) in out.iter_mut().zip(&inst) {
        s.mask = targets_from_instances(l, c.as_ref(), targets, boundary)?;
    }
    let spec = InstanceSpec { targets, boundary_class: (targets == InstanceTargets::Boundary).then_some(boundary) };
    Ok(Loaded { samples: out, instances: Some(spec) })
}

fn check_same_size(ip: &Path, image: &Image, mp: &Path, dim: (usize, usize)) -> Result<()> {
    if (image.height(), image.width()) != dim {
        return Err(Error::Shape(format!(
            "image '{}' is {} x {} but its mask '{}' is {} x {}",
            ip.display(),
            image.height(),
            image.width(),
            mp.display(),
            dim.0,
            dim.1
        )));
    }
    Ok(())
}

fn check_same_channels(ip: &Path, first: &Sample, image: &Image) -> Result<()> {
    // names read from the files (ImageJ labels) must agree: the model records them, and
    // a different order means different inputs per channel
    let generated = |names: &[String]| names.iter().enumerate().all(|(i, n)| *n == format!("ch{i}"));
    let (a, b) = (&first.image.channel_names, &image.channel_names);
    if a.len() == b.len() && a != b && !generated(a) && !generated(b) {
        return Err(Error::InvalidInput(format!(
            "image '{}' has channels {b:?} but '{}' has {a:?}; all images must have the same channels in the same order",
            ip.display(),
            first.name
        )));
    }
    if first.image.channels() != image.channels() {
        return Err(Error::Shape(format!(
            "image '{}' has {} channels but '{}' has {}; all images must have the same channels",
            ip.display(),
            image.channels(),
            first.name,
            first.image.channels()
        )));
    }
    Ok(())
}

/// Which of the labels 0..=255 occur in the samples' masks.
pub fn labels_used(samples: &[Sample]) -> [bool; 256] {
    let mut used = [false; 256];
    for s in samples {
        for &v in s.mask.iter() {
            used[v as usize] = true;
        }
    }
    used
}

/// Masks that hold only 0 and 255 are ImageJ binary masks (Process > Binary > Convert to
/// Mask writes 0 / 255): read as background 0 and class 1, not as 256 classes of which 254
/// never occur. Returns whether they were converted.
pub fn binary_255_to_1(samples: &mut [Sample]) -> bool {
    binary_masks_255_to_1(samples.iter_mut().map(|s| &mut s.mask).collect())
}

fn binary_masks_255_to_1(mut masks: Vec<&mut Mask>) -> bool {
    let mut used = [false; 256];
    for m in &masks {
        for &v in m.iter() {
            used[v as usize] = true;
        }
    }
    let only_0_255 = used[255] && used[1..255].iter().all(|&u| !u);
    if only_0_255 {
        log::warn!("the masks hold only 0 and 255 (ImageJ binary masks): reading 255 as class 1");
        for m in masks.iter_mut() {
            m.mapv_inplace(|v| if v == 255 { 1 } else { v });
        }
    }
    only_0_255
}

/// Splits `0..n` into (train, validation) indices, reproducibly from `seed`: a shuffled
/// `val_fraction` of the items (at least one when > 0 and n >= 2) is held out; both lists
/// are sorted.
pub fn split_indices(n: usize, val_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_val =
        if val_fraction > 0.0 && n >= 2 { ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1) } else { 0 };
    let (val, train) = order.split_at(n_val);
    let (mut train, mut val) = (train.to_vec(), val.to_vec());
    train.sort();
    val.sort();
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};

    fn sample(labels: &[u8]) -> Sample {
        let mask = Array2::from_shape_vec((1, labels.len()), labels.to_vec()).unwrap();
        Sample { name: "s".into(), image: Image::new(Array3::zeros((1, 1, labels.len()))), mask }
    }

    #[test]
    fn imagej_binary_masks_become_class_1() {
        let mut s = vec![sample(&[0, 255, 255]), sample(&[0, 0, 255])];
        assert!(binary_255_to_1(&mut s));
        assert_eq!(s[0].mask.as_slice().unwrap(), &[0, 1, 1]);
        assert_eq!(s[1].mask.as_slice().unwrap(), &[0, 0, 1]);
        // anything else is left alone
        let mut t = vec![sample(&[0, 1, 255])];
        assert!(!binary_255_to_1(&mut t));
        assert_eq!(t[0].mask.as_slice().unwrap(), &[0, 1, 255]);
    }
}
