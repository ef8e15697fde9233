//! Inference convolutions with prepacked weights (CPU, oneDNN).
//!
//! Eager libtorch hands a dense weight to oneDNN on every call, and oneDNN reorders it
//! into its blocked layout each time; for the deep, wide layers of these networks
//! (hundreds of channels at 8x8 to 32x32) that reorder is a large share of the call
//! (docs/engine-notes.md).
//! Without gradients, on the CPU, a [`Conv2d`] packs its weight once
//! (`mkldnn_reorder_conv2d_weight`, as `torch.jit.freeze` or torch.compile's CPU backend
//! do) and calls libtorch's `mkldnn::_convolution_pointwise` with the packed weight. The
//! packed copy is keyed by the weight's storage, version counter and dtype, so an
//! optimizer step, `copy_` or a reload repacks it. Under CPU bfloat16 autocast (bfloat16
//! inference) the weight is cast to bfloat16 and packed once, and the input is cast to
//! bfloat16 as autocast's `conv2d` would (every call, with the weight cast and reordered
//! anew); the bias stays float32.
//! Training (grad mode on), CUDA, other dtypes and `LUMOS_PACKED_CONV=0` take the ordinary
//! `conv2d`. Any error on the packed path falls back to `conv2d` for good (logged once; a
//! bfloat16 failure, on CPUs whose oneDNN lacks bfloat16 convolutions, only for bfloat16).

use std::os::raw::{c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};

use once_cell::sync::Lazy;
use parking_lot::Mutex;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[repr(C)]
struct AtTensor {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn lumos_grad_enabled() -> c_int;
    fn lumos_mkldnn_available() -> c_int;
    fn lumos_conv2d_packed(
        x: *mut AtTensor,
        packed: *mut AtTensor,
        bias: *mut AtTensor,
        padding: *const i64,
        stride: *const i64,
        dilation: *const i64,
        groups: i64,
        out: *mut *mut AtTensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Whether autograd records operations on this thread.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { lumos_grad_enabled() != 0 }
}

static ENABLED: Lazy<bool> = Lazy::new(|| {
    // SAFETY: reads a build-time property of libtorch.
    let mkldnn = unsafe { lumos_mkldnn_available() != 0 };
    mkldnn && crate::switches::switches().packed_conv
});
static BROKEN: AtomicBool = AtomicBool::new(false);
/// Set when bfloat16 packing fails (oneDNN's bfloat16 convolutions need AVX-512 BW / VL /
/// DQ or AVX-NE-CONVERT): bfloat16 inference then takes autocast's `conv2d`, and the
/// float32 packed path stays on.
static BROKEN_BF16: AtomicBool = AtomicBool::new(false);

thread_local! {
    static PLAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with packed-weight convolutions (and the BatchNorm folding of the muSplit
/// U-Net's blocks) off on this thread: for TorchScript tracing (the bioimage.io export),
/// whose graph must hold portable `conv2d` ops rather than oneDNN's packed weights.
pub fn plain<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            PLAIN.with(|p| p.set(self.0));
        }
    }
    let _reset = Reset(PLAIN.with(|p| p.replace(true)));
    f()
}

/// Whether this thread is inside [`plain`] (portable libtorch operators only).
pub fn plain_ops() -> bool {
    PLAIN.with(|p| p.get())
}

/// Whether packed-weight inference is in use in this process (oneDNN present, not
/// switched off by `LUMOS_PACKED_CONV=0`, no failure seen).
pub fn packed_conv_enabled() -> bool {
    *ENABLED && !BROKEN.load(Ordering::Relaxed)
}

struct Packed {
    storage: usize,
    version: i64,
    kind: Kind,
    weight: Tensor,
}

/// A packed-weight cache for one convolution weight.
#[derive(Default)]
pub struct PackCache {
    slot: Mutex<Option<Packed>>,
}

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.slot.lock().is_some() { "PackCache(packed)" } else { "PackCache(empty)" })
    }
}

impl PackCache {
    /// `conv2d(x, w, b)` with square stride / padding, dilation 1, groups 1: the packed
    /// path when it applies, else libtorch's `conv2d`.
    pub fn conv2d(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: i64, padding: i64) -> Tensor {
        if packed_conv_enabled()
            && !PLAIN.with(|p| p.get())
            && x.device() == Device::Cpu
            && w.kind() == Kind::Float
            && x.dim() == 4
            && !grad_enabled()
        {
            // float32, or bfloat16 autocast (what autocast's conv2d would do: the input in
            // bfloat16, a bfloat16 result; here the weight is cast and packed once)
            let kind = if !crate::backend::precision::autocast_enabled(Device::Cpu) {
                (x.kind() == Kind::Float).then_some(Kind::Float)
            } else {
                (!BROKEN_BF16.load(Ordering::Relaxed)
                    && crate::backend::precision::autocast_bf16(Device::Cpu)
                    && matches!(x.kind(), Kind::Float | Kind::BFloat16))
                .then_some(Kind::BFloat16)
            };
            if let Some(kind) = kind {
                let xk = if x.kind() == kind { x.shallow_clone() } else { x.to_kind(kind) };
                match self.try_packed(&xk, w, b, stride, padding, kind) {
                    Ok(y) => return y,
                    Err(e) => {
                        let flag = if kind == Kind::BFloat16 { &BROKEN_BF16 } else { &BROKEN };
                        if !flag.swap(true, Ordering::Relaxed) {
                            log::warn!("packed-weight {kind:?} convolution unavailable, using libtorch's conv2d: {e}");
                        }
                    }
                }
            }
        }
        x.conv2d(w, b, [stride], [padding], [1], 1)
    }

    fn try_packed(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: i64,
        padding: i64,
        kind: Kind,
    ) -> Result<Tensor, String> {
        let key = (w.data_ptr() as usize, w.internal_version(), kind);
        let mut slot = self.slot.lock();
        if slot.as_ref().is_none_or(|p| (p.storage, p.version, p.kind) != key) {
            let dense = w
                .f_detach()
                .and_then(|d| d.f_to_kind(kind))
                .and_then(|d| d.f_to_mkldnn(kind))
                .map_err(|e| e.to_string())?;
            let weight = dense
                .f_mkldnn_reorder_conv2d_weight(
                    [padding, padding],
                    [stride, stride],
                    [1, 1],
                    1,
                    Some(x.size().as_slice()),
                )
                .map_err(|e| e.to_string())?;
            *slot = Some(Packed { storage: key.0, version: key.1, kind, weight });
        }
        let packed = &slot.as_ref().expect("packed above").weight;
        let (pad, st, dil) = ([padding; 2], [stride; 2], [1i64; 2]);
        let mut out: *mut AtTensor = std::ptr::null_mut();
        let mut err = vec![0u8; 1024];
        // SAFETY: live tensor handles for the call; on success `out` is a new handle
        // owned by us, wrapped (and later freed) by tch.
        let rc = unsafe {
            lumos_conv2d_packed(
                x.as_ptr() as *mut AtTensor,
                packed.as_ptr() as *mut AtTensor,
                b.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut AtTensor),
                pad.as_ptr(),
                st.as_ptr(),
                dil.as_ptr(),
                1,
                &mut out,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc != 0 || out.is_null() {
            let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
            return Err(String::from_utf8_lossy(&err[..end]).into_owned());
        }
        // SAFETY: `out` is a heap-allocated torch::Tensor* that tch takes ownership of.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }
}

/// A 2-D convolution (square kernel, stride and padding) whose inference runs on
/// packed weights; its parameters are tch's (`weight`, `bias` under the same path).
#[derive(Debug)]
pub struct Conv2d {
    pub conv: nn::Conv2D,
    stride: i64,
    padding: i64,
    cache: PackCache,
}

impl Conv2d {
    /// The convolution's (square) stride.
    pub fn stride(&self) -> i64 {
        self.stride
    }
    /// The convolution's (square) zero padding.
    pub fn padding(&self) -> i64 {
        self.padding
    }
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, cfg: nn::ConvConfig) -> Self {
        let (stride, padding) = (cfg.stride, cfg.padding);
        assert!(cfg.dilation == 1 && cfg.groups == 1, "packed::Conv2d supports dilation 1 and groups 1");
        Conv2d { conv: nn::conv2d(p, cin, cout, k, cfg), stride, padding, cache: PackCache::default() }
    }
}

impl Conv2d {
    /// This convolution's stride and padding with weight `w` and bias `b` in place of its
    /// own parameters (of the same shape): for an inference weight derived from them, such
    /// as a BatchNorm folded in. `w` should be one tensor updated in place (`copy_`), so
    /// that the packed copy follows it (it is keyed by storage and version counter).
    pub fn forward_with(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        self.cache.conv2d(x, w, b, self.stride, self.padding)
    }

    /// Drops the packed copy of the weight (before the tensor it was made from is freed:
    /// a later allocation at the same address must not be taken for it).
    pub fn clear_packed(&self) {
        *self.cache.slot.lock() = None;
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.cache.conv2d(x, &self.conv.ws, self.conv.bs.as_ref(), self.stride, self.padding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_inference_equals_conv2d_and_follows_weight_updates() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let c = Conv2d::new(vs.root() / "c", 16, 24, 3, nn::ConvConfig { stride: 2, padding: 1, ..Default::default() });
        let x = Tensor::randn([2, 16, 20, 12], (Kind::Float, Device::Cpu));
        let reference = |c: &Conv2d| x.conv2d(&c.conv.ws, c.conv.bs.as_ref(), [2], [1], [1], 1);
        let y = tch::no_grad(|| c.forward(&x));
        assert_eq!(y.size(), vec![2, 24, 10, 6]);
        let d = (&y - reference(&c)).abs().max().double_value(&[]);
        assert!(d < 1e-4, "packed conv differs from conv2d by {d}");
        if *ENABLED {
            assert!(format!("{:?}", c.cache).contains("packed"), "the weight was packed");
        }
        // an in-place weight update bumps the version: the next call repacks
        tch::no_grad(|| {
            let mut w = c.conv.ws.shallow_clone();
            let _ = w.f_mul_scalar_(-0.5).unwrap();
        });
        let y2 = tch::no_grad(|| c.forward(&x));
        let d2 = (&y2 - reference(&c)).abs().max().double_value(&[]);
        assert!(d2 < 1e-4, "after a weight update the packed conv differs by {d2}");
        // channels-last input, and with gradients the ordinary path (differentiable)
        let ycl = tch::no_grad(|| c.forward(&crate::engine::model::channels_last(&x)));
        assert!((&ycl - &y2).abs().max().double_value(&[]) < 1e-4);
        let yg = c.forward(&x);
        assert!(yg.requires_grad(), "with grad mode on the conv stays differentiable");
        assert!(packed_conv_enabled() || !*ENABLED);
        // another input size and batch reuse the packed weight
        let x2 = Tensor::randn([1, 16, 7, 9], (Kind::Float, Device::Cpu));
        let y3 = tch::no_grad(|| c.forward(&x2));
        let d3 = (&y3 - x2.conv2d(&c.conv.ws, c.conv.bs.as_ref(), [2], [1], [1], 1)).abs().max().double_value(&[]);
        assert!(d3 < 1e-4, "another input size: differs by {d3}");
        assert!(packed_conv_enabled() || !*ENABLED, "no fallback was needed");
        // bfloat16 autocast: the weight packed again in bfloat16, a bfloat16 result within
        // bfloat16 rounding of autocast's conv2d, and back to float32 afterwards
        let prec = crate::backend::precision::Precision::Bfloat16;
        let (yb, rb) = crate::backend::precision::with_precision(prec, Device::Cpu, || {
            tch::no_grad(|| (c.forward(&x), x.conv2d(&c.conv.ws, c.conv.bs.as_ref(), [2], [1], [1], 1)))
        })
        .unwrap();
        assert_eq!((yb.kind(), rb.kind()), (Kind::BFloat16, Kind::BFloat16));
        let scale = rb.abs().max().double_value(&[]);
        let db = (yb.to_kind(Kind::Float) - rb.to_kind(Kind::Float)).abs().max().double_value(&[]);
        assert!(db < 2e-2 * scale, "bfloat16 packed conv differs by {db} (outputs up to {scale})");
        // whether or not this CPU's oneDNN has bfloat16 convolutions, float32 packing stays on
        assert!(packed_conv_enabled() || !*ENABLED, "a bfloat16 failure does not switch float32 packing off");
        let y4 = tch::no_grad(|| c.forward(&x2));
        assert_eq!(y4.kind(), Kind::Float);
        assert!((&y4 - &y3).abs().max().double_value(&[]) < 1e-4, "float32 again after bfloat16");
        // plain(): no packing while it runs, restored afterwards
        let fresh = Conv2d::new(vs.root() / "d", 16, 8, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        let _ = plain(|| tch::no_grad(|| fresh.forward(&x)));
        assert!(format!("{:?}", fresh.cache).contains("empty"), "plain() bypasses the cache");
        let _ = tch::no_grad(|| fresh.forward(&x));
        if *ENABLED {
            assert!(format!("{:?}", fresh.cache).contains("packed"), "packing resumes after plain()");
        }
    }
}
