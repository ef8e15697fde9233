//! DM-QPMNet: ssQPM cell segmentation from four polarized intensities and a phase map.
//! It trains through the nnU-Net segmentation trainer ([`crate::nnunet`]).
pub mod net;
pub mod recipes;
