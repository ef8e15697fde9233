//! The shared engine: what every method uses, whatever its network.
pub mod dataset;
pub mod device;
pub mod instances;
pub mod measure;
pub mod method;
pub mod metrics;
pub mod model;
pub mod normalize;
pub mod progress;
pub mod tiling;
pub mod train;
pub mod weights;
