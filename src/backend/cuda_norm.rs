//! Fused InstanceNorm (+ LeakyReLU) of channels-last maps on a CUDA device.
//!
//! In eager libtorch an InstanceNorm of a channels-last map is a statistics reduction, a
//! handful of small kernels for the per-(sample, channel) scale and shift, an affine pass
//! and a LeakyReLU pass ([`crate::nn::blocks::InstanceNorm::forward_nhwc`]), a large share of a
//! DM-QPMNet forward pass on a GPU (libtorch's reduction reads a map with few channels
//! poorly; docs/engine-notes.md). Here it is two kernels: one reads the
//! map once and adds per-(sample, channel) sums of the values and of their squares (shifted
//! by each sample's first pixel, so that the variance does not cancel) into a float32
//! buffer; one reads it again and writes `leaky((x - mean) / sqrt(var + eps) * w + b)`.
//!
//! The kernels are CUDA C++ compiled at first use by NVRTC for the device's compute
//! capability and launched on the legacy default stream, the stream on which libtorch
//! (through tch) runs everything, so they are ordered with libtorch's kernels and its
//! caching allocator without events. The CUDA driver and NVRTC libraries are loaded at
//! run time (`cudarc`, dynamic loading): a build needs no CUDA toolkit, and where either
//! library is missing (a CPU-only host, a libtorch without `libnvrtc.so.*` on the library
//! path or beside a PyTorch wheel's libtorch, see [`ensure_nvrtc`]) or anything fails,
//! [`norm_act`] returns `None` (logged once) and the caller runs libtorch's operators. `LUMOS_CUDA_FUSED_NORM=0` switches the kernels off.
//!
//! Scope: inference (no autograd: with gradients on, a map, weight or bias that requires
//! them is left to libtorch), non-empty float32 or bfloat16 maps with NHWC strides and
//! aligned data, channel counts that are powers of two from 2 to 512 (every nnU-Net /
//! DM-QPMNet stage width), at most 65535 samples, fewer than 2^31 elements, weight and bias
//! on the map's device.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use tch::{Device, Kind, Tensor};

/// The kernels' source. bfloat16 is handled as raw 16-bit words (no CUDA headers needed):
/// widened by a shift, narrowed with round-to-nearest-even as libtorch does.
const SOURCE: &str = r#"
typedef unsigned short bf16_t;
struct alignas(8) f32x2 { float x, y; };

__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ unsigned int f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u >> 16) | ((u & 0xffffu) ? 0x40u : 0u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ f32x2 load2(const float* p, unsigned int i) { return *reinterpret_cast<const f32x2*>(p + i); }
__device__ __forceinline__ f32x2 load2(const bf16_t* p, unsigned int i) {
    unsigned int v = *reinterpret_cast<const unsigned int*>(p + i);
    f32x2 r; r.x = bf2f((bf16_t)(v & 0xffffu)); r.y = bf2f((bf16_t)(v >> 16)); return r;
}
__device__ __forceinline__ void store2(float* p, unsigned int i, float a, float b) {
    f32x2 v; v.x = a; v.y = b; *reinterpret_cast<f32x2*>(p + i) = v;
}
__device__ __forceinline__ void store2(bf16_t* p, unsigned int i, float a, float b) {
    *reinterpret_cast<unsigned int*>(p + i) = f2bf(a) | (f2bf(b) << 16);
}

// x (N, L, C) contiguous, C = 2 P with P dividing blockDim.x. Block (bx, n) covers rows
// [bx * rows, bx * rows + rows) of sample n; thread t owns the channel pair t % P and every
// (blockDim.x / P)-th row. Adds the sums of (x - k) and (x - k)^2, k = the sample's row 0,
// into sums (N, 2, C) float32 (zeroed by the caller).
template <typename T>
__device__ void stats(const T* x, float* sums, int L, int C, int rows) {
    __shared__ float sh[4][256];
    const int n = blockIdx.y, t = threadIdx.x, P = C / 2, p = t % P, step = blockDim.x / P;
    const unsigned int base = (unsigned int)n * (unsigned int)L * (unsigned int)C;
    const f32x2 k = load2(x, base + 2 * p);
    float s0 = 0.f, s1 = 0.f, q0 = 0.f, q1 = 0.f;
    const int r0 = blockIdx.x * rows, r1 = min(r0 + rows, L);
    for (int r = r0 + t / P; r < r1; r += step) {
        const f32x2 v = load2(x, base + (unsigned int)r * (unsigned int)C + 2 * p);
        const float d0 = v.x - k.x, d1 = v.y - k.y;
        s0 += d0; s1 += d1; q0 += d0 * d0; q1 += d1 * d1;
    }
    sh[0][t] = s0; sh[1][t] = s1; sh[2][t] = q0; sh[3][t] = q1;
    __syncthreads();
    if (t < P) {
        for (int j = t + P; j < blockDim.x; j += P) { s0 += sh[0][j]; s1 += sh[1][j]; q0 += sh[2][j]; q1 += sh[3][j]; }
        float* o = sums + (unsigned int)n * 2u * (unsigned int)C;
        atomicAdd(o + 2 * p, s0); atomicAdd(o + 2 * p + 1, s1);
        atomicAdd(o + C + 2 * p, q0); atomicAdd(o + C + 2 * p + 1, q1);
    }
}

// y = leaky((x - mean) * w / sqrt(var + eps) + b) over pairs of elements (C even);
// slope 1 is no activation.
template <typename T>
__device__ void apply(const T* x, T* y, const float* sums, const float* w, const float* b,
                      int L, int C, float eps, float slope, unsigned int pairs) {
    const float inv_l = 1.0f / (float)L;
    const unsigned int per_sample = (unsigned int)L * (unsigned int)C;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += gridDim.x * blockDim.x) {
        const unsigned int e = 2u * i, n = e / per_sample, c = e % (unsigned int)C;
        const float* s = sums + n * 2u * (unsigned int)C;
        const f32x2 k = load2(x, n * per_sample + c);
        const f32x2 v = load2(x, e);
        const float m0 = s[c] * inv_l, m1 = s[c + 1] * inv_l;
        const float v0 = fmaxf(s[C + c] * inv_l - m0 * m0, 0.f), v1 = fmaxf(s[C + c + 1] * inv_l - m1 * m1, 0.f);
        float a0 = (v.x - k.x - m0) * (w[c] * rsqrtf(v0 + eps)) + b[c];
        float a1 = (v.y - k.y - m1) * (w[c + 1] * rsqrtf(v1 + eps)) + b[c + 1];
        a0 = a0 >= 0.f ? a0 : a0 * slope;
        a1 = a1 >= 0.f ? a1 : a1 * slope;
        store2(y, e, a0, a1);
    }
}

extern "C" __global__ void __launch_bounds__(256) lumos_in_stats_f32(const float* x, float* sums, int L, int C, int rows) { stats(x, sums, L, C, rows); }
extern "C" __global__ void __launch_bounds__(256) lumos_in_stats_bf16(const bf16_t* x, float* sums, int L, int C, int rows) { stats(x, sums, L, C, rows); }
extern "C" __global__ void __launch_bounds__(256) lumos_in_apply_f32(const float* x, float* y, const float* sums, const float* w, const float* b, int L, int C, float eps, float slope, unsigned int pairs) { apply(x, y, sums, w, b, L, C, eps, slope, pairs); }
extern "C" __global__ void __launch_bounds__(256) lumos_in_apply_bf16(const bf16_t* x, bf16_t* y, const float* sums, const float* w, const float* b, int L, int C, float eps, float slope, unsigned int pairs) { apply(x, y, sums, w, b, L, C, eps, slope, pairs); }
"#;

const THREADS: u32 = 256;
/// Rows of one sample per statistics block.
const ROWS: i64 = 512;

/// The compiled kernels of one device, on its legacy default stream.
struct Kernels {
    stream: Arc<CudaStream>,
    stats_f32: CudaFunction,
    stats_bf16: CudaFunction,
    apply_f32: CudaFunction,
    apply_bf16: CudaFunction,
}

/// Per device ordinal: the kernels, or `None` where they could not be built. Kernels that
/// failed at launch stay here (their module stays loaded: a kernel of it may be queued) and
/// their ordinal goes into [`DISABLED`].
static KERNELS: Lazy<Mutex<HashMap<usize, Option<Arc<Kernels>>>>> = Lazy::new(|| Mutex::new(HashMap::new()));
static DISABLED: Lazy<Mutex<std::collections::HashSet<usize>>> = Lazy::new(|| Mutex::new(Default::default()));

fn enabled() -> bool {
    crate::switches::switches().cuda_fused_norm
}

/// NVRTC candidates beside the libtorch this process loaded: a PyTorch wheel's libtorch
/// (`site-packages/torch/lib`) takes its CUDA libraries from the `nvidia-*` packages beside
/// it (`site-packages/nvidia/<package>/lib/libnvrtc.so.<major>`), which are not on the
/// library path. `LUMOS_NVRTC` names a file explicitly.
fn nvrtc_candidates() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = &crate::switches::switches().nvrtc {
        out.push(p.clone());
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let torch_lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so") || p.ends_with("/libtorch_cuda.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()));
    if let Some(nvidia) =
        torch_lib.as_deref().and_then(|d| d.parent()).and_then(|d| d.parent()).map(|d| d.join("nvidia"))
    {
        let mut dirs: Vec<_> =
            std::fs::read_dir(&nvidia).into_iter().flatten().flatten().map(|e| e.path().join("lib")).collect();
        dirs.sort();
        for d in dirs {
            let mut files: Vec<_> = std::fs::read_dir(&d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc.so.")))
                .collect();
            files.sort();
            out.extend(files);
        }
    }
    out
}

/// Makes NVRTC loadable by name: the file `LUMOS_NVRTC` names, else, where NVRTC is not on
/// the library path, the first of [`nvrtc_candidates`] that opens, is loaded globally, so
/// that the dynamic loader returns it for its soname (`libnvrtc.so.<major>`). cudarc asks
/// for a list of names in order (`libnvrtc.so`, then `libnvrtc.so.13`, `.12`, ...), so a
/// library on the library path under an earlier name of that list still wins over
/// `LUMOS_NVRTC`. Returns whether NVRTC can be loaded.
pub(crate) fn ensure_nvrtc() -> bool {
    static OK: Lazy<bool> = Lazy::new(|| {
        // SAFETY: only probes whether the shared library can be opened.
        if crate::switches::switches().nvrtc.is_none() && unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return true;
        }
        let open = |f: &std::path::Path| -> bool {
            let Ok(c) = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            // SAFETY: dlopen of a path; the handle is kept (never closed) for the process.
            !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
        };
        for f in nvrtc_candidates() {
            // NVRTC opens its builtins library by name at compile time: load the one beside it
            if let Some(dir) = f.parent() {
                for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    let name = e.file_name();
                    if name.to_str().is_some_and(|n| n.starts_with("libnvrtc-builtins.so.")) {
                        open(&e.path());
                    }
                }
            }
            // SAFETY: only probes whether the shared library can be opened.
            if open(&f) && unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                log::debug!("NVRTC loaded from {}", f.display());
                return true;
            }
        }
        if let Some(p) = &crate::switches::switches().nvrtc {
            log::warn!("LUMOS_NVRTC={} could not be loaded", p.display());
        }
        // SAFETY: only probes whether the shared library can be opened.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    });
    *OK
}

/// Compiles and loads the kernels on device `ordinal` ([`kernels`] has checked that the
/// driver library loads).
fn build(ordinal: usize) -> Result<Kernels, String> {
    if !ensure_nvrtc() {
        return Err("NVRTC (libnvrtc.so.*) is neither on the library path nor beside libtorch's nvidia packages (LUMOS_NVRTC names it)".into());
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context of device {ordinal}: {e}"))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("compute capability: {e}"))?;
    // machine code for the device; PTX for the driver to compile where that fails
    let arch = format!("sm_{major}{minor}");
    // cudarc panics where an NVRTC symbol is missing (an NVRTC without CUBIN output): keep
    // that to this attempt, so that PTX is still tried
    let cubin =
        std::panic::catch_unwind(|| compile_cubin(&arch)).unwrap_or_else(|_| Err("NVRTC has no CUBIN output".into()));
    let module = match cubin.and_then(|c| ctx.load_module(Ptx::from_binary(c)).map_err(|e| e.to_string())) {
        Ok(m) => {
            log::info!("fused CUDA InstanceNorm: machine code for {arch} loaded on device {ordinal}");
            m
        }
        Err(cubin_err) => {
            let opts = CompileOptions {
                options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "--std=c++17".into()],
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(SOURCE, opts)
                .map_err(|e| format!("machine code: {cubin_err}; PTX: NVRTC: {e}"))?;
            let m = ctx
                .load_module(ptx)
                .map_err(|e| format!("machine code: {cubin_err}; PTX: loading the compiled kernels: {e}"))?;
            log::info!(
                "fused CUDA InstanceNorm: PTX for compute_{major}{minor} loaded on device {ordinal} (no machine code: {cubin_err})"
            );
            m
        }
    };
    let f = |name: &str| module.load_function(name).map_err(|e| format!("kernel {name}: {e}"));
    Ok(Kernels {
        stream: ctx.default_stream(),
        stats_f32: f("lumos_in_stats_f32")?,
        stats_bf16: f("lumos_in_stats_bf16")?,
        apply_f32: f("lumos_in_apply_f32")?,
        apply_bf16: f("lumos_in_apply_bf16")?,
    })
}

/// [`SOURCE`] compiled by NVRTC to machine code (a CUBIN) for `arch` (`sm_90`, ...): machine
/// code rather than PTX, so that the driver has nothing to compile (it could not JIT the PTX
/// of an NVRTC newer than itself). [`build`] falls back to PTX where this fails.
fn compile_cubin(arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    let src = std::ffi::CString::new(SOURCE).map_err(|e| e.to_string())?;
    let name = std::ffi::CString::new("lumos_instance_norm.cu").map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| format!("NVRTC: {e:?}"))?;
    let opts = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    // SAFETY: `prog` is a live program until destroyed below; the buffers are sized by NVRTC.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts).map_err(|e| {
            let log = result::get_program_log(prog)
                .map(|l| {
                    let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                    std::ffi::CStr::from_bytes_until_nul(&bytes)
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            format!("NVRTC ({arch}): {e:?}: {log}")
        });
        let cubin = compiled.and_then(|_| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| format!("NVRTC CUBIN size: {e:?}"))?;
            if size == 0 {
                return Err(format!("NVRTC ({arch}) returned no CUBIN"));
            }
            let mut buf = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
                .result()
                .map_err(|e| format!("NVRTC CUBIN: {e:?}"))?;
            Ok(buf)
        });
        let _ = result::destroy_program(prog);
        cubin
    };
    match out {
        Ok(b) if b.starts_with(b"\x7fELF") => Ok(b),
        Ok(_) => Err(format!("NVRTC ({arch}) returned no CUBIN")),
        Err(e) => Err(e),
    }
}

/// Restores the calling thread's current CUDA context when dropped: cudarc binds the
/// device's primary context to the thread for its calls, which would otherwise leave a
/// host application that uses the CUDA runtime on this thread on another device.
pub(crate) struct ContextGuard(Option<Option<cudarc::driver::sys::CUcontext>>);

impl ContextGuard {
    pub(crate) fn save() -> Self {
        ContextGuard(cudarc::driver::result::ctx::get_current().ok())
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            // SAFETY: restores the context that was current on this thread (or none).
            let _ = unsafe { cudarc::driver::result::ctx::set_current(prev.unwrap_or(std::ptr::null_mut())) };
        }
    }
}

/// The kernels of device `ordinal`, compiled on first use; `None` (logged once per
/// device) where they cannot be had.
fn kernels(ordinal: usize) -> Option<Arc<Kernels>> {
    if DISABLED.lock().contains(&ordinal) {
        return None;
    }
    let mut map = KERNELS.lock();
    map.entry(ordinal)
        .or_insert_with(|| {
            // cudarc panics where a library symbol is missing: keep that inside
            let built = std::panic::catch_unwind(|| {
                // the driver library first: the guard reads the thread's context through it
                // SAFETY: only probes whether the shared library can be opened.
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    return Err("the CUDA driver library (libcuda.so) is not on the library path".to_string());
                }
                let _ctx = ContextGuard::save();
                build(ordinal)
            })
            .unwrap_or_else(|_| Err("the CUDA libraries failed to load".into()));
            match built {
                Ok(k) => {
                    log::info!("fused CUDA InstanceNorm kernels compiled for device {ordinal}");
                    Some(Arc::new(k))
                }
                Err(e) => {
                    log::warn!(
                        "fused CUDA InstanceNorm unavailable on device {ordinal}, using libtorch's operators: {e}"
                    );
                    None
                }
            }
        })
        .clone()
}

/// Marks the kernels of `ordinal` unavailable after a failed launch (logged once).
fn disable(ordinal: usize, e: &str) {
    log::warn!("fused CUDA InstanceNorm failed on device {ordinal}, using libtorch's operators from now on: {e}");
    DISABLED.lock().insert(ordinal);
}

/// Whether [`norm_act`] takes `x` with these parameters (before any library is loaded):
/// nothing that autograd would have to follow, a non-empty channels-last map of a supported
/// type and channel count, at most 65535 samples (the statistics grid's second dimension),
/// element addresses aligned for the kernels' two-element accesses.
fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let Device::Cuda(_) = x.device() else {
        return false;
    };
    if !enabled() || x.dim() != 4 || !matches!(x.kind(), Kind::Float | Kind::BFloat16) {
        return false;
    }
    if crate::backend::packed::grad_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad()) {
        return false;
    }
    let size = x.size();
    let (n, c) = (size[0], size[1]);
    let align = 2 * x.kind().elt_size_in_bytes();
    x.numel() > 0
        && x.numel() < (1usize << 31)
        && n <= 65535
        && (2..=512).contains(&c)
        && (c & (c - 1)) == 0
        && weight.numel() == c as usize
        && bias.numel() == c as usize
        && weight.device() == x.device()
        && bias.device() == x.device()
        && crate::nn::blocks::is_channels_last(x)
        && (x.data_ptr() as usize).is_multiple_of(align)
}

/// `leaky_relu(instance_norm(x) * weight + bias, slope)` of a channels-last `(N, C, H, W)`
/// CUDA map (float32 or bfloat16; `weight`, `bias` `(C)`; `slope` 1 for none), channels-last
/// and of `x`'s type, by the fused kernels; `None` where they do not apply or are
/// unavailable (the caller computes it with libtorch's operators).
pub fn norm_act(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, slope: f64) -> Option<Tensor> {
    if !applies(x, weight, bias) {
        return None;
    }
    let Device::Cuda(ordinal) = x.device() else {
        return None;
    };
    let k = kernels(ordinal)?;
    let _ctx = ContextGuard::save();
    match launch(&k, x, weight, bias, eps, slope) {
        Ok(y) => Some(y),
        Err(e) => {
            disable(ordinal, &e);
            None
        }
    }
}

fn launch(k: &Kernels, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, slope: f64) -> Result<Tensor, String> {
    let (n, c, h, w) = x.size4().map_err(|e| e.to_string())?;
    let l = h * w;
    let t = x.permute([0, 2, 3, 1]).reshape([n, l, c]);
    let y = t.empty_like();
    let sums = Tensor::zeros([n, 2, c], (Kind::Float, x.device()));
    let wt = weight.to_kind(Kind::Float).contiguous();
    let bt = bias.to_kind(Kind::Float).contiguous();
    let (xp, yp, sp, wp, bp) =
        (t.data_ptr() as u64, y.data_ptr() as u64, sums.data_ptr() as u64, wt.data_ptr() as u64, bt.data_ptr() as u64);
    let (li, ci, rows) = (l as i32, c as i32, ROWS.min(l) as i32);
    let (epsf, slopef) = (eps as f32, slope as f32);
    let pairs = (t.numel() / 2) as u32;
    let bf16 = x.kind() == Kind::BFloat16;
    let stats_cfg = LaunchConfig {
        grid_dim: ((l as u32).div_ceil(rows as u32), n as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let apply_cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(THREADS).min(1 << 20), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the pointers are the storage of live contiguous CUDA tensors of the sizes
    // the kernels index (t, y: N*L*C elements of x's type; sums: N*2*C float32; w, b: C
    // float32), on x's device; the launches go to the legacy default stream, libtorch's
    // stream here, so the tensors' memory is not reused before the kernels have run.
    unsafe {
        let mut s = k.stream.launch_builder(if bf16 { &k.stats_bf16 } else { &k.stats_f32 });
        s.arg(&xp).arg(&sp).arg(&li).arg(&ci).arg(&rows);
        s.launch(stats_cfg).map_err(|e| format!("statistics kernel: {e}"))?;
        let mut a = k.stream.launch_builder(if bf16 { &k.apply_bf16 } else { &k.apply_f32 });
        a.arg(&xp).arg(&yp).arg(&sp).arg(&wp).arg(&bp).arg(&li).arg(&ci).arg(&epsf).arg(&slopef).arg(&pairs);
        a.launch(apply_cfg).map_err(|e| format!("normalization kernel: {e}"))?;
    }
    Ok(y.view([n, h, w, c]).permute([0, 3, 1, 2]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    /// Wherever NVRTC can be loaded (no GPU needed: the CUDA wheel of torch that bootstrap
    /// installs carries it; scripts/test.sh sets LUMOS_REQUIRE_NVRTC there): the kernels'
    /// source compiles to machine code for Hopper and Ampere GPUs and to PTX, with all four
    /// entry points.
    #[test]
    fn kernel_source_compiles_with_nvrtc() {
        if !ensure_nvrtc() {
            assert!(
                !crate::switches::switches().require_nvrtc,
                "LUMOS_REQUIRE_NVRTC is set but NVRTC cannot be loaded"
            );
            eprintln!("skipped: NVRTC cannot be loaded");
            return;
        }
        // the PTX fallback of build()
        let opts = CompileOptions {
            options: vec!["--gpu-architecture=compute_90".into(), "--std=c++17".into()],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, opts).expect("PTX for compute_90").to_src();
        for f in ["lumos_in_stats_f32", "lumos_in_stats_bf16", "lumos_in_apply_f32", "lumos_in_apply_bf16"] {
            assert!(ptx.contains(&format!(".entry {f}")), "compute_90: {f} missing from the PTX");
        }
        for arch in ["sm_90", "sm_80"] {
            let cubin = compile_cubin(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            // the four entry points are in the machine code's symbol table
            for f in ["lumos_in_stats_f32", "lumos_in_stats_bf16", "lumos_in_apply_f32", "lumos_in_apply_bf16"] {
                assert!(cubin.windows(f.len()).any(|w| w == f.as_bytes()), "{arch}: {f} missing from the CUBIN");
            }
        }
    }

    /// Runs on a CUDA machine only (skipped elsewhere): the fused kernels against libtorch's
    /// operators on the shapes of the networks' stages and on odd spatial sizes.
    #[test]
    fn fused_norm_matches_libtorch_on_cuda() {
        let Some(dev) = crate::engine::device::cuda_for_test() else {
            return;
        };
        let _g = crate::engine::model::TORCH_RNG.lock();
        tch::manual_seed(5);
        assert!(kernels(0).is_some(), "the fused kernels did not build (see the log)");
        for (n, c, h, w) in [
            (2i64, 32i64, 64i64, 64i64),
            (3, 64, 33, 17),
            (16, 32, 256, 256),
            (2, 512, 4, 4),
            (1, 2, 5, 3),
            (4, 128, 1, 1),
        ] {
            let vs = nn::VarStore::new(dev);
            let norm = crate::nn::blocks::InstanceNorm::new(&vs.root(), c);
            tch::no_grad(|| {
                let _ = norm.weight.shallow_clone().uniform_(0.5, 1.5);
                let _ = norm.bias.shallow_clone().uniform_(-0.5, 0.5);
            });
            let x = Tensor::randn([n, c, h, w], (Kind::Float, dev)) * 2.0
                + Tensor::randn([1, c, 1, 1], (Kind::Float, dev)) * 3.0;
            let xl = crate::engine::model::channels_last(&x);
            for slope in [0.01, 1.0] {
                let reference = x.group_norm(c, Some(&norm.weight), Some(&norm.bias), 1e-5, true);
                let reference = if slope == 1.0 { reference } else { reference.leaky_relu() };
                let y =
                    tch::no_grad(|| norm_act(&xl, &norm.weight, &norm.bias, 1e-5, slope)).expect("the kernels apply");
                assert!(crate::nn::blocks::is_channels_last(&y) || h * w == 1);
                let e = (&y - &reference).abs().max().double_value(&[]);
                assert!(e < 2e-4, "float32 {:?} slope {slope}: max error {e}", (n, c, h, w));
                let yb = tch::no_grad(|| norm_act(&xl.to_kind(Kind::BFloat16), &norm.weight, &norm.bias, 1e-5, slope))
                    .expect("bf16");
                assert_eq!(yb.kind(), Kind::BFloat16);
                let eb = (yb.to_kind(Kind::Float) - &reference).abs().max().double_value(&[]);
                assert!(eb < 0.08, "bfloat16 {:?} slope {slope}: max error {eb}", (n, c, h, w));
            }
        }
        // out of scope: a map that needs gradients, an odd channel count, NCHW strides
        let x = crate::engine::model::channels_last(&Tensor::randn([2, 24, 8, 8], (Kind::Float, dev)));
        let (wt, bt) = (Tensor::ones([24], (Kind::Float, dev)), Tensor::zeros([24], (Kind::Float, dev)));
        assert!(norm_act(&x, &wt, &bt, 1e-5, 0.01).is_none(), "24 channels");
        let x = Tensor::randn([2, 32, 8, 8], (Kind::Float, dev));
        let (wt, bt) = (Tensor::ones([32], (Kind::Float, dev)), Tensor::zeros([32], (Kind::Float, dev)));
        assert!(norm_act(&x, &wt, &bt, 1e-5, 0.01).is_none(), "NCHW");
    }
}
