//! Device selection: "cpu", "cuda", "cuda:N" or "auto".
//!
//! The linker drops libtorch_cuda.so from the link (as-needed), so CUDA kernels are
//! registered only once it is loaded: we dlopen it on first use, when present.

use once_cell::sync::OnceCell;
use tch::Device;

use crate::error::{Error, Result};

static CUDA_LOAD: OnceCell<std::result::Result<(), String>> = OnceCell::new();
static ALLOCATOR_TUNED: OnceCell<bool> = OnceCell::new();

/// Keeps the process's freed tensor memory for reuse instead of returning it to the OS
/// (glibc `mallopt`: allocations up to 32 MiB come from the heap rather than fresh
/// `mmap`s, and the heap is trimmed only when 1 GiB at its top is free). libtorch's CPU
/// allocator is plain `malloc`, and a training step or a batch of tiles frees and
/// re-allocates the same activation sizes every time: with glibc's defaults each large
/// tensor is a new `mmap` whose pages the kernel faults in and zeroes again (the gain:
/// docs/engine-notes.md). The price is
/// that the resident size stays near its high-water mark after a large job. Applied
/// once per process, the first time a model is created or loaded or a device parsed;
/// `LUMOS_MALLOC_TUNING=0` in the environment leaves the host's allocator settings
/// alone. Returns whether the settings were applied. A no-op outside glibc.
pub fn tune_allocator() -> bool {
    *ALLOCATOR_TUNED.get_or_init(|| {
        if !crate::switches::switches().malloc_tuning {
            return false;
        }
        crate::backend::host::keep_freed_memory()
    })
}

/// Loads libtorch_cuda.so once (RTLD_GLOBAL so its kernels register with libtorch).
/// Returns the loader's message when it cannot be loaded (no CUDA build or no driver).
#[cfg(unix)]
pub fn load_cuda() -> std::result::Result<(), String> {
    CUDA_LOAD
        .get_or_init(|| {
            // libtorch ships CUDA for Linux only (macOS has no CUDA builds)
            crate::backend::host::open_global(std::ffi::OsStr::new("libtorch_cuda.so"))
        })
        .clone()
}

/// On Windows libtorch's torch_cuda.dll must be linked into the program (tch's
/// `TORCH_CUDA_VERSION` build); loading it at run time is not implemented there (docs/platforms.md).
#[cfg(not(unix))]
pub fn load_cuda() -> std::result::Result<(), String> {
    CUDA_LOAD.get_or_init(|| Err("loading torch_cuda.dll at run time is implemented for Linux only".into())).clone()
}

/// Whether a CUDA device is usable (libtorch_cuda loaded and a GPU visible).
pub fn cuda_available() -> bool {
    load_cuda().is_ok() && tch::Cuda::is_available()
}

/// For tests that need a GPU: the first CUDA device, or `None` (with a line saying the test
/// is skipped) on a machine without one.
/// A one-line description of this machine (CPU model and cores).
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores available")
}

#[cfg(test)]
pub(crate) fn cuda_for_test() -> Option<Device> {
    if cuda_available() {
        return Some(Device::Cuda(0));
    }
    eprintln!("skipped: no CUDA device");
    None
}

/// cuDNN's autotuner on (`torch.backends.cudnn.benchmark = True`, as nnU-Net sets it):
/// the first convolution of each shape times cuDNN's algorithms and keeps the fastest.
/// Tiles and training patches have fixed shapes, so the search is paid once.
/// `LUMOS_CUDNN_BENCHMARK=0` keeps cuDNN's heuristic choice.
fn tune_cudnn() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if crate::switches::switches().cudnn_benchmark {
            tch::Cuda::cudnn_set_benchmark(true);
        }
    });
}

/// Parses a device name. "auto" picks CUDA device 0 when available, else the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    tune_allocator();
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" | "" => Ok(if cuda_available() {
            tune_cudnn();
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        _ => {
            let idx = if n == "cuda" || n == "gpu" {
                0
            } else if let Some(i) = n.strip_prefix("cuda:") {
                i.parse::<usize>().map_err(|_| {
                    Error::Device(format!(
                        "'{name}': expected \"cpu\", \"cuda\", \"cuda:N\" (N a GPU index) or \"auto\""
                    ))
                })?
            } else {
                return Err(Error::Device(format!("'{name}': expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\"")));
            };
            if let Err(e) = load_cuda() {
                return Err(Error::Device(format!("'{name}' requested but libtorch_cuda could not be loaded: {e}")));
            }
            let count = tch::Cuda::device_count() as usize;
            if idx >= count {
                return Err(Error::Device(format!("'{name}' requested but {count} CUDA device(s) are visible")));
            }
            tune_cudnn();
            Ok(Device::Cuda(idx))
        }
    }
}

/// The name of a device as accepted by [`parse_device`].
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("CPU").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").unwrap_err().to_string().contains("expected"));
        assert!(parse_device("cuda:x").unwrap_err().to_string().contains("cuda:N"));
        let auto = parse_device("auto").unwrap();
        assert_eq!(auto == Device::Cpu, !cuda_available());
        if !cuda_available() {
            assert!(parse_device("cuda:0").is_err());
        }
    }
}
