//! lumos: a deep-learning engine for microscopy with a stable C API.
//!
//! Four verbs (load a model, segment, decompose, train) over a tch (libtorch) core that
//! runs on CPU and CUDA. The C API (`ffi`) is the only `unsafe` boundary.

pub mod augment;
pub mod compare;
pub mod compare_split;
pub mod compare_diff;
pub mod dataset;
pub mod ddim;
pub mod diffseg;
pub mod device;
pub mod error;
pub mod export;
pub mod ffi;
pub mod image;
pub mod io;
pub mod lc;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod optim;
pub mod normalize;
pub mod overlay;
pub mod progress;
pub mod recipes;
pub mod sim;
pub mod split;
pub mod staging;
pub mod tiling;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use image::{Image, Mask};
pub use model::{Model, SegmentOptions};

/// The library version (semver).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
