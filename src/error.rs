//! One error type for the whole engine. Each variant maps to one stable C status
//! code (see `ffi::Status`), and its message says what was wrong and what was expected.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied argument is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Array or buffer shapes do not match what the model or function expects.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Pixel data that cannot be processed (NaN, Inf, empty images).
    #[error("invalid input data: {0}")]
    InvalidInput(String),
    /// Operating-system I/O failure on a named path.
    #[error("I/O error on '{path}': {source}")]
    Io { path: String, source: std::io::Error },
    /// A TIFF file that is malformed or uses a feature this reader does not support.
    #[error("TIFF '{path}': {msg}")]
    Tiff { path: String, msg: String },
    /// A model or checkpoint file that is not a lumos file, is corrupt, or is too new.
    #[error("model file: {0}")]
    ModelFormat(String),
    /// The operation is not supported (for example decompose on a segmentation model).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The operation was cancelled through a cancel token.
    #[error("cancelled")]
    Cancelled,
    /// The requested device is unknown or unavailable.
    #[error("device: {0}")]
    Device(String),
    /// A training or model configuration is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }
    pub fn tiff(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Tiff { path: path.as_ref().display().to_string(), msg: msg.into() }
    }
}
