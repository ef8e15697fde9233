//! nnU-Net 2D (PlainConvUNet): the network, its loss, its augmentation and the
//! segmentation trainer, which DM-QPMNet shares.
pub mod augment;
pub mod loss;
pub mod net;
