//! Multi-tensor optimizer kernels: libtorch's `_fused_sgd_`, `_fused_adam_` and
//! `_foreach_*` ops (what `torch.optim` runs with `fused=True` / `foreach=True`), which
//! tch does not bind, reached through a small C++ shim (`optim_shim.cpp`, compiled by build.rs
//! against libtorch's headers). One call updates every parameter: one kernel launch per
//! op for the whole list instead of several per tensor, and no temporaries the size of
//! the model. The trainers' optimizers (`train::Sgd`, `split::Adamax`, `diffseg::Adam`)
//! keep their names, state and checkpoint format and call these for the arithmetic.
//!
//! All tensors of one call must share device and dtype (the trainers' parameters do);
//! lists are index-aligned (parameter `i`, its gradient `i`, its state `i`). Errors from
//! libtorch come back as [`Error::Torch`] with its message; lists of different lengths
//! as [`Error::InvalidArgument`].

use crate::error::{Error, Result};
use std::os::raw::{c_char, c_int};
use tch::Tensor;

/// libtorch's `torch::Tensor`, behind tch's handles (`Tensor::as_ptr`).
#[repr(C)]
struct AtTensor {
    _private: [u8; 0],
}
type T = *mut AtTensor;

unsafe extern "C" {
    fn lumos_optim_drop_grads(params: *const T, n: usize, err: *mut c_char, err_len: usize) -> c_int;
    fn lumos_optim_total_norm(ts: *const T, n: usize, out: *mut f64, err: *mut c_char, err_len: usize) -> c_int;
    fn lumos_optim_scale(ts: *const T, n: usize, s: f64, err: *mut c_char, err_len: usize) -> c_int;
    fn lumos_optim_clamp(ts: *const T, n: usize, lo: f64, hi: f64, err: *mut c_char, err_len: usize) -> c_int;
    fn lumos_optim_fused_sgd(
        params: *const T,
        grads: *const T,
        bufs: *const T,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        nesterov: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn lumos_optim_fused_adam(
        params: *const T,
        grads: *const T,
        m: *const T,
        v: *const T,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn lumos_optim_foreach_adamax(
        params: *const T,
        grads: *const T,
        m: *const T,
        u: *const T,
        n: usize,
        clr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

fn ptrs(ts: &[Tensor]) -> Vec<T> {
    ts.iter().map(|t| t.as_ptr() as T).collect()
}

/// Runs one shim call with an error buffer; a non-zero status becomes `Error::Torch`.
/// (Also used by `nn::precision` for the shim's autocast entry points.)
pub(crate) fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buf = vec![0u8; 1024];
    let rc = f(buf.as_mut_ptr() as *mut c_char, buf.len());
    if rc == 0 {
        return Ok(());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Err(Error::Torch(tch::TchError::Torch(format!("{what}: {}", String::from_utf8_lossy(&buf[..end])))))
}

/// libtorch's CPU multi-tensor kernels index the lists without checking them: every
/// entry must match its parameter in shape, dtype and device, or the call is refused.
fn check_aligned(what: &str, params: &[Tensor], lists: &[&[Tensor]]) -> Result<()> {
    let n = params.len();
    if lists.iter().any(|l| l.len() != n) {
        let lens: Vec<usize> = lists.iter().map(|l| l.len()).collect();
        return Err(Error::InvalidArgument(format!("{what}: {n} parameters but state lists of lengths {lens:?}")));
    }
    for (i, p) in params.iter().enumerate() {
        if !p.defined() {
            return Err(Error::InvalidArgument(format!("{what}: parameter {i} is undefined")));
        }
        let (size, kind, device) = (p.size(), p.kind(), p.device());
        for l in lists {
            let t = &l[i];
            if !t.defined() || t.size() != size || t.kind() != kind || t.device() != device {
                return Err(Error::InvalidArgument(format!(
                    "{what}: entry {i} is {} but its parameter is {size:?} {kind:?} on {device:?}; expected the same shape, dtype and device",
                    if t.defined() {
                        format!("{:?} {:?} on {:?}", t.size(), t.kind(), t.device())
                    } else {
                        "undefined".to_string()
                    }
                )));
            }
        }
    }
    Ok(())
}

/// Index-aligned lists for one optimizer step: the named parameters that have a
/// gradient, their gradients, and for each state map the parameter's state tensor
/// (created as zeros the first time the parameter is seen; SGD's momentum, Adam's `m`
/// and `v`, Adamax's `m` and `u`).
pub fn gather(
    params: &[(String, Tensor)],
    states: &mut [&mut std::collections::HashMap<String, Tensor>],
) -> (Vec<Tensor>, Vec<Tensor>, Vec<Vec<Tensor>>) {
    let (mut ps, mut gs) = (Vec::new(), Vec::new());
    let mut st: Vec<Vec<Tensor>> = states.iter().map(|_| Vec::new()).collect();
    for (name, p) in params {
        let g = p.grad();
        if !g.defined() {
            continue;
        }
        for (map, list) in states.iter_mut().zip(st.iter_mut()) {
            list.push(map.entry(name.clone()).or_insert_with(|| g.zeros_like()).shallow_clone());
        }
        ps.push(p.shallow_clone());
        gs.push(g);
    }
    (ps, gs, st)
}

/// Drops the gradients of `params` (undefined afterwards, as torch's
/// `zero_grad(set_to_none=True)`): the next backward pass writes fresh ones instead of
/// adding into zeroed buffers.
pub fn drop_grads<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Result<()> {
    let p: Vec<T> = params.into_iter().map(|t| t.as_ptr() as T).collect();
    // SAFETY: `p` holds live tch handles for the duration of the call.
    call("drop gradients", |e, l| unsafe { lumos_optim_drop_grads(p.as_ptr(), p.len(), e, l) })
}

/// The L2 norm of all `ts` taken together as one vector.
pub fn total_norm(ts: &[Tensor]) -> Result<f64> {
    let p = ptrs(ts);
    let mut out = 0.0;
    // SAFETY: live handles; `out` outlives the call.
    call("gradient norm", |e, l| unsafe { lumos_optim_total_norm(p.as_ptr(), p.len(), &mut out, e, l) })?;
    Ok(out)
}

/// `t *= s` for every tensor, in place.
pub fn scale_(ts: &[Tensor], s: f64) -> Result<()> {
    let p = ptrs(ts);
    // SAFETY: live handles.
    call("scale", |e, l| unsafe { lumos_optim_scale(p.as_ptr(), p.len(), s, e, l) })
}

/// `t = clamp(t, lo, hi)` for every tensor, in place.
pub fn clamp_(ts: &[Tensor], lo: f64, hi: f64) -> Result<()> {
    let p = ptrs(ts);
    // SAFETY: live handles.
    call("clamp", |e, l| unsafe { lumos_optim_clamp(p.as_ptr(), p.len(), lo, hi, e, l) })
}

/// Clips the global L2 norm of `grads` to `max_norm` (scaling by
/// `max_norm / (norm + 1e-6)` when it is larger, as `torch.nn.utils.clip_grad_norm_`);
/// returns the norm before clipping. `max_norm <= 0` only measures.
pub fn clip_grad_norm_(grads: &[Tensor], max_norm: f64) -> Result<f64> {
    let norm = total_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        scale_(grads, max_norm / (norm + 1e-6))?;
    }
    Ok(norm)
}

/// One SGD step with momentum (dampening 0) and L2 weight decay, PyTorch's rule: `g +=
/// weight_decay * p`; `buf = g` on the first step, else `buf = momentum * buf + g`;
/// `p -= lr * (g + momentum * buf)` with Nesterov, `p -= lr * buf` without. `bufs` start
/// as zeros, which makes the first step's `buf = g` exactly (dampening 0).
pub fn sgd_(
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) -> Result<()> {
    check_aligned("sgd", params, &[grads, bufs])?;
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(bufs));
    // SAFETY: live handles, index-aligned lists of equal length.
    call("fused SGD", |e, l| unsafe {
        lumos_optim_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            p.len(),
            weight_decay,
            momentum,
            lr,
            nesterov as c_int,
            e,
            l,
        )
    })
}

/// One Adam step (no weight decay) at `step` (1 for the first update): `m = b1 m + (1 -
/// b1) g`, `v = b2 v + (1 - b2) g^2`, `p -= lr / (1 - b1^step) * m / (sqrt(v / (1 -
/// b2^step)) + eps)`. `m` and `v` start as zeros.
#[allow(clippy::too_many_arguments)] // reason: mirrors the arguments of libtorch's kernel one to one
pub fn adam_(
    params: &[Tensor],
    grads: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    step: i64,
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
) -> Result<()> {
    check_aligned("adam", params, &[grads, m, v])?;
    let (p, g, mp, vp) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    // SAFETY: live handles, index-aligned lists of equal length.
    call("fused Adam", |e, l| unsafe {
        lumos_optim_fused_adam(
            p.as_ptr(),
            g.as_ptr(),
            mp.as_ptr(),
            vp.as_ptr(),
            p.len(),
            step as f64,
            lr,
            b1,
            b2,
            eps,
            e,
            l,
        )
    })
}

/// One Adamax step at `step` (1 for the first update): `m = b1 m + (1 - b1) g`, `u =
/// max(b2 u, |g| + eps)`, `p -= lr / (1 - b1^step) * m / u`. `m` and `u` start as zeros.
#[allow(clippy::too_many_arguments)] // reason: mirrors the arguments of libtorch's kernel one to one
pub fn adamax_(
    params: &[Tensor],
    grads: &[Tensor],
    m: &[Tensor],
    u: &[Tensor],
    step: i64,
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
) -> Result<()> {
    check_aligned("adamax", params, &[grads, m, u])?;
    let clr = lr / (1.0 - b1.powi(step as i32));
    let (p, g, mp, up) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(u));
    // SAFETY: live handles, index-aligned lists of equal length.
    call("Adamax", |e, l| unsafe {
        lumos_optim_foreach_adamax(p.as_ptr(), g.as_ptr(), mp.as_ptr(), up.as_ptr(), p.len(), clr, b1, b2, eps, e, l)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn setup(seed: i64) -> (Vec<Tensor>, Vec<Tensor>) {
        tch::manual_seed(seed);
        let shapes: [&[i64]; 3] = [&[4, 3, 3, 3], &[4], &[7, 5]];
        let ps = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
        let gs = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
        (ps, gs)
    }

    #[test]
    fn sgd_matches_the_per_tensor_rule() {
        let (ps, gs) = setup(1);
        let reference: Vec<Tensor> = ps.iter().map(|p| p.copy()).collect();
        let mut ref_bufs: Vec<Tensor> = Vec::new();
        let bufs: Vec<Tensor> = ps.iter().map(|p| p.zeros_like()).collect();
        let (lr, mom, wd) = (0.01, 0.99, 3e-5);
        for step in 0..3 {
            let before: Vec<i64> = ps.iter().map(|p| p.internal_version()).collect();
            sgd_(&ps, &gs, &bufs, lr, mom, wd, true).unwrap();
            // caches keyed by the version counter (nn::packed) must see the update
            assert!(ps.iter().zip(&before).all(|(p, v)| p.internal_version() > *v), "every parameter's version moved");
            for (i, (p, g)) in reference.iter().zip(&gs).enumerate() {
                let g = g + p * wd;
                if step == 0 {
                    ref_bufs.push(g.copy());
                } else {
                    ref_bufs[i] = &ref_bufs[i] * mom + &g;
                }
                let mut p = p.shallow_clone();
                let _ = p.f_sub_(&((&g + &ref_bufs[i] * mom) * lr)).unwrap();
            }
        }
        for (a, b) in ps.iter().zip(&reference) {
            assert!(close(a, b) < 1e-6, "fused SGD differs from the rule by {}", close(a, b));
        }
    }

    #[test]
    fn adam_and_adamax_match_the_per_tensor_rules() {
        let (b1, b2, eps, lr) = (0.9, 0.999, 1e-8, 1e-3);
        let (ps, gs) = setup(2);
        let reference: Vec<Tensor> = ps.iter().map(|p| p.copy()).collect();
        let (m, v): (Vec<Tensor>, Vec<Tensor>) = ps.iter().map(|p| (p.zeros_like(), p.zeros_like())).unzip();
        let (rm, rv): (Vec<Tensor>, Vec<Tensor>) = ps.iter().map(|p| (p.zeros_like(), p.zeros_like())).unzip();
        for step in 1..=3 {
            let before: Vec<i64> = ps.iter().map(|p| p.internal_version()).collect();
            adam_(&ps, &gs, &m, &v, step, lr, b1, b2, eps).unwrap();
            assert!(ps.iter().zip(&before).all(|(p, v)| p.internal_version() > *v));
            let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for i in 0..ps.len() {
                let (mut mi, mut vi, mut pi) =
                    (rm[i].shallow_clone(), rv[i].shallow_clone(), reference[i].shallow_clone());
                mi.copy_(&(&mi * b1 + &gs[i] * (1.0 - b1)));
                vi.copy_(&(&vi * b2 + gs[i].square() * (1.0 - b2)));
                pi.copy_(&(&pi - &mi / ((&vi / c2).sqrt() + eps) * (lr / c1)));
            }
        }
        for (a, b) in ps.iter().zip(&reference) {
            assert!(close(a, b) < 1e-6, "fused Adam differs from the rule by {}", close(a, b));
        }

        let (ps, gs) = setup(3);
        let reference: Vec<Tensor> = ps.iter().map(|p| p.copy()).collect();
        let (m, u): (Vec<Tensor>, Vec<Tensor>) = ps.iter().map(|p| (p.zeros_like(), p.zeros_like())).unzip();
        let (rm, ru): (Vec<Tensor>, Vec<Tensor>) = ps.iter().map(|p| (p.zeros_like(), p.zeros_like())).unzip();
        for step in 1..=3 {
            let before: Vec<i64> = ps.iter().map(|p| p.internal_version()).collect();
            adamax_(&ps, &gs, &m, &u, step, lr, b1, b2, eps).unwrap();
            assert!(ps.iter().zip(&before).all(|(p, v)| p.internal_version() > *v));
            let c1 = 1.0 - b1.powi(step as i32);
            for i in 0..ps.len() {
                let (mut mi, mut ui, mut pi) =
                    (rm[i].shallow_clone(), ru[i].shallow_clone(), reference[i].shallow_clone());
                mi.copy_(&(&mi * b1 + &gs[i] * (1.0 - b1)));
                ui.copy_(&(&ui * b2).maximum(&(gs[i].abs() + eps)));
                pi.copy_(&(&pi - &mi / &ui * (lr / c1)));
            }
        }
        for (a, b) in ps.iter().zip(&reference) {
            assert!(close(a, b) < 1e-6, "Adamax differs from the rule by {}", close(a, b));
        }
    }

    #[test]
    fn clipping_and_dropping_gradients() {
        let (_, gs) = setup(4);
        let norm = gs.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
        assert!((total_norm(&gs).unwrap() - norm).abs() < 1e-4 * norm);
        let before = clip_grad_norm_(&gs, norm / 2.0).unwrap();
        assert!((before - norm).abs() < 1e-4 * norm);
        assert!((total_norm(&gs).unwrap() - norm / 2.0).abs() < 1e-3 * norm);
        clamp_(&gs, -0.1, 0.1).unwrap();
        assert!(gs.iter().all(|g| g.abs().max().double_value(&[]) <= 0.1 + 1e-7));

        let p = Tensor::randn([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * 2.0).sum(Kind::Float).backward();
        assert!(p.grad().defined());
        drop_grads([&p]).unwrap();
        assert!(!p.grad().defined(), "the gradient is undefined after drop_grads");
    }

    #[test]
    fn mismatched_lists_are_an_error_not_a_crash() {
        let (ps, gs) = setup(5);
        let err = sgd_(&ps, &gs[..2], &gs, 0.1, 0.9, 0.0, true).unwrap_err();
        assert!(err.to_string().contains("state lists"), "{err}");
        // libtorch's CPU kernels would read out of bounds: refused before the call
        let wrong: Vec<Tensor> = ps.iter().map(|_| Tensor::zeros([2], (Kind::Float, Device::Cpu))).collect();
        let err = adam_(&ps, &gs, &wrong, &wrong, 1, 0.1, 0.9, 0.999, 1e-8).unwrap_err();
        assert!(err.to_string().contains("expected the same shape"), "{err}");
        let doubles: Vec<Tensor> = ps.iter().map(|p| p.to_kind(Kind::Double)).collect();
        assert!(adamax_(&ps, &doubles, &gs, &gs, 1, 0.1, 0.9, 0.999, 1e-8).is_err());
    }
}
