//! Inference precision: float32, or bfloat16 through libtorch's autocast.
//!
//! [`Precision::Bfloat16`] runs a forward pass under autocast for the input's device type
//! (`torch.autocast(device_type, dtype=torch.bfloat16)` in Python): convolutions, matrix
//! products and attention run in bfloat16 on the tensor cores of a CUDA GPU (Ampere or
//! newer), reductions and normalizations stay in float32, weights are cast once per call
//! (autocast's cache). Outputs are returned as float32. It changes results at the level of
//! bfloat16 rounding (8 bits of mantissa): class probabilities move by about 1e-2 at most,
//! labels only where two classes were nearly tied. On a CPU it pays only where the CPU has
//! bfloat16 arithmetic (AVX-512 BF16 or AMX), and even there not for every network, on the CPU
//! or the GPU (docs/benchmarks.md, docs/benchmarks-cuda.md). Hence opt-in.
//!
//! Training always runs in float32.

use std::os::raw::{c_char, c_int};

use tch::{Device, Tensor};

use crate::backend::optim::call;
use crate::error::{Error, Result};

unsafe extern "C" {
    fn lumos_autocast_enter(
        device_type: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn lumos_autocast_exit(
        device_type: c_int,
        prev_enabled: c_int,
        prev_dtype: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn lumos_autocast_enabled(device_type: c_int) -> c_int;
    fn lumos_autocast_dtype(device_type: c_int) -> c_int;
}

/// c10::DeviceType codes.
const DT_CPU: c_int = 0;
const DT_CUDA: c_int = 1;
/// c10::ScalarType::BFloat16.
const ST_BF16: c_int = 15;

/// The arithmetic precision of inference (segment, decompose, the network forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout (libtorch's defaults: on a CUDA GPU cuDNN may use TF32 for
    /// convolutions, as PyTorch does).
    #[default]
    Float32,
    /// bfloat16 autocast (see the module documentation).
    Bfloat16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Bfloat16 => "bfloat16",
        }
    }

    /// `float32` / `fp32` / `f32`, `bfloat16` / `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" => Ok(Precision::Float32),
            "bfloat16" | "bf16" => Ok(Precision::Bfloat16),
            other => {
                Err(Error::InvalidArgument(format!("precision '{other}'; expected float32 (fp32) or bfloat16 (bf16)")))
            }
        }
    }

    /// The C API's code: 0 float32, 1 bfloat16.
    pub fn from_code(code: i32) -> Result<Self> {
        match code {
            0 => Ok(Precision::Float32),
            1 => Ok(Precision::Bfloat16),
            other => {
                Err(Error::InvalidArgument(format!("precision code {other}; expected 0 (float32) or 1 (bfloat16)")))
            }
        }
    }

    pub fn code(self) -> i32 {
        match self {
            Precision::Float32 => 0,
            Precision::Bfloat16 => 1,
        }
    }
}

fn device_type(device: Device) -> Result<c_int> {
    match device {
        Device::Cuda(_) => Ok(DT_CUDA),
        Device::Cpu => Ok(DT_CPU),
        other => Err(Error::Device(format!("bfloat16 inference runs on the CPU or a CUDA GPU, not on {other:?}"))),
    }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: reads thread-local dispatch state.
    device_type(device).is_ok_and(|dt| unsafe { lumos_autocast_enabled(dt) != 0 })
}

/// Whether bfloat16 autocast is on for `device`'s type on this thread.
pub fn autocast_bf16(device: Device) -> bool {
    // SAFETY: read thread-local dispatch state.
    device_type(device)
        .is_ok_and(|dt| unsafe { lumos_autocast_enabled(dt) != 0 && lumos_autocast_dtype(dt) == ST_BF16 })
}

/// Restores the autocast state saved by `enter` when dropped (also on unwinding).
struct Guard {
    dt: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: restores the state saved by lumos_autocast_enter on this thread.
        if let Err(e) = call("autocast exit", |err, len| unsafe {
            lumos_autocast_exit(self.dt, self.prev_enabled, self.prev_dtype, err, len)
        }) {
            log::error!("{e}");
        }
    }
}

/// Runs `f` at `precision` for tensors on `device`: as is for float32, under bfloat16
/// autocast otherwise. Autocast state is per thread; it is restored when `f` returns.
pub fn with_precision<R>(precision: Precision, device: Device, f: impl FnOnce() -> R) -> Result<R> {
    if precision == Precision::Float32 {
        return Ok(f());
    }
    let dt = device_type(device)?;
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: valid out-pointers; the state is restored by Guard's drop.
    call("autocast", |err, len| unsafe {
        lumos_autocast_enter(dt, ST_BF16, &mut prev_enabled, &mut prev_dtype, err, len)
    })?;
    let _guard = Guard { dt, prev_enabled, prev_dtype };
    Ok(f())
}

/// `x` as float32 (a no-op when it already is).
pub fn to_float(x: Tensor) -> Tensor {
    if x.kind() == tch::Kind::Float { x } else { x.to_kind(tch::Kind::Float) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn autocast_runs_matmuls_in_bf16_and_restores_state() {
        let a = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
        assert!(!autocast_enabled(Device::Cpu));
        let y = with_precision(Precision::Bfloat16, Device::Cpu, || {
            assert!(autocast_enabled(Device::Cpu));
            a.matmul(&b)
        })
        .unwrap();
        assert_eq!(y.kind(), Kind::BFloat16, "autocast casts matmul to bfloat16");
        assert!(!autocast_enabled(Device::Cpu), "state restored");
        let r = a.matmul(&b);
        assert_eq!(r.kind(), Kind::Float);
        let rel = ((to_float(y) - &r).norm().double_value(&[])) / r.norm().double_value(&[]);
        assert!(rel > 0.0 && rel < 2e-2, "bf16 result within bf16 rounding of float32: {rel}");
        let f = with_precision(Precision::Float32, Device::Cpu, || a.matmul(&b)).unwrap();
        assert_eq!(f.kind(), Kind::Float);
        // nested: the inner exit keeps the outer region on
        with_precision(Precision::Bfloat16, Device::Cpu, || {
            with_precision(Precision::Bfloat16, Device::Cpu, || ()).unwrap();
            assert!(autocast_enabled(Device::Cpu));
        })
        .unwrap();
        assert!(!autocast_enabled(Device::Cpu));
    }

    #[test]
    fn parse_names_and_codes() {
        assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bfloat16);
        assert_eq!(Precision::parse("Float32").unwrap(), Precision::Float32);
        let e = Precision::parse("fp16").unwrap_err().to_string();
        assert!(e.contains("fp16") && e.contains("bfloat16"), "{e}");
        assert_eq!(Precision::from_code(1).unwrap(), Precision::Bfloat16);
        assert!(Precision::from_code(2).is_err());
        for p in [Precision::Float32, Precision::Bfloat16] {
            assert_eq!(Precision::from_code(p.code()).unwrap(), p);
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
        }
    }
}
