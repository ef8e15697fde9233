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

/// `num / den`; an empty denominator scores 1.0 only for a class absent from both
/// prediction and truth (nothing to get wrong), else 0.0 (precision of a class never
/// predicted though present, recall of a class predicted though absent: scikit-learn's
/// zero_division = 0).
fn ratio(num: f64, den: f64, absent: bool) -> f64 {
    if den == 0.0 { if absent { 1.0 } else { 0.0 } } else { num / den }
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
            let absent = tp + fp + fneg == 0.0;
            let dice = ratio(2.0 * tp, 2.0 * tp + fp + fneg, absent);
            ClassScores {
                dice,
                iou: ratio(tp, tp + fp + fneg, absent),
                precision: ratio(tp, tp + fp, absent),
                recall: ratio(tp, tp + fneg, absent),
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
    let std =
        if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt() } else { 0.0 };
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

// ---------------------------------------------------------------------------------
// Image-restoration metrics (decomposition), as the muSplit evaluation computes them.

/// PSNR (dB) of `pred` against `truth` with the data range `max - min` of the truth; NaN
/// when the prediction holds a non-finite value (a broken output must not score as
/// near-perfect through a clamped error).
pub fn psnr(truth: ndarray::ArrayView2<f32>, pred: ndarray::ArrayView2<f32>) -> Result<f64> {
    same_dim(truth, pred)?;
    if pred.iter().any(|v| !v.is_finite()) {
        return Ok(f64::NAN);
    }
    let (lo, hi) =
        truth.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v as f64), b.max(v as f64)));
    let mse =
        truth.iter().zip(pred.iter()).map(|(&t, &p)| (t as f64 - p as f64).powi(2)).sum::<f64>() / truth.len() as f64;
    Ok(20.0 * (hi - lo).max(1e-12).log10() - 10.0 * mse.max(1e-20).log10())
}

/// Range-invariant PSNR: the truth z-scored, the prediction zero-mean and scaled by the
/// least-squares factor that best matches it to the truth, then PSNR with the z-scored
/// truth's range. Invariant to an affine change of the prediction's intensities.
pub fn range_invariant_psnr(truth: ndarray::ArrayView2<f32>, pred: ndarray::ArrayView2<f32>) -> Result<f64> {
    same_dim(truth, pred)?;
    if pred.iter().any(|v| !v.is_finite()) {
        return Ok(f64::NAN);
    }
    let n = truth.len() as f64;
    let mt = truth.iter().map(|&v| v as f64).sum::<f64>() / n;
    let st = (truth.iter().map(|&v| (v as f64 - mt).powi(2)).sum::<f64>() / n).sqrt().max(1e-12);
    let mp = pred.iter().map(|&v| v as f64).sum::<f64>() / n;
    let t: Vec<f64> = truth.iter().map(|&v| (v as f64 - mt) / st).collect();
    let p: Vec<f64> = pred.iter().map(|&v| v as f64 - mp).collect();
    let pp = p.iter().map(|v| v * v).sum::<f64>();
    let alpha = if pp > 0.0 { t.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>() / pp } else { 0.0 };
    let (lo, hi) = t.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let mse = t.iter().zip(&p).map(|(a, b)| (a - alpha * b).powi(2)).sum::<f64>() / n;
    Ok(20.0 * (hi - lo).max(1e-12).log10() - 10.0 * mse.max(1e-20).log10())
}

/// SSIM as scikit-image computes it by default: 7x7 uniform window, K1 = 0.01,
/// K2 = 0.03, sample covariances, data range = the truth's max - min, averaged over the
/// pixels whose window lies inside the image.
pub fn ssim(truth: ndarray::ArrayView2<f32>, pred: ndarray::ArrayView2<f32>) -> Result<f64> {
    same_dim(truth, pred)?;
    let (h, w) = truth.dim();
    const WIN: usize = 7;
    if h < WIN || w < WIN {
        return Err(Error::Shape(format!("SSIM needs images of at least 7 x 7 pixels; got {h} x {w}")));
    }
    let (lo, hi) =
        truth.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v as f64), b.max(v as f64)));
    let range = (hi - lo).max(1e-12);
    let (c1, c2) = ((0.01 * range).powi(2), (0.03 * range).powi(2));
    // summed-area tables of x, y, x^2, y^2, xy
    let sat = |f: &dyn Fn(f64, f64) -> f64| {
        let mut s = vec![0.0; (h + 1) * (w + 1)];
        for y in 0..h {
            let mut row = 0.0;
            for x in 0..w {
                row += f(truth[[y, x]] as f64, pred[[y, x]] as f64);
                s[(y + 1) * (w + 1) + x + 1] = s[y * (w + 1) + x + 1] + row;
            }
        }
        s
    };
    let tabs = [sat(&|a, _| a), sat(&|_, b| b), sat(&|a, _| a * a), sat(&|_, b| b * b), sat(&|a, b| a * b)];
    let np = (WIN * WIN) as f64;
    let cov_norm = np / (np - 1.0);
    let box_sum = |s: &[f64], y: usize, x: usize| {
        s[(y + WIN) * (w + 1) + x + WIN] - s[y * (w + 1) + x + WIN] - s[(y + WIN) * (w + 1) + x] + s[y * (w + 1) + x]
    };
    let mut total = 0.0;
    let mut count = 0usize;
    for y in 0..=h - WIN {
        for x in 0..=w - WIN {
            let [ux, uy, uxx, uyy, uxy] = [0, 1, 2, 3, 4].map(|i| box_sum(&tabs[i], y, x) / np);
            let vx = cov_norm * (uxx - ux * ux);
            let vy = cov_norm * (uyy - uy * uy);
            let vxy = cov_norm * (uxy - ux * uy);
            let s = ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
            total += s;
            count += 1;
        }
    }
    Ok(total / count as f64)
}

/// KL divergence `KL(p || N(0, 1))` of the density `p` of `values`, estimated with a
/// Gaussian kernel density estimate (Scott's bandwidth `sigma n^(-1/5)`, as
/// `scipy.stats.gaussian_kde`), integrated numerically on [-10, 10] (2001 points). At
/// most 2048 values are used (evenly strided). PG-DiffSeg's measure of how Gaussian a
/// starting noise is: 0 for a standard normal, `mu^2 / 2` for N(mu, 1). Returns
/// infinity for constant input (a point mass).
pub fn kde_kl_to_standard_normal(values: &[f32]) -> f64 {
    let stride = values.len().div_ceil(2048).max(1);
    let v: Vec<f64> = values.iter().step_by(stride).map(|&x| x as f64).filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n < 2 {
        return f64::INFINITY;
    }
    let m = v.iter().sum::<f64>() / n as f64;
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    if sd <= 1e-12 {
        return f64::INFINITY;
    }
    let bw = sd * (n as f64).powf(-0.2);
    let norm = 1.0 / (n as f64 * bw * (2.0 * std::f64::consts::PI).sqrt());
    let (lo, hi, pts) = (-10.0, 10.0, 2001);
    let dx = (hi - lo) / (pts - 1) as f64;
    let mut kl = 0.0;
    for i in 0..pts {
        let x = lo + i as f64 * dx;
        let p: f64 = v.iter().map(|&c| (-0.5 * ((x - c) / bw).powi(2)).exp()).sum::<f64>() * norm;
        if p > 1e-300 {
            let logq = -0.5 * x * x - 0.5 * (2.0 * std::f64::consts::PI).ln();
            kl += p * (p.ln() - logq) * dx;
        }
    }
    kl.max(0.0)
}

fn same_dim(a: ndarray::ArrayView2<f32>, b: ndarray::ArrayView2<f32>) -> Result<()> {
    if a.dim() != b.dim() || a.is_empty() {
        return Err(Error::Shape(format!(
            "prediction is {:?} but ground truth is {:?} (and must not be empty)",
            b.dim(),
            a.dim()
        )));
    }
    Ok(())
}

/// PSNR, range-invariant PSNR and SSIM of each channel of a decomposition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitScores {
    pub psnr: Vec<f64>,
    pub ri_psnr: Vec<f64>,
    pub ssim: Vec<f64>,
}

/// Scores `(K, H, W)` predictions against `(K, H, W)` truths, channel by channel.
pub fn split_scores(truth: ndarray::ArrayView3<f32>, pred: ndarray::ArrayView3<f32>) -> Result<SplitScores> {
    if truth.dim() != pred.dim() {
        return Err(Error::Shape(format!("prediction is {:?} but ground truth is {:?}", pred.dim(), truth.dim())));
    }
    let mut s = SplitScores { psnr: vec![], ri_psnr: vec![], ssim: vec![] };
    for c in 0..truth.shape()[0] {
        let (t, p) = (truth.index_axis(ndarray::Axis(0), c), pred.index_axis(ndarray::Axis(0), c));
        s.psnr.push(psnr(t, p)?);
        s.ri_psnr.push(range_invariant_psnr(t, p)?);
        s.ssim.push(ssim(t, p)?);
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// Object (instance) metrics
// ---------------------------------------------------------------------------------------

/// The IoU thresholds object metrics are reported at: 0.5, 0.55, ..., 0.9.
pub const IOU_THRESHOLDS: [f64; 9] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9];

/// Matched objects of one or more images at one IoU threshold: sums, from which every
/// score follows (summing over images before dividing, as StarDist's `matching_dataset`
/// with `by_image=False`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObjectCounts {
    pub threshold: f64,
    pub n_true: u64,
    pub n_pred: u64,
    /// Matched pairs (true positives).
    pub tp: u64,
    /// Sum of the matched pairs' IoU.
    pub sum_matched_iou: f64,
}

/// Object scores at one IoU threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObjectScores {
    pub threshold: f64,
    pub n_true: u64,
    pub n_pred: u64,
    pub tp: u64,
    pub fp: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// TP / (TP + FP + FN): the "average precision" of the DSB 2018 challenge, StarDist
    /// and Cellpose (StarDist's `accuracy`).
    pub ap: f64,
    /// Mean IoU of the matched pairs.
    pub mean_matched_iou: f64,
    /// Panoptic quality: sum of matched IoU / (TP + FP/2 + FN/2).
    pub pq: f64,
}

impl ObjectCounts {
    pub fn add(&mut self, o: &ObjectCounts) {
        self.n_true += o.n_true;
        self.n_pred += o.n_pred;
        self.tp += o.tp;
        self.sum_matched_iou += o.sum_matched_iou;
    }

    pub fn scores(&self) -> ObjectScores {
        let (tp, fp, fneg) = (self.tp, self.n_pred - self.tp, self.n_true - self.tp);
        let r = |num: f64, den: f64| {
            if den == 0.0 { if self.n_true == 0 && self.n_pred == 0 { 1.0 } else { 0.0 } } else { num / den }
        };
        let t = tp as f64;
        ObjectScores {
            threshold: self.threshold,
            n_true: self.n_true,
            n_pred: self.n_pred,
            tp,
            fp,
            fn_: fneg,
            precision: r(t, (tp + fp) as f64),
            recall: r(t, (tp + fneg) as f64),
            f1: r(2.0 * t, (2 * tp + fp + fneg) as f64),
            ap: r(t, (tp + fp + fneg) as f64),
            mean_matched_iou: if tp == 0 { 0.0 } else { self.sum_matched_iou / t },
            pq: r(self.sum_matched_iou, t + 0.5 * (fp + fneg) as f64),
        }
    }
}

/// Dense ids 1..=N for the non-zero labels of `l` (sorted by label), and their areas.
fn dense_ids(l: &[u32]) -> (Vec<u32>, Vec<u64>) {
    let mut ids: Vec<u32> = l.iter().copied().filter(|&v| v != 0).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut area = vec![0u64; ids.len() + 1];
    let dense = l
        .iter()
        .map(|v| {
            if *v == 0 {
                0
            } else {
                let d = ids.binary_search(v).expect("present") as u32 + 1;
                area[d as usize] += 1;
                d
            }
        })
        .collect();
    (dense, area)
}

/// Matches the objects of `pred` to those of `truth` at each threshold of `thresholds`
/// (each at least 0.5).
///
/// Matching is one-to-one by IoU: a pair is matched when its IoU is at least the threshold.
/// Pairs are taken greedily in order of decreasing IoU, each object at most once. Above
/// IoU 0.5 an object can overlap at most one other object that much, so the matching is
/// unique. It is then the one StarDist's `matching` finds with its optimal assignment.
/// Labels need not be consecutive; 0 is background in both.
pub fn match_objects(
    truth: &crate::image::Labels,
    pred: &crate::image::Labels,
    thresholds: &[f64],
) -> Result<Vec<ObjectCounts>> {
    if pred.dim() != truth.dim() {
        return Err(Error::Shape(format!("prediction is {:?} but ground truth is {:?}", pred.dim(), truth.dim())));
    }
    if let Some(t) = thresholds.iter().find(|t| !(0.5..=1.0).contains(*t)) {
        return Err(Error::InvalidArgument(format!("IoU threshold {t}; expected thresholds in 0.5..=1")));
    }
    let (t, p) = (truth.as_standard_layout(), pred.as_standard_layout());
    let (td, ta) = dense_ids(t.as_slice().expect("standard layout"));
    let (pd, pa) = dense_ids(p.as_slice().expect("standard layout"));
    let mut inter: std::collections::HashMap<(u32, u32), u64> = std::collections::HashMap::new();
    for (&a, &b) in td.iter().zip(&pd) {
        if a != 0 && b != 0 {
            *inter.entry((a, b)).or_default() += 1;
        }
    }
    let mut pairs: Vec<(f64, u32, u32)> = inter
        .into_iter()
        .map(|((a, b), i)| (i as f64 / (ta[a as usize] + pa[b as usize] - i) as f64, a, b))
        .filter(|(iou, _, _)| *iou >= thresholds.iter().copied().fold(1.0, f64::min))
        .collect();
    // decreasing IoU; ties by ids, so the result does not depend on hash order
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let (n_true, n_pred) = ((ta.len() - 1) as u64, (pa.len() - 1) as u64);
    Ok(thresholds
        .iter()
        .map(|&thr| {
            let mut used_t = vec![false; ta.len()];
            let mut used_p = vec![false; pa.len()];
            let mut c = ObjectCounts { threshold: thr, n_true, n_pred, tp: 0, sum_matched_iou: 0.0 };
            for &(iou, a, b) in pairs.iter().take_while(|p| p.0 >= thr) {
                if !used_t[a as usize] && !used_p[b as usize] {
                    used_t[a as usize] = true;
                    used_p[b as usize] = true;
                    c.tp += 1;
                    c.sum_matched_iou += iou;
                }
            }
            c
        })
        .collect())
}

#[cfg(test)]
mod tests {
    /// Precision of a class present but never predicted, and recall of a class predicted but
    /// absent, are 0 (not the 1.0 of a class absent from both); a NaN prediction has no PSNR.
    #[test]
    fn object_matching_counts_split_and_missed_cells() {
        use crate::image::Labels;
        // truth: three 4x4 cells; prediction: the first exact, the second split in two
        // halves (IoU 0.5 and 0.5 before the tie rule: only one may match), the third missed,
        // and one false object
        let mut t = Labels::zeros((8, 20));
        let mut p = Labels::zeros((8, 20));
        for y in 0..4 {
            for x in 0..4 {
                t[[y, x]] = 10;
                p[[y, x]] = 3;
                t[[y, x + 6]] = 20;
                p[[y, x + 6]] = if x < 2 { 4 } else { 5 };
                t[[y, x + 12]] = 30;
                p[[y + 4, x + 16]] = 9;
            }
        }
        let c = match_objects(&t, &p, &[0.5, 0.9]).unwrap();
        let s5 = c[0].scores();
        assert_eq!((s5.n_true, s5.n_pred, s5.tp, s5.fp, s5.fn_), (3, 4, 2, 2, 1));
        assert!((s5.ap - 2.0 / 5.0).abs() < 1e-12);
        assert!((s5.mean_matched_iou - 0.75).abs() < 1e-12);
        assert!((s5.pq - 1.5 / 3.5).abs() < 1e-12);
        let s9 = c[1].scores();
        assert_eq!((s9.tp, s9.fp, s9.fn_), (1, 3, 2));
        assert!((s9.f1 - 2.0 / 7.0).abs() < 1e-12);
        // no objects on either side: perfect; thresholds below 0.5 are refused
        let z = Labels::zeros((2, 2));
        assert_eq!(match_objects(&z, &z, &[0.5]).unwrap()[0].scores().ap, 1.0);
        assert!(match_objects(&z, &z, &[0.3]).is_err());
        assert!(match_objects(&z, &Labels::zeros((2, 3)), &[0.5]).is_err());
    }

    #[test]
    fn empty_denominators_and_broken_predictions() {
        use ndarray::array;
        let truth = array![[0u8, 1, 1, 0]];
        let s = super::score(&array![[0u8, 0, 0, 0]], &truth, 3).unwrap();
        assert_eq!(s.classes[1].precision, 0.0);
        assert_eq!(s.classes[1].recall, 0.0);
        assert_eq!(s.classes[1].dice, 0.0);
        assert_eq!(s.classes[2].dice, 1.0); // absent from both
        assert_eq!(s.classes[2].precision, 1.0);
        let s = super::score(&array![[0u8, 1, 1, 2]], &truth, 3).unwrap();
        assert_eq!(s.classes[2].recall, 0.0); // predicted, absent from the truth
        let t = array![[0.0f32, 1.0], [2.0, 3.0]];
        let p = array![[0.0f32, f32::NAN], [2.0, 3.0]];
        assert!(super::psnr(t.view(), p.view()).unwrap().is_nan());
        assert!(super::range_invariant_psnr(t.view(), p.view()).unwrap().is_nan());
        assert!(super::psnr(t.view(), t.view()).unwrap() > 100.0);
    }

    #[test]
    fn kde_kl_known_cases() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let std_normal: Vec<f32> = (0..2048).map(|_| StandardNormal.sample(&mut rng)).collect();
        let kl0 = super::kde_kl_to_standard_normal(&std_normal);
        assert!(kl0 < 0.01, "N(0,1): {kl0}");
        // KL(N(2, 1) || N(0, 1)) = 2 (the KDE widens the density slightly)
        let shifted: Vec<f32> = std_normal.iter().map(|v| v + 2.0).collect();
        let kl2 = super::kde_kl_to_standard_normal(&shifted);
        assert!((kl2 - 2.0).abs() < 0.15, "N(2,1): {kl2}");
        // KL(N(0, 0.5^2) || N(0, 1)) = 0.5 (0.25 - 1 - ln 0.25) = 0.318
        let narrow: Vec<f32> = std_normal.iter().map(|v| v * 0.5).collect();
        let kln = super::kde_kl_to_standard_normal(&narrow);
        assert!((kln - 0.3181).abs() < 0.05, "N(0,0.25): {kln}");
        assert!(super::kde_kl_to_standard_normal(&[1.0; 100]).is_infinite());
    }

    #[test]
    fn ssim_of_an_image_with_itself_and_with_noise() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let a = ndarray::Array2::from_shape_fn((32, 32), |(y, x)| ((x as f32) * 0.3).sin() + (y as f32) * 0.05);
        assert!((super::ssim(a.view(), a.view()).unwrap() - 1.0).abs() < 1e-9);
        let n = ndarray::Array2::from_shape_fn((32, 32), |_| StandardNormal.sample(&mut rng));
        assert!(super::ssim(a.view(), n.view()).unwrap().abs() < 0.1);
    }

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

    #[test]
    fn restoration_metrics_known_cases() {
        use ndarray::Array2;
        let t = Array2::from_shape_fn((16, 16), |(y, x)| ((y * 16 + x) as f32 * 0.37).sin() * 10.0 + 20.0);
        // PSNR: range 20 (approx), constant error 1 -> 20 log10(range)
        let p = t.mapv(|v| v + 1.0);
        let (lo, hi) = t.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let want = 20.0 * ((hi - lo) as f64).log10();
        assert!((psnr(t.view(), p.view()).unwrap() - want).abs() < 1e-4);
        // RI-PSNR is invariant to an affine change of the prediction
        let noisy = Array2::from_shape_fn((16, 16), |(y, x)| t[[y, x]] + (((y * 7 + x * 3) % 5) as f32 - 2.0) * 0.3);
        let a = range_invariant_psnr(t.view(), noisy.view()).unwrap();
        let b = range_invariant_psnr(t.view(), noisy.mapv(|v| 3.0 * v - 50.0).view()).unwrap();
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        assert!(psnr(t.view(), noisy.mapv(|v| 3.0 * v - 50.0).view()).unwrap() < a - 10.0);
        // SSIM: 1 for identical images, lower for noise, and equal to a hand computation
        assert!((ssim(t.view(), t.view()).unwrap() - 1.0).abs() < 1e-9);
        assert!(ssim(t.view(), noisy.view()).unwrap() < 0.999);
        let x = Array2::from_shape_fn((7, 7), |(y, x)| (y * 7 + x) as f32);
        let y = x.mapv(|v| 48.0 - v);
        // one window: means 24, var_x = var_y = 4.083..*49/48.., cov = -var
        let n = 49.0f64;
        let mean = 24.0;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let (c1, c2) = ((0.01f64 * 48.0).powi(2), (0.03f64 * 48.0).powi(2));
        let want = ((2.0 * mean * mean + c1) * (-2.0 * var + c2)) / ((2.0 * mean * mean + c1) * (2.0 * var + c2));
        assert!((ssim(x.view(), y.view()).unwrap() - want).abs() < 1e-9);
        assert!(ssim(x.slice(ndarray::s![..6, ..]), y.slice(ndarray::s![..6, ..])).is_err());
    }
}
