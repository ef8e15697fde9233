//! Training convolutions with the activations kept in oneDNN's blocked layout
//! (`src/backend/onednn.cpp`).
//!
//! libtorch's CPU convolutions take and return plain NCHW tensors: every convolution of a
//! training step reorders its input into oneDNN's blocked `nChw16c` layout and its output
//! back, in the forward pass and again in both backward passes. Those reorders are a large
//! share of a convolution's time (docs/engine-notes.md). Here the
//! activations stay blocked from one layer to the next, as dense 5-d tensors
//! `(N, C/16, H, W, 16)` that autograd carries like any other: convolutions and transposed
//! convolutions are autograd functions over oneDNN primitives (created once per shape),
//! InstanceNorm + LeakyReLU one fused kernel of our own on the blocked tensor (its result
//! does not depend on the thread count), concatenation along channels a `cat` of the
//! blocks.
//!
//! libtorch links its oneDNN statically with hidden symbols, so the primitives come from a
//! oneDNN 3.x library of our own, `libdnnl.so.3` (oneDNN 3.2 built with GNU OpenMP, from
//! the PyPI wheel `onednn-cpu-gomp`, which `scripts/bootstrap.sh` unpacks into `.onednn/lib`;
//! it shares libtorch's OpenMP runtime). It is loaded with `dlopen` on first use, through
//! the binary's RUNPATH or from the file named by `LUMOS_ONEDNN`; where it is absent, or
//! with `LUMOS_ONEDNN=0`, or after any failure (logged once), the networks run libtorch's
//! operators on plain tensors as before. Used in training only (grad mode on), on the CPU,
//! in float32, outside autocast and [`crate::backend::packed::plain`], for networks whose every
//! convolution has a multiple of 16 output channels.

use std::os::raw::{c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};

use once_cell::sync::Lazy;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

#[repr(C)]
struct AtTensor {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn lumos_onednn_available(library: *const c_char, err: *mut c_char, err_len: usize) -> c_int;
    fn lumos_onednn_conv(
        x: *mut AtTensor,
        w: *mut AtTensor,
        b: *mut AtTensor,
        deconv: c_int,
        stride: i64,
        pad: i64,
        out: *mut *mut AtTensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn lumos_blocked_batch_norm_act(
        x: *mut AtTensor,
        w: *mut AtTensor,
        b: *mut AtTensor,
        running_mean: *mut AtTensor,
        running_var: *mut AtTensor,
        momentum: f64,
        eps: f64,
        slope: f64,
        out: *mut *mut AtTensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn lumos_blocked_norm_act(
        x: *mut AtTensor,
        w: *mut AtTensor,
        b: *mut AtTensor,
        eps: f64,
        slope: f64,
        out: *mut *mut AtTensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Channels per block of the blocked layout.
pub const BLOCK: i64 = 16;

fn message(err: &[u8]) -> String {
    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
    String::from_utf8_lossy(&err[..end]).into_owned()
}

/// `Ok(version)` when the oneDNN library could be loaded, else why not.
pub fn library() -> &'static std::result::Result<String, String> {
    static LOADED: Lazy<std::result::Result<String, String>> = Lazy::new(|| {
        let sw = crate::switches::switches();
        if sw.onednn_off {
            return Err("switched off by LUMOS_ONEDNN=0".into());
        }
        let name = match &sw.onednn_library {
            Some(p) => match std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
                Ok(c) => Some(c),
                Err(_) => return Err(format!("LUMOS_ONEDNN={} contains a NUL byte", p.display())),
            },
            None => None,
        };
        let mut err = vec![0u8; 1024];
        // SAFETY: `name` is NUL-terminated or null and outlives the call, which writes at
        // most err.len() bytes into err.
        let ok = unsafe {
            lumos_onednn_available(
                name.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        } != 0;
        if ok { Ok(message(&err)) } else { Err(message(&err)) }
    });
    &LOADED
}

static BROKEN: AtomicBool = AtomicBool::new(false);

/// Switches the blocked path off for the rest of the process after a failure (logged
/// once): the callers go on with libtorch's operators. A blocked forward that fails part of
/// the way has already updated the running statistics of the BatchNorms it passed and drawn
/// its dropout masks; the plain forward that follows does both again (once per process).
pub fn disable(e: &Error) {
    #[cfg(test)]
    FALLBACKS.with(|c| c.set(c.get() + 1));
    if !BROKEN.swap(true, Ordering::Relaxed) {
        log::warn!("blocked oneDNN training convolutions off, using libtorch's operators: {e}");
    }
}

thread_local! {
    /// Blocked convolutions run on this thread (whether a training step used the path).
    static CONVS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
thread_local! {
    /// Failures of the blocked path on this thread (each followed by the plain path).
    static FALLBACKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs one training step's forward and backward (`f`, which must clear the gradients
/// before its backward pass). If `f` fails after using the blocked path (a oneDNN error in a
/// backward pass, which the forward's fallback cannot catch), the path is switched off
/// (logged) and `f` runs once more on libtorch's operators. A failed forward or backward may
/// already have updated BatchNorm running statistics and drawn random numbers: that step's
/// retry then sees them advanced (once per process; the path stays off afterwards).
pub fn train_step<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let before = CONVS.with(|c| c.get());
    match f() {
        Err(e) if CONVS.with(|c| c.get()) != before => {
            disable(&e);
            f()
        }
        r => r,
    }
}

/// Runs `f` and says whether it took the blocked path without falling back (tests).
#[cfg(test)]
fn took_blocked_path<R>(f: impl FnOnce() -> R) -> (R, bool) {
    let (c0, f0) = (CONVS.with(|c| c.get()), FALLBACKS.with(|c| c.get()));
    let r = f();
    (r, CONVS.with(|c| c.get()) > c0 && FALLBACKS.with(|c| c.get()) == f0)
}

/// Whether the blocked training path applies to input `x`: oneDNN loaded, no failure
/// seen, grad mode on, CPU, float32, not under autocast or [`crate::backend::packed::plain`].
pub fn applies(x: &Tensor) -> bool {
    // in tests a failure elsewhere in the process must not hide this thread's path
    #[cfg(test)]
    let broken = false;
    #[cfg(not(test))]
    let broken = BROKEN.load(Ordering::Relaxed);
    if broken
        || x.device() != Device::Cpu
        || x.kind() != Kind::Float
        || !crate::backend::packed::grad_enabled()
        || crate::backend::packed::plain_ops()
        || crate::backend::precision::autocast_enabled(Device::Cpu)
    {
        return false;
    }
    static LOGGED: Lazy<()> = Lazy::new(|| match library() {
        Ok(v) => log::info!("training convolutions: oneDNN {v} with blocked activations"),
        Err(e) => {
            log::info!("training convolutions: libtorch's (blocked oneDNN path unavailable: {e})")
        }
    });
    Lazy::force(&LOGGED);
    library().is_ok()
}

fn wrap(rc: c_int, out: *mut AtTensor, err: &[u8], what: &str) -> Result<Tensor> {
    if rc != 0 || out.is_null() {
        return Err(Error::Torch(tch::TchError::Torch(format!("{what}: {}", message(err)))));
    }
    // SAFETY: `out` is a heap-allocated torch::Tensor* whose ownership passes to tch.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// `(N, C, H, W)` -> blocked `(N, C/16, H, W, 16)` (C a multiple of 16); differentiable.
pub fn to_blocked(x: &Tensor) -> Tensor {
    let s = x.size();
    x.view([s[0], s[1] / BLOCK, BLOCK, s[2], s[3]]).permute([0, 1, 3, 4, 2]).contiguous()
}

/// Blocked `(N, C/16, H, W, 16)` -> `(N, C, H, W)`; differentiable.
pub fn from_blocked(x: &Tensor) -> Tensor {
    let s = x.size();
    x.permute([0, 1, 4, 2, 3]).reshape([s[0], s[1] * BLOCK, s[2], s[3]])
}

/// A convolution's input and weights as [`conv2d`] takes them: a blocked input as it is;
/// a plain one (a network's first layer) with one channel stays plain (oneDNN has
/// first-layer kernels for it, forward and weight gradient); other plain inputs are padded
/// with zero channels to a multiple of 16 and blocked, their weights padded alike (the same
/// function; the pad's backward drops the padded weights' gradients), because oneDNN 3.2
/// computes the weight gradient of a plain multi-channel input with its slow reference
/// kernel.
pub fn first_layer(x: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
    let c = x.size()[1];
    if x.dim() == 5 || c == 1 {
        return (x.shallow_clone(), w.shallow_clone());
    }
    let pad = (BLOCK - c % BLOCK) % BLOCK;
    if pad == 0 {
        return (to_blocked(x), w.shallow_clone());
    }
    let xp = x.constant_pad_nd([0, 0, 0, 0, 0, pad]);
    let wp = w.constant_pad_nd([0, 0, 0, 0, 0, pad]);
    (to_blocked(&xp), wp)
}

/// Channels of a blocked tensor.
pub fn channels(x: &Tensor) -> i64 {
    x.size()[1] * BLOCK
}

fn conv_any(x: &Tensor, w: &Tensor, b: Option<&Tensor>, deconv: bool, stride: i64, pad: i64) -> Result<Tensor> {
    let none = Tensor::empty([0], (Kind::Float, Device::Cpu));
    let b = b.unwrap_or(&none);
    let mut out: *mut AtTensor = std::ptr::null_mut();
    let mut err = vec![0u8; 1024];
    // SAFETY: live tensor handles for the call; `out` receives a new handle on success.
    let rc = unsafe {
        lumos_onednn_conv(
            x.as_ptr() as *mut AtTensor,
            w.as_ptr() as *mut AtTensor,
            b.as_ptr() as *mut AtTensor,
            deconv as c_int,
            stride,
            pad,
            &mut out,
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    let y = wrap(rc, out, &err, if deconv { "blocked transposed convolution" } else { "blocked convolution" })?;
    CONVS.with(|c| c.set(c.get() + 1));
    Ok(y)
}

/// A convolution (torch weights `(O, C, k, k)`, square stride and padding) of a blocked
/// input `(N, C/16, H, W, 16)`, or of a plain `(N, C, H, W)` one (a network's first layer);
/// the result is blocked. `O` must be a multiple of 16.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: i64, pad: i64) -> Result<Tensor> {
    conv_any(x, w, b, false, stride, pad)
}

/// A transposed convolution with kernel = stride (torch weights `(C, O, k, k)`) of a
/// blocked input; the result is blocked.
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: i64) -> Result<Tensor> {
    conv_any(x, w, b, true, stride, 0)
}

/// A 1x1 convolution head (torch weights `(K, C, 1, 1)`, any `K`) of a blocked input; the
/// result is plain `(N, K, H, W)`. The outputs are padded to a multiple of 16 with zero
/// weights for the blocked convolution and cut off after it (the padded rows' gradients
/// are dropped by the pad's backward): cheaper than unblocking the `C`-channel input for
/// libtorch's convolution, which would reorder it again.
pub fn head(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let k = w.size()[0];
    let pad = (BLOCK - k % BLOCK) % BLOCK;
    let wp = w.constant_pad_nd([0, 0, 0, 0, 0, 0, 0, pad]);
    let bp = b.map(|b| b.constant_pad_nd([0, pad]));
    let y = conv2d(x, &wp, bp.as_ref(), 1, 0)?;
    let s = y.size();
    if s[1] == 1 {
        // one block: copy out only the k channels used
        return Ok(y.narrow(4, 0, k).permute([0, 1, 4, 2, 3]).reshape([s[0], k, s[2], s[3]]));
    }
    Ok(from_blocked(&y).narrow(1, 0, k))
}

/// `leaky_relu(instance_norm(x, eps, affine w / b), slope)` of a blocked input; blocked result.
pub fn norm_act(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, slope: f64) -> Result<Tensor> {
    let mut out: *mut AtTensor = std::ptr::null_mut();
    let mut err = vec![0u8; 1024];
    // SAFETY: live tensor handles for the call; `out` receives a new handle on success.
    let rc = unsafe {
        lumos_blocked_norm_act(
            x.as_ptr() as *mut AtTensor,
            w.as_ptr() as *mut AtTensor,
            b.as_ptr() as *mut AtTensor,
            eps,
            slope,
            &mut out,
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    wrap(rc, out, &err, "blocked instance norm + leaky ReLU")
}

/// Training-mode `leaky_relu(batch_norm(x), slope)` of a blocked input: batch statistics
/// over `N, H, W` per channel, affine `w`, `b`; `running_mean` / `running_var` updated in
/// place with `momentum` (the variance unbiased), as libtorch's `batch_norm` does.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
    slope: f64,
) -> Result<Tensor> {
    let mut out: *mut AtTensor = std::ptr::null_mut();
    let mut err = vec![0u8; 1024];
    // SAFETY: live tensor handles for the call; `out` receives a new handle on success.
    let rc = unsafe {
        lumos_blocked_batch_norm_act(
            x.as_ptr() as *mut AtTensor,
            w.as_ptr() as *mut AtTensor,
            b.as_ptr() as *mut AtTensor,
            running_mean.as_ptr() as *mut AtTensor,
            running_var.as_ptr() as *mut AtTensor,
            momentum,
            eps,
            slope,
            &mut out,
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    wrap(rc, out, &err, "blocked batch norm + leaky ReLU")
}

/// Bilinear 2x upsampling (`align_corners = false`) of a blocked tensor. Each block is a
/// 16-channel image in channels-last order, which libtorch's upsampling kernel takes as
/// it is: no copy of the layout, forward or backward.
pub fn upsample2_bilinear(x: &Tensor) -> Tensor {
    let s = x.size();
    let cl = x.reshape([s[0] * s[1], s[2], s[3], BLOCK]).permute([0, 3, 1, 2]);
    let y = cl.upsample_bilinear2d([s[2] * 2, s[3] * 2], false, None, None);
    y.permute([0, 2, 3, 1]).reshape([s[0], s[1], s[2] * 2, s[3] * 2, BLOCK])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether oneDNN is there to test; without it the tests that need it pass as skipped,
    /// unless `LUMOS_REQUIRE_ONEDNN` is set (scripts/test.sh sets it: CI must run them).
    fn have_library() -> bool {
        match library() {
            Ok(_) => true,
            Err(e) if crate::switches::switches().require_onednn => {
                panic!("oneDNN is required here (LUMOS_REQUIRE_ONEDNN) but not loadable: {e}")
            }
            Err(e) => {
                eprintln!("skipped: oneDNN not loadable here ({e})");
                false
            }
        }
    }

    fn maxdiff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        maxdiff(a, b) / b.abs().max().double_value(&[]).max(1e-6)
    }

    #[test]
    fn layout_round_trip() {
        let x = Tensor::randn([2, 32, 5, 7], (Kind::Float, Device::Cpu));
        let b = to_blocked(&x);
        assert_eq!(b.size(), vec![2, 2, 5, 7, 16]);
        // channel 17 of sample 1 at (3, 4) is block 1, lane 1
        assert_eq!(b.double_value(&[1, 1, 3, 4, 1]), x.double_value(&[1, 17, 3, 4]));
        assert_eq!(maxdiff(&from_blocked(&b), &x), 0.0);
    }

    #[test]
    fn norm_act_equals_group_norm_and_leaky_relu_with_gradients() {
        let _g = crate::engine::model::TORCH_RNG.lock();
        let opts = (Kind::Float, Device::Cpu);
        // a spatial size that is not a multiple of the kernel's chunk, an offset mean
        for (n, c, h, w) in [(2, 32, 17, 19), (1, 16, 40, 33), (3, 48, 1, 5)] {
            tch::manual_seed(7);
            let x0 = Tensor::randn([n, c, h, w], opts) * 3.0 + 20.0;
            let wt = (Tensor::rand([c], opts) + 0.5).set_requires_grad(true);
            let bt = Tensor::randn([c], opts).set_requires_grad(true);
            let gy = Tensor::randn([n, c, h, w], opts);
            let x1 = x0.copy().set_requires_grad(true);
            let y1 = from_blocked(&norm_act(&to_blocked(&x1), &wt, &bt, 1e-5, 0.01).unwrap());
            let g1 = Tensor::run_backward(&[(&y1 * &gy).sum(Kind::Float)], &[&x1, &wt, &bt], false, false);
            let x2 = x0.copy().set_requires_grad(true);
            let y2 = x2.group_norm(c, Some(&wt), Some(&bt), 1e-5, false).leaky_relu();
            let g2 = Tensor::run_backward(&[(&y2 * &gy).sum(Kind::Float)], &[&x2, &wt, &bt], false, false);
            assert!(maxdiff(&y1, &y2) < 1e-4, "forward differs by {} at {:?}", maxdiff(&y1, &y2), (n, c, h, w));
            for (i, name) in ["x", "weight", "bias"].iter().enumerate() {
                let d = rel(&g1[i], &g2[i]);
                assert!(d < 1e-4, "gradient of {name} differs by {d} (relative) at {:?}", (n, c, h, w));
            }
        }
    }

    #[test]
    fn refuses_what_it_does_not_serve() {
        let x = Tensor::randn([1, 1, 8, 8, 16], (Kind::Double, Device::Cpu));
        let w = Tensor::ones([16], (Kind::Double, Device::Cpu));
        let e = norm_act(&x, &w, &w, 1e-5, 0.01).unwrap_err().to_string();
        assert!(e.contains("float32"), "{e}");
        let x = Tensor::randn([1, 1, 8, 8, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([8], (Kind::Float, Device::Cpu));
        let e = norm_act(&x, &w, &w, 1e-5, 0.01).unwrap_err().to_string();
        assert!(e.contains("shape (16)"), "{e}");
        if have_library() {
            let w = Tensor::randn([24, 16, 3, 3], (Kind::Float, Device::Cpu));
            let e = conv2d(&x, &w, None, 1, 1).unwrap_err().to_string();
            assert!(e.contains("multiple of 16"), "{e}");
            let w = Tensor::randn([16, 32, 3, 3], (Kind::Float, Device::Cpu));
            let e = conv2d(&x, &w, None, 1, 1).unwrap_err().to_string();
            assert!(e.contains("do not match"), "{e}");
        }
    }

    #[test]
    fn head_equals_libtorch_with_gradients() {
        if !have_library() {
            return;
        }
        let _g = crate::engine::model::TORCH_RNG.lock();
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(5);
        for k in [2, 3, 20] {
            let x0 = Tensor::randn([2, 32, 9, 8], opts);
            let w = (Tensor::randn([k, 32, 1, 1], opts) * 0.2).set_requires_grad(true);
            let b = Tensor::randn([k], opts).set_requires_grad(true);
            let x1 = x0.copy().set_requires_grad(true);
            let y1 = head(&to_blocked(&x1), &w, Some(&b)).unwrap();
            let x2 = x0.copy().set_requires_grad(true);
            let y2 = x2.conv2d(&w, Some(&b), [1, 1], [0, 0], [1, 1], 1);
            assert_eq!(y1.size(), y2.size());
            assert!(rel(&y1, &y2) < 1e-5, "head output differs by {} (k = {k})", rel(&y1, &y2));
            let gy = Tensor::randn(y2.size(), opts);
            let g1 = Tensor::run_backward(&[(&y1 * &gy).sum(Kind::Float)], &[&x1, &w, &b], false, false);
            let g2 = Tensor::run_backward(&[(&y2 * &gy).sum(Kind::Float)], &[&x2, &w, &b], false, false);
            for i in 0..3 {
                assert_eq!(g1[i].size(), g2[i].size());
                assert!(rel(&g1[i], &g2[i]) < 1e-5, "head gradient {i} differs by {} (k = {k})", rel(&g1[i], &g2[i]));
            }
        }
    }

    /// Forward outputs and every parameter's gradient of a network, blocked and plain
    /// (`packed::plain` turns the blocked path off), under a loss that weighs every output.
    fn nets_agree(name: &str, vs: &tch::nn::VarStore, forward: &dyn Fn() -> Vec<Tensor>) {
        let run = |plain: bool| {
            for v in vs.trainable_variables() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let outs = if plain { crate::backend::packed::plain(forward) } else { forward() };
            tch::manual_seed(11);
            let loss = outs.iter().fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, o| {
                acc + (o * Tensor::randn(o.size(), (Kind::Float, Device::Cpu))).sum(Kind::Float)
            });
            loss.backward();
            let grads: Vec<Option<Tensor>> =
                vs.trainable_variables().iter().map(|v| v.grad().defined().then(|| v.grad().copy())).collect();
            (outs, grads)
        };
        let (op, gp) = run(true);

        let ((ob, gb), blocked) = took_blocked_path(|| run(false));
        assert!(blocked, "{name}: the forward did not take the blocked path");
        assert_eq!(op.len(), ob.len());
        for (i, (a, b)) in ob.iter().zip(&op).enumerate() {
            assert_eq!(a.size(), b.size(), "{name}: output {i}");
            assert!(rel(a, b) < 1e-4, "{name}: output {i} differs by {} (relative)", rel(a, b));
        }
        let mut names: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        names.sort_by(|x, y| x.0.cmp(&y.0));
        let pname = |i: usize| {
            let v = &vs.trainable_variables()[i];
            names.iter().find(|(_, t)| t.data_ptr() == v.data_ptr()).map(|(k, _)| k.clone()).unwrap_or_default()
        };
        for (i, (a, b)) in gb.iter().zip(&gp).enumerate() {
            match (a, b) {
                // relative, with an absolute floor for gradients that are zero in exact
                // arithmetic (the keys' bias under softmax) and rounding noise here
                (Some(a), Some(b)) => assert!(
                    maxdiff(a, b) <= 1e-3 * b.abs().max().double_value(&[]) + 1e-5,
                    "{name}: gradient of {} differs by {} (largest {})",
                    pname(i),
                    maxdiff(a, b),
                    b.abs().max().double_value(&[])
                ),
                (None, None) => {}
                _ => panic!("{name}: parameter {i} has a gradient on one path only"),
            }
        }
    }

    #[test]
    fn networks_train_the_same_blocked_and_plain() {
        if !have_library() {
            return;
        }
        use crate::dmqpm::net::{DmQpmConfig, DmQpmNet, FusionOp, Variant};
        use crate::nnunet::net::{Unet, UnetConfig};
        let _g = crate::engine::model::TORCH_RNG.lock();
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(1);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let cfg = UnetConfig { n_stages: 3, base_features: 16, max_features: 32, convs_per_stage: 2 };
        let net = Unet::new(&vs.root(), &cfg, 1, 3);
        let x = Tensor::randn([2, 1, 16, 12], opts);
        nets_agree("nnU-Net", &vs, &|| net.forward(&x, true));

        let x5 = Tensor::randn([2, 5, 16, 16], opts);
        let variants = [
            ("DM-QPMNet attention", Variant::Dual, FusionOp::Attention, vec![0, 1, 2, 3, 4], 32),
            ("DM-QPMNet concat", Variant::Dual, FusionOp::Concat, vec![0, 1, 2, 3, 4], 0),
            ("early fusion, two channels", Variant::EarlyFusion, FusionOp::Attention, vec![0, 4], 0),
        ];
        for (name, variant, fusion, channels, width) in variants {
            tch::manual_seed(2);
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let cfg = DmQpmConfig {
                variant,
                fusion,
                channels,
                n_stages: 4,
                base_features: 16,
                max_features: 64,
                fusion_stage: 2,
                heads: 4,
                fusion_width: width,
                ..Default::default()
            };
            let net = DmQpmNet::new(&vs.root(), &cfg, 2).unwrap();
            nets_agree(name, &vs, &|| net.forward(&x5, true));
        }
    }

    #[test]
    fn batch_norm_act_equals_libtorch_with_gradients_and_running_stats() {
        let _g = crate::engine::model::TORCH_RNG.lock();
        let opts = (Kind::Float, Device::Cpu);
        for (n, c, h, w) in [(4, 32, 9, 7), (1, 16, 20, 21)] {
            tch::manual_seed(9);
            let x0 = Tensor::randn([n, c, h, w], opts) * 2.0 + 5.0;
            let wt = (Tensor::rand([c], opts) + 0.5).set_requires_grad(true);
            let bt = Tensor::randn([c], opts).set_requires_grad(true);
            let gy = Tensor::randn([n, c, h, w], opts);
            let (rm0, rv0) = (Tensor::randn([c], opts), Tensor::rand([c], opts) + 0.5);
            let (rm1, rv1) = (rm0.copy(), rv0.copy());
            let (rm2, rv2) = (rm0.copy(), rv0.copy());
            let x1 = x0.copy().set_requires_grad(true);
            let y1 = from_blocked(&batch_norm_act(&to_blocked(&x1), &wt, &bt, &rm1, &rv1, 0.1, 1e-5, 0.01).unwrap());
            let g1 = Tensor::run_backward(&[(&y1 * &gy).sum(Kind::Float)], &[&x1, &wt, &bt], false, false);
            let x2 = x0.copy().set_requires_grad(true);
            let y2 = x2.batch_norm(Some(&wt), Some(&bt), Some(&rm2), Some(&rv2), true, 0.1, 1e-5, false).leaky_relu();
            let g2 = Tensor::run_backward(&[(&y2 * &gy).sum(Kind::Float)], &[&x2, &wt, &bt], false, false);
            let case = (n, c, h, w);
            assert!(maxdiff(&y1, &y2) < 1e-4, "forward differs by {} at {case:?}", maxdiff(&y1, &y2));
            assert!(maxdiff(&rm1, &rm2) < 1e-5, "running mean differs by {} at {case:?}", maxdiff(&rm1, &rm2));
            assert!(maxdiff(&rv1, &rv2) < 1e-5, "running variance differs by {} at {case:?}", maxdiff(&rv1, &rv2));
            assert!(maxdiff(&rm1, &rm0) > 1e-3, "the running mean did not move");
            for (i, name) in ["x", "weight", "bias"].iter().enumerate() {
                let d = rel(&g1[i], &g2[i]);
                assert!(d < 1e-4, "gradient of {name} differs by {d} (relative) at {case:?}");
            }
        }
    }

    #[test]
    fn blocked_upsampling_equals_plain() {
        let opts = (Kind::Float, Device::Cpu);
        let x0 = Tensor::randn([2, 32, 5, 6], opts);
        let x1 = x0.copy().set_requires_grad(true);
        let y1 = from_blocked(&upsample2_bilinear(&to_blocked(&x1)));
        let x2 = x0.copy().set_requires_grad(true);
        let y2 = x2.upsample_bilinear2d([10, 12], false, None, None);
        assert!(maxdiff(&y1, &y2) < 1e-6);
        let gy = Tensor::randn([2, 32, 10, 12], opts);
        let g1 = Tensor::run_backward(&[(&y1 * &gy).sum(Kind::Float)], &[&x1], false, false);
        let g2 = Tensor::run_backward(&[(&y2 * &gy).sum(Kind::Float)], &[&x2], false, false);
        assert!(maxdiff(&g1[0], &g2[0]) < 1e-5);
    }

    #[test]
    fn musplit_networks_train_the_same_blocked_and_plain() {
        if !have_library() {
            return;
        }
        use crate::musplit::net::{MuSplitConfig, MuSplitNet, SplitVariant};
        let _g = crate::engine::model::TORCH_RNG.lock();
        use crate::musplit::net::{LcMerge, UnetNorm};
        let cases = [
            (SplitVariant::Unet, 2, LcMerge::Regular, UnetNorm::Batch, true),
            (SplitVariant::Unet, 0, LcMerge::Regular, UnetNorm::Batch, true),
            (SplitVariant::Unet, 2, LcMerge::Lean, UnetNorm::Batch, true),
            (SplitVariant::Unet, 2, LcMerge::Regular, UnetNorm::Instance, true),
            (SplitVariant::Hvae, 2, LcMerge::Regular, UnetNorm::Batch, true),
            (SplitVariant::Hvae, 2, LcMerge::Regular, UnetNorm::Batch, false),
        ];
        for (variant, lc_levels, lc_merge, unet_norm, stochastic) in cases {
            tch::manual_seed(4);
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let cfg = MuSplitConfig {
                variant,
                levels: 3,
                lc_levels,
                lc_merge,
                unet_norm,
                stochastic,
                base_channels: 16,
                max_channels: 32,
                z_dim: 16,
                ..Default::default()
            };
            let name =
                format!("{variant:?}, {lc_levels} LC levels, {lc_merge:?}, {unet_norm:?}, stochastic {stochastic}");
            let net = MuSplitNet::new(&vs.root(), &cfg, 2).unwrap();
            // the ladder's prior and posterior convs start at zero: the deterministic
            // HAE's maps would then be constant and its BatchNorms' gradients huge (the
            // variance 0) and ill-conditioned on either path; perturbed, it is a fair test
            tch::no_grad(|| {
                for (k, mut v) in vs.variables() {
                    if k.contains("posterior") || k.contains("prior") {
                        v.copy_(&(v.randn_like() * 0.1));
                    }
                }
            });
            let x = Tensor::randn([3, 1 + lc_levels as i64, 16, 16], (Kind::Float, Device::Cpu));
            // every output (the HVAE's log-variance and KL term too), with the same dropout
            // masks and latent draws on both paths
            let run = || {
                tch::manual_seed(21);
                let o = net.forward_t(&x, true);
                let mut v = vec![o.mean];
                v.extend(o.logvar);
                v.extend(o.kl);
                v
            };
            // the running statistics after one training forward, each path from the same start
            let stats = || -> Vec<Tensor> {
                let mut v: Vec<(String, Tensor)> =
                    vs.variables().into_iter().filter(|(k, _)| k.contains("running")).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v.into_iter().map(|(_, t)| t).collect()
            };
            let start: Vec<Tensor> = stats().iter().map(|t| t.copy()).collect();
            let has_bn = variant == SplitVariant::Hvae || unet_norm == UnetNorm::Batch;
            assert_eq!(!start.is_empty(), has_bn, "{name}: running statistics");
            let restore = || {
                tch::no_grad(|| {
                    for (t, s) in stats().iter_mut().zip(&start) {
                        t.copy_(s);
                    }
                })
            };
            let _ = crate::backend::packed::plain(run);
            let after_plain: Vec<Tensor> = stats().iter().map(|t| t.copy()).collect();
            restore();
            let (_, blocked) = took_blocked_path(run);
            assert!(blocked, "{name}: the forward did not take the blocked path");
            for (a, b) in stats().iter().zip(&after_plain) {
                let tol = 1e-5 * b.abs().max().double_value(&[]).max(1.0);
                assert!(maxdiff(a, b) < tol, "{name}: running statistics differ by {}", maxdiff(a, b));
            }
            restore();
            nets_agree(&name, &vs, &run);
        }
    }

    /// Convolutions (plain first-layer input, blocked, strided, with and without bias) and
    /// transposed convolutions against libtorch's, values and all gradients.
    #[test]
    fn convolutions_equal_libtorch_with_gradients() {
        if !have_library() {
            return;
        }
        let _g = crate::engine::model::TORCH_RNG.lock();
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(3);
        // (input channels, output channels, size, kernel, stride, pad, bias, plain input, transposed)
        let cases = [
            (1, 16, 20, 3, 1, 1, true, true, false),
            (5, 32, 18, 3, 1, 1, false, true, false),
            (32, 16, 17, 3, 1, 1, false, false, false),
            (16, 32, 18, 3, 2, 1, true, false, false),
            (32, 48, 9, 1, 1, 0, true, false, false),
            (32, 16, 7, 2, 2, 0, true, false, true),
        ];
        for (ci, co, s, k, st, pad, bias, plain, transposed) in cases {
            let x0 = Tensor::randn([2, ci, s, s + 1], opts);
            let w = if transposed { Tensor::randn([ci, co, k, k], opts) } else { Tensor::randn([co, ci, k, k], opts) };
            let w = (w * 0.2).set_requires_grad(true);
            let b = bias.then(|| Tensor::randn([co], opts).set_requires_grad(true));
            let x1 = x0.copy().set_requires_grad(true);
            let xin = if plain { x1.shallow_clone() } else { to_blocked(&x1) };
            let y1 = if transposed {
                conv_transpose2d(&xin, &w, b.as_ref(), st).unwrap()
            } else {
                conv2d(&xin, &w, b.as_ref(), st, pad).unwrap()
            };
            let y1 = from_blocked(&y1);
            let x2 = x0.copy().set_requires_grad(true);
            let y2 = if transposed {
                x2.conv_transpose2d(&w, b.as_ref(), [st, st], [0, 0], [0, 0], 1, [1, 1])
            } else {
                x2.conv2d(&w, b.as_ref(), [st, st], [pad, pad], [1, 1], 1)
            };
            let case = (ci, co, s, k, st, bias, plain, transposed);
            assert_eq!(y1.size(), y2.size(), "{case:?}");
            assert!(rel(&y1, &y2) < 1e-5, "output differs by {} at {case:?}", rel(&y1, &y2));
            let gy = Tensor::randn(y2.size(), opts);
            let mut inputs = vec![&x1, &w];
            let mut inputs2 = vec![&x2, &w];
            if let Some(b) = &b {
                inputs.push(b);
                inputs2.push(b);
            }
            let g1 = Tensor::run_backward(&[(&y1 * &gy).sum(Kind::Float)], &inputs, false, false);
            let g2 = Tensor::run_backward(&[(&y2 * &gy).sum(Kind::Float)], &inputs2, false, false);
            for (i, name) in ["input", "weight", "bias"].iter().enumerate().take(g1.len()) {
                let d = rel(&g1[i], &g2[i]);
                assert!(d < 1e-5, "gradient of the {name} differs by {d} (relative) at {case:?}");
            }
        }
    }
}
