//! The C API: the only `unsafe` boundary of the engine.
//!
//! Conventions (rustls-ffi and tract-ffi style):
//! - Every fallible function returns a `LumosStatus` whose numbers never change.
//! - After a failure, `lumos_last_error_message()` gives a message for this thread.
//! - Pointer out-params are written only on success.
//! - No panic crosses the boundary: each body runs under `catch_unwind`.
//! - Handles are opaque; `*_free(NULL)` does nothing.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::Error;

// reason: every function's documentation states its pointer contract (ownership, NULL, lengths) in the
// generated header's words; a separate "# Safety" heading would repeat it
#[allow(clippy::missing_safety_doc)]
mod api;
pub use api::*;
#[allow(clippy::missing_safety_doc)]
mod instances;
pub use instances::*;

/// Status codes returned by every fallible function. The numbers are stable: new codes
/// are appended, none is ever renumbered or reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LumosStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// An argument is out of range or malformed (including invalid UTF-8 strings).
    InvalidArgument = 2,
    /// Buffer or image shapes do not match what the model or function expects.
    ShapeMismatch = 3,
    /// Pixel data that cannot be processed (NaN or Inf values).
    InvalidInput = 4,
    /// File-system error (missing file, unreadable or read-only folder, full disk).
    Io = 5,
    /// A TIFF file is malformed or unsupported.
    Tiff = 6,
    /// A model or checkpoint file is not a lumos file, is corrupt or truncated, or is too new.
    ModelFormat = 7,
    /// The model kind does not support this verb (for example decompose on a segmentation model).
    Unsupported = 8,
    /// The operation was cancelled through a cancel token.
    Cancelled = 9,
    /// The requested device is unknown or unavailable.
    Device = 10,
    /// The JSON training configuration is invalid.
    InvalidConfig = 11,
    /// libtorch reported an error.
    Torch = 12,
    /// A caller-provided output buffer is too small.
    BufferTooSmall = 13,
    /// An internal error (a caught panic). The library stays usable.
    Internal = 14,
}

pub(crate) struct Fail(pub LumosStatus, pub String);

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let s = match &e {
            Error::InvalidArgument(_) => LumosStatus::InvalidArgument,
            Error::Shape(_) => LumosStatus::ShapeMismatch,
            Error::InvalidInput(_) => LumosStatus::InvalidInput,
            Error::Io { .. } => LumosStatus::Io,
            Error::Tiff { .. } => LumosStatus::Tiff,
            Error::ModelFormat(_) => LumosStatus::ModelFormat,
            Error::Unsupported(_) => LumosStatus::Unsupported,
            Error::Cancelled => LumosStatus::Cancelled,
            Error::Device(_) => LumosStatus::Device,
            Error::Config(_) => LumosStatus::InvalidConfig,
            Error::Torch(_) => LumosStatus::Torch,
        };
        Fail(s, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an API body: clears the last error, catches panics, maps errors to statuses.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), Fail>) -> LumosStatus {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => LumosStatus::Ok,
        Ok(Err(Fail(s, m))) => {
            set_last_error(&m);
            s
        }
        Err(p) => {
            let m = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (caught panic): {m}"));
            LumosStatus::Internal
        }
    }
}

pub(crate) fn null(what: &str) -> Fail {
    Fail(LumosStatus::NullPointer, format!("'{what}' is NULL; a valid pointer is required"))
}

/// Borrows a C string argument as UTF-8.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string valid for the call.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Fail(LumosStatus::InvalidArgument, format!("'{what}' is not valid UTF-8 ({e})")))
}

/// The message of the last failed call on this thread ("" if the last call succeeded).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
