//! Acceleration apart from the architectures: the networks call these, and each decides
//! on its own whether its fast path applies (CPU, CUDA, precision, layout) and falls back
//! to plain libtorch operators otherwise.
pub mod cuda_norm;
pub mod host;
pub mod onednn;
pub mod ops;
pub mod optim;
pub mod packed;
pub mod precision;
pub mod staging;
