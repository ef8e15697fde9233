//! Network building blocks and architectures.
pub mod blocks;
pub mod loss;
pub mod unet;
