//! nnU-Net's segmentation loss: cross-entropy + soft Dice, with deep supervision.

use tch::{Kind, Tensor};

/// Soft Dice over the batch ("batch Dice", as nnU-Net 2D), background excluded,
/// smooth 1e-5. `logits (N, K, H, W)`, `target (N, H, W)` int64. Returns `1 - mean Dice`.
pub fn soft_dice_loss(logits: &Tensor, target: &Tensor) -> Tensor {
    let k = logits.size()[1];
    let probs = logits.softmax(1, Kind::Float);
    let onehot = target.one_hot(k).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    let dims: &[i64] = &[0, 2, 3];
    let tp = (&probs * &onehot).sum_dim_intlist(dims, false, Kind::Float);
    let fp = (&probs * (onehot.neg() + 1.0)).sum_dim_intlist(dims, false, Kind::Float);
    let fnn = ((probs.neg() + 1.0) * &onehot).sum_dim_intlist(dims, false, Kind::Float);
    let smooth = 1e-5;
    let dice = (&tp * 2.0 + smooth) / (tp * 2.0 + fp + fnn + smooth).clamp_min(1e-8);
    let fg = if k > 1 { dice.narrow(0, 1, k - 1) } else { dice };
    fg.mean(Kind::Float).neg() + 1.0
}

/// Cross-entropy + soft Dice, weight 1 each. `logits (N, K, H, W)`, `target (N, H, W)` int64.
pub fn ce_dice_loss(logits: &Tensor, target: &Tensor) -> Tensor {
    let ce = logits.cross_entropy_loss::<Tensor>(target, None, tch::Reduction::Mean, -100, 0.0);
    ce + soft_dice_loss(logits, target)
}

/// Deep-supervision weights: 1/2^i, the lowest-resolution output 0, normalized to sum 1.
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![1.0];
    }
    let mut w: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    w[n - 1] = 0.0;
    let s: f64 = w.iter().sum();
    w.iter().map(|x| x / s).collect()
}

/// Weighted CE + Dice over deep-supervision outputs (full resolution first);
/// the target `(N, H, W)` is downsampled by nearest neighbour to each output size.
pub fn deep_supervision_loss(outputs: &[Tensor], target: &Tensor) -> Tensor {
    let w = deep_supervision_weights(outputs.len());
    let tf = target.unsqueeze(1).to_kind(Kind::Float);
    let mut total = Tensor::zeros([], (Kind::Float, target.device()));
    for (o, &wi) in outputs.iter().zip(&w) {
        if wi == 0.0 {
            continue;
        }
        let s = o.size();
        let t = if s[2] == target.size()[1] && s[3] == target.size()[2] {
            target.shallow_clone()
        } else {
            // nearest-exact (pixel centres), as nnU-Net v2 downsamples its targets; plain
            // nearest picks each block's top-left pixel and shifts the labels
            tf.internal_upsample_nearest_exact2d([s[2], s[3]], None, None).squeeze_dim(1).to_kind(Kind::Int64)
        };
        total += ce_dice_loss(o, &t) * wi;
    }
    total
}
