//! The host process: the CPU's vendor, glibc's allocator settings and the dynamic loader.

/// Whether the CPU is an Intel one (CPUID vendor "GenuineIntel").
pub fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 exists on every x86-64 CPU (a safe function since Rust 1.87,
        // `unsafe` before)
        #[allow(unused_unsafe)]
        // SAFETY: leaf 0 of CPUID is defined on every x86-64 processor.
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut v = Vec::with_capacity(12);
        for w in [r.ebx, r.edx, r.ecx] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// glibc `mallopt`: allocations up to 32 MiB from the heap rather than fresh `mmap`s, the
/// heap trimmed only when 1 GiB at its top is free. Returns whether glibc took them; a
/// no-op (false) outside glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() -> bool {
    // SAFETY: mallopt only changes glibc's allocator parameters; it is thread-safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
            && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() -> bool {
    false
}

/// Opens the shared library `name` (a file name the loader searches, or a path) with its
/// symbols global, for the rest of the process. Returns the loader's message when it
/// cannot.
#[cfg(unix)]
pub fn open_global(name: &std::ffi::OsStr) -> std::result::Result<(), String> {
    let c = std::ffi::CString::new(name.as_encoded_bytes())
        .map_err(|_| format!("{}: a NUL byte in the name", name.display()))?;
    // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !h.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns a thread-local C string or NULL.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return Err(format!("cannot load {}", name.display()));
    }
    // SAFETY: a non-null dlerror result is a NUL-terminated string valid until the next
    // loader call on this thread.
    Err(unsafe { std::ffi::CStr::from_ptr(e) }.to_string_lossy().into_owned())
}

/// A CPU float tensor over memory the caller owns, without a copy: valid for `'a`, the
/// borrow of that memory. Whoever uses it must not keep a tensor that shares its storage
/// (`shallow_clone`, views) beyond it; copies (`to_device`, `copy_`, arithmetic) are
/// independent.
pub struct Borrowed<'a> {
    tensor: tch::Tensor,
    _data: std::marker::PhantomData<&'a [f32]>,
}

impl Borrowed<'_> {
    /// `data` seen with `dims` and element `strides` (non-negative), which must stay inside
    /// `data`; `None` otherwise.
    pub fn new<'a>(data: &'a [f32], dims: &[i64], strides: &[i64]) -> Option<Borrowed<'a>> {
        if dims.len() != strides.len() || dims.iter().chain(strides).any(|&v| v < 0) {
            return None;
        }
        let last = dims.iter().zip(strides).map(|(&d, &s)| (d - 1).max(0) * s).sum::<i64>();
        if dims.contains(&0) || last as usize >= data.len() {
            return None;
        }
        // SAFETY: every element the dims and strides reach lies inside `data` (checked
        // above), which the returned value borrows; libtorch only reads it through this tensor.
        let tensor = unsafe {
            tch::Tensor::from_blob(data.as_ptr() as *const u8, dims, strides, tch::Kind::Float, tch::Device::Cpu)
        };
        Some(Borrowed { tensor, _data: std::marker::PhantomData })
    }
}

impl std::ops::Deref for Borrowed<'_> {
    type Target = tch::Tensor;
    fn deref(&self) -> &tch::Tensor {
        &self.tensor
    }
}
