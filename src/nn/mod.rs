//! Network building blocks and architectures.
pub mod blocks;
pub mod cuda_norm;
pub mod dmqpm;
pub mod dropout;
pub mod ldm;
pub mod loss;
pub mod unet;
pub mod musplit;
pub mod onednn;
pub mod packed;
pub mod precision;
