//! Dropout with libtorch's masks, drawn faster where libtorch samples them one by one.

use once_cell::sync::Lazy;
use tch::{Kind, Tensor};

/// Whether libtorch's CPU `bernoulli_(p)` draws one float64 uniform per element from the
/// global generator, in order (its default sampler). Built with MKL and running on an Intel
/// CPU it uses MKL's vectorized sampler instead (seeded by one draw), and that one is fast.
static PER_ELEMENT_BERNOULLI: Lazy<bool> = Lazy::new(|| !crate::backend::host::cpu_is_intel());

/// Dropout in place (`train`; otherwise `y` unchanged), with libtorch's mask and scale. Where libtorch samples
/// the mask element by element (the CPU, unless it is an Intel CPU and libtorch has MKL:
/// [`PER_ELEMENT_BERNOULLI`]), it keeps an element when one float64 uniform draw of the
/// global generator is below `1 - p`; `rand` in float64 makes the same draws in the same
/// order faster (docs/engine-notes.md), so the mask, the generator's state afterwards and the result are
/// libtorch's (`dropout_matches_libtorch` checks it). Elsewhere (CUDA, Intel + MKL) this
/// is libtorch's own in-place dropout.
pub fn dropout_(y: Tensor, p: f64, train: bool) -> Tensor {
    let mut y = y;
    if !train || p == 0.0 {
        return y;
    }
    if y.device() != tch::Device::Cpu || !*PER_ELEMENT_BERNOULLI {
        let _ = y.dropout_(p, true);
        return y;
    }
    let keep = 1.0 - p;
    let draws = Tensor::rand(y.size(), (Kind::Double, y.device()));
    let mut noise = draws.lt(keep).to_kind(y.kind());
    noise /= keep;
    y *= &noise;
    y
}

/// [`dropout_`] of a blocked tensor (`crate::backend::onednn`): the mask is drawn in the plain
/// `(N, C, H, W)` order and blocked, so that a seed gives the same mask on either path.
pub fn dropout_blocked_(y: Tensor, p: f64, train: bool) -> Tensor {
    let mut y = y;
    if !train || p == 0.0 {
        return y;
    }
    let s = y.size();
    let plain = [s[0], s[1] * crate::backend::onednn::BLOCK, s[2], s[3]];
    let keep = 1.0 - p;
    let mask = if *PER_ELEMENT_BERNOULLI {
        Tensor::rand(plain, (Kind::Double, y.device())).lt(keep).to_kind(y.kind())
    } else {
        // libtorch's own dropout mask on an NCHW tensor (its sampler fills memory in order)
        Tensor::empty(plain, (y.kind(), y.device())).bernoulli_float_(keep)
    };
    let mut noise = crate::backend::onednn::to_blocked(&mask);
    noise /= keep;
    y *= &noise;
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The in-place dropout draws libtorch's mask and scales as its dropout does, on this
    /// machine's CPU whichever sampler libtorch uses there.
    #[test]
    fn dropout_matches_libtorch() {
        let x = Tensor::randn([3, 5, 17, 19], (Kind::Float, Device::Cpu));
        for _ in 0..5 {
            let _g = crate::engine::model::TORCH_RNG.lock();
            tch::manual_seed(31);
            let reference = x.dropout(0.1, true);
            tch::manual_seed(31);
            let ours = dropout_(x.copy(), 0.1, true);
            drop(_g);
            let kept = ours.ne(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
            assert!((kept - 0.9).abs() < 0.02, "kept fraction {kept}");
            // kept elements are scaled by 1 / 0.9, as libtorch's are
            let scaled =
                (&ours - &x / 0.9).abs().where_self(&ours.ne(0.0), &Tensor::zeros_like(&ours)).max().double_value(&[]);
            assert!(scaled < 1e-5, "kept elements scaled wrongly: {scaled}");
            if reference.equal(&ours) {
                return;
            }
            // another test may have drawn from the global generator in between: try again
        }
        panic!(
            "the in-place dropout's mask differs from libtorch's dropout (per-element sampler: {})",
            *PER_ELEMENT_BERNOULLI
        );
    }

    #[test]
    fn eval_mode_and_zero_rate_leave_the_input() {
        let x = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        assert!(dropout_(x.copy(), 0.1, false).equal(&x));
        assert!(dropout_(x.copy(), 0.0, true).equal(&x));
    }
}
