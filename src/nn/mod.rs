//! Layers that several networks share: nnU-Net's convolution blocks (used by the nnU-Net,
//! DM-QPMNet and muSplit networks) and dropout in both activation layouts.
pub mod blocks;
pub mod dropout;
