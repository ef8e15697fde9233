pub mod tiff;
