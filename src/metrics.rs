//! Segmentation metrics: Dice, IoU, precision, recall and F1 per class, per image,
//! and their mean +/- std over images. Pixel-wise F1 equals Dice; both are reported
//! because the papers quote one or the other.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::Mask;

/// Scores of one class in one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Per-class scores of one image; `classes[k]` is class `k` (0 = background).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    pub classes: Vec<ClassScores>,
}

/// Convention for a class absent from both prediction and truth: a perfect score (1.0).
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 { 1.0 } else { num / den }
}

/// Scores of `pred` against `truth` for classes `0..n_classes`.
pub fn score(pred: &Mask, truth: &Mask, n_classes: usize) -> Result<ImageScores> {
    if pred.dim() != truth.dim() {
        return Err(Error::Shape(format!("prediction is {:?} but ground truth is {:?}", pred.dim(), truth.dim())));
    }
    let mut tp = vec![0u64; n_classes];
    let mut fp = vec![0u64; n_classes];
    let mut fneg = vec![0u64; n_classes];
    for (&p, &t) in pred.iter().zip(truth.iter()) {
        let (p, t) = (p as usize, t as usize);
        if p >= n_classes || t >= n_classes {
            return Err(Error::InvalidInput(format!("label {} found; expected labels 0..{}", p.max(t), n_classes)));
        }
        if p == t {
            tp[p] += 1;
        } else {
            fp[p] += 1;
            fneg[t] += 1;
        }
    }
    let classes = (0..n_classes)
        .map(|k| {
            let (tp, fp, fneg) = (tp[k] as f64, fp[k] as f64, fneg[k] as f64);
            let dice = ratio(2.0 * tp, 2.0 * tp + fp + fneg);
            ClassScores {
                dice,
                iou: ratio(tp, tp + fp + fneg),
                precision: ratio(tp, tp + fp),
                recall: ratio(tp, tp + fneg),
                f1: dice,
            }
        })
        .collect();
    Ok(ImageScores { classes })
}

impl ImageScores {
    /// Mean Dice over the foreground classes (1..K), or class 0 if there is only one.
    pub fn mean_fg_dice(&self) -> f64 {
        mean(&self.fg().map(|c| c.dice).collect::<Vec<_>>())
    }
    pub fn mean_fg_iou(&self) -> f64 {
        mean(&self.fg().map(|c| c.iou).collect::<Vec<_>>())
    }
    /// Mean IoU over all classes, background included (mIoU as in the PG-DiffSeg paper).
    pub fn miou(&self) -> f64 {
        mean(&self.classes.iter().map(|c| c.iou).collect::<Vec<_>>())
    }
    fn fg(&self) -> impl Iterator<Item = &ClassScores> {
        let skip = if self.classes.len() > 1 { 1 } else { 0 };
        self.classes.iter().skip(skip)
    }
}

/// Mean and sample standard deviation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl std::fmt::Display for MeanStd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} ± {:.3}", self.mean, self.std)
    }
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// Mean and sample standard deviation (n-1); std is 0 for a single value.
pub fn mean_std(v: &[f64]) -> MeanStd {
    let m = mean(v);
    let std = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    MeanStd { mean: m, std, n: v.len() }
}

/// Aggregate over images: per-class Dice and IoU mean +/- std, and the foreground means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub dice_per_class: Vec<MeanStd>,
    pub iou_per_class: Vec<MeanStd>,
    pub f1_per_class: Vec<MeanStd>,
    pub mean_fg_dice: MeanStd,
    pub mean_fg_iou: MeanStd,
    pub miou: MeanStd,
}

pub fn summarize(images: &[ImageScores]) -> Summary {
    let k = images.first().map(|s| s.classes.len()).unwrap_or(0);
    let per = |f: &dyn Fn(&ClassScores) -> f64| -> Vec<MeanStd> {
        (0..k).map(|c| mean_std(&images.iter().map(|s| f(&s.classes[c])).collect::<Vec<_>>())).collect()
    };
    Summary {
        dice_per_class: per(&|c| c.dice),
        iou_per_class: per(&|c| c.iou),
        f1_per_class: per(&|c| c.f1),
        mean_fg_dice: mean_std(&images.iter().map(|s| s.mean_fg_dice()).collect::<Vec<_>>()),
        mean_fg_iou: mean_std(&images.iter().map(|s| s.mean_fg_iou()).collect::<Vec<_>>()),
        miou: mean_std(&images.iter().map(|s| s.miou()).collect::<Vec<_>>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn known_case() {
        let truth: Mask = array![[0, 1, 1, 0], [0, 1, 1, 0]];
        let pred: Mask = array![[0, 1, 0, 0], [1, 1, 1, 0]];
        let s = score(&pred, &truth, 2).unwrap();
        // class 1: tp 3, fp 1, fn 1
        assert!((s.classes[1].dice - 6.0 / 8.0).abs() < 1e-12);
        assert!((s.classes[1].iou - 3.0 / 5.0).abs() < 1e-12);
        assert!((s.classes[1].precision - 0.75).abs() < 1e-12);
        // class 0: tp 3, fp 1, fn 1
        assert!((s.classes[0].iou - 0.6).abs() < 1e-12);
        assert!((s.miou() - 0.6).abs() < 1e-12);
        let ms = mean_std(&[1.0, 3.0]);
        assert_eq!(ms.mean, 2.0);
        assert!((ms.std - 2f64.sqrt()).abs() < 1e-12);
        assert!(score(&pred, &array![[0u8]], 2).is_err());
        assert!(score(&array![[3u8]], &array![[0u8]], 2).is_err());
    }
}
