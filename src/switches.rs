//! The engine's environment switches, read once (at first use) into [`Switches`]; no other
//! module reads a `LUMOS_*` variable.
//!
//! | variable | default | effect |
//! |---|---|---|
//! | `LUMOS_MALLOC_TUNING` | on | glibc `mallopt` settings that keep freed tensor memory in the heap; `0` leaves the host process's allocator alone |
//! | `LUMOS_CUDNN_BENCHMARK` | on | cuDNN's autotuner for the convolutions of fixed-size tiles; `0` turns it off |
//! | `LUMOS_ONEDNN` | bootstrapped library | the oneDNN library of the blocked-layout CPU training convolutions: `0` switches them off (libtorch's convolutions), a path loads that file instead of `libdnnl.so.3` |
//! | `LUMOS_PACKED_CONV` | on | CPU inference with oneDNN-packed convolution weights; `0` runs libtorch's plain convolutions |
//! | `LUMOS_CUDA_NHWC_NORM` | on | CUDA InstanceNorm in the channels-last layout; `0` uses libtorch's |
//! | `LUMOS_CUDA_FUSED_NORM` | on | the NVRTC-compiled fused normalization + activation kernels on CUDA; `0` uses libtorch's operators |
//! | `LUMOS_CUDA_STAGED_COPY` | on | whole frames copied to the GPU once, tiles cut there; `0` copies tile by tile |
//! | `LUMOS_NVRTC` | unset | the NVRTC library file to load (otherwise the library path, then the `nvidia-*` packages beside libtorch) |
//! | `LUMOS_REQUIRE_ONEDNN` | unset | tests: fail instead of skipping when oneDNN cannot be loaded |
//! | `LUMOS_REQUIRE_NVRTC` | unset | tests: fail instead of skipping when NVRTC cannot be loaded |
//!
//! A switch that is on by default is off only when set to `0`. The table is also in
//! README.md ("Environment switches").

use std::path::PathBuf;

use once_cell::sync::Lazy;

/// The switches of this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Switches {
    pub malloc_tuning: bool,
    pub cudnn_benchmark: bool,
    pub packed_conv: bool,
    /// `LUMOS_ONEDNN=0`.
    pub onednn_off: bool,
    /// `LUMOS_ONEDNN=PATH`.
    pub onednn_library: Option<PathBuf>,
    pub cuda_nhwc_norm: bool,
    pub cuda_fused_norm: bool,
    pub cuda_staged_copy: bool,
    pub nvrtc: Option<PathBuf>,
    pub require_onednn: bool,
    pub require_nvrtc: bool,
}

impl Switches {
    /// Parses the switches from `get` (a variable's value, `None` when unset).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Self {
        let on = |name: &str| get(name).is_none_or(|v| v.trim() != "0");
        let set = |name: &str| get(name).is_some();
        Switches {
            malloc_tuning: on("LUMOS_MALLOC_TUNING"),
            cudnn_benchmark: on("LUMOS_CUDNN_BENCHMARK"),
            packed_conv: on("LUMOS_PACKED_CONV"),
            onednn_off: !on("LUMOS_ONEDNN"),
            onednn_library: get("LUMOS_ONEDNN").filter(|v| !v.is_empty() && v.trim() != "0").map(PathBuf::from),
            cuda_nhwc_norm: on("LUMOS_CUDA_NHWC_NORM"),
            cuda_fused_norm: on("LUMOS_CUDA_FUSED_NORM"),
            cuda_staged_copy: on("LUMOS_CUDA_STAGED_COPY"),
            nvrtc: get("LUMOS_NVRTC").filter(|v| !v.is_empty()).map(PathBuf::from),
            require_onednn: set("LUMOS_REQUIRE_ONEDNN"),
            require_nvrtc: set("LUMOS_REQUIRE_NVRTC"),
        }
    }
}

static SWITCHES: Lazy<Switches> =
    Lazy::new(|| Switches::parse(|n| std::env::var_os(n).map(|v| v.to_string_lossy().into_owned())));

/// The switches, read from the environment the first time this is called.
pub fn switches() -> &'static Switches {
    &SWITCHES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunings_are_on_unless_zero_and_requirements_are_set_by_presence() {
        let none = Switches::parse(|_| None);
        assert!(none.malloc_tuning && none.packed_conv && none.cuda_staged_copy && !none.require_onednn);
        assert_eq!(none.nvrtc, None);
        let some = Switches::parse(|n| match n {
            "LUMOS_PACKED_CONV" => Some(" 0".into()),
            "LUMOS_CUDNN_BENCHMARK" => Some("1".into()),
            "LUMOS_REQUIRE_ONEDNN" => Some(String::new()),
            "LUMOS_NVRTC" => Some("/x/libnvrtc.so.13".into()),
            _ => None,
        });
        assert!(!some.packed_conv && some.cudnn_benchmark && some.require_onednn);
        assert_eq!(some.nvrtc, Some(PathBuf::from("/x/libnvrtc.so.13")));
    }
}
