//! lumos: a deep-learning engine for microscopy with a stable C API.
//!
//! Four verbs (load a model, segment, decompose, train) over a tch (libtorch) core that
//! runs on CPU and CUDA.
//!
//! Layout: [`engine`] is what every method shares (the model file, tiling, normalization,
//! metrics, progress, the training loop); each method has its own folder with its network,
//! its training specifics, its data sampling and its recipes ([`nnunet`], [`dmqpm`],
//! [`pgdiff`], [`musplit`]); [`nn`] holds the layers several networks share; [`backend`]
//! holds the CPU and CUDA acceleration the architectures call into (oneDNN's blocked
//! layout, NVRTC kernels, packed weights, staging, precision, fused optimizer kernels).
//!
//! `unsafe` code lives in two modules only, and the compiler holds the rest of the crate
//! to that (`#![deny(unsafe_code)]`): [`ffi`], the C API (raw pointers from the host
//! application), and [`backend`], the calls into libtorch's C++ internals, oneDNN, the CUDA
//! driver and NVRTC, and the host process's allocator and dynamic loader.
//!
//! The papers' comparisons are the `lumos-experiments` crate of the workspace
//! (`experiments/`), outside the shipped library.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod backend;
pub mod dmqpm;
pub mod engine;
pub mod error;
pub mod export;
#[allow(unsafe_code)]
pub mod ffi;
pub mod image;
pub mod io;
pub mod methods;
pub mod musplit;
pub mod nn;
pub mod nnunet;
pub mod overlay;
pub mod pgdiff;
pub mod recipes;
pub mod sim;
pub mod switches;

pub use engine::model::{Model, SegmentOptions};
pub use error::{Error, Result};
pub use image::{Image, Mask};

/// The library version (semver).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
